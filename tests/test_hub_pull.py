"""`medzoo pull` against olah serving faithful small replicas of the published checkpoints, and against
tests/hubserver.py for private repos, bad revisions and interrupted downloads. Real HTTP, real client."""
import json
import pickle
import shutil

import pytest
from click.testing import CliRunner

from hub_fixtures import TOKEN

from medzoo import zoo
from medzoo.cli import main


def run(*args, ok=True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def same(a: dict, b: dict) -> bool:
    import torch

    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pull_medqa_lora(olah_env, seed_checkpoints):
    out = run("pull", "wangrongsheng/MedQA-ChatGLM-LoRA").output
    _, folder, manifest = zoo.get("MedQA-ChatGLM-LoRA")
    assert manifest["layout"] == "peft" and manifest["method"] == "lora" and manifest["recipe"] == "medqa-chatglm"
    assert manifest["base_model"] == "chatglm-6b" and manifest["base_model_id"] == "zai-org/chatglm-6b"
    assert manifest["source"].startswith("hf://wangrongsheng/MedQA-ChatGLM-LoRA@")
    assert manifest["method_params"]["r"] == 8 and manifest["method_params"]["alpha"] == 32.0
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "zai-org/chatglm-6b"
    assert "merge_weights" not in config and "enable_lora" not in config
    assert same(tensors(folder / "adapter" / "adapter_model.safetensors"), seed_checkpoints["lora_state"])
    assert not list(folder.rglob("*.bin"))
    assert "finetuning_args.bin: a pickle" in out and "training_args.bin: a pickle" in out
    ignored = {i["file"] for i in manifest["ignored"]}
    assert {"finetuning_args.bin", "training_args.bin", "trainer_state.json"} <= ignored
    card = (folder / "README.md").read_text()
    assert "base_model: zai-org/chatglm-6b" in card and "train_loss" in card
    listing = run("list", "--local").output
    assert "MedQA-ChatGLM-LoRA" in listing and "medqa-chatglm" in listing
    assert "## This checkpoint" in run("info", "MedQA-ChatGLM-LoRA").output


def test_pulled_lora_runs_on_native_chatglm(olah_env, seed_checkpoints):
    """The converted adapter loads with peft onto medzoo's native ChatGLM and gives the original's logits."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict, LoraConfig, get_peft_model

    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration

    run("pull", "wangrongsheng/MedQA-ChatGLM-LoRA")
    _, folder, _ = zoo.get("MedQA-ChatGLM-LoRA")
    config = seed_checkpoints["chatglm_config"]
    torch.manual_seed(1)
    base = ChatGLMForConditionalGeneration(config).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[10, 11, 12, config.gmask_token_id, config.bos_token_id, 20]])
    reference = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    set_peft_model_state_dict(reference, seed_checkpoints["lora_state"])
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
    fresh = ChatGLMForConditionalGeneration(config).eval()
    fresh.load_state_dict(base_state)
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
    pulled = PeftModel.from_pretrained(fresh, str(folder / "adapter")).eval()
    with torch.no_grad():
        got = pulled(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_pull_freeze_by_recipe_and_method(olah_env, seed_checkpoints):
    import torch

    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
    from medzoo.modeling import load_partial_state

    out = run("pull", "medqa-chatglm", "--method", "freeze").output
    assert "MedQA-ChatGLM-Freeze" in out
    _, folder, manifest = zoo.get("MedQA-ChatGLM-Freeze")
    assert manifest["layout"] == "freeze" and manifest["method"] == "freeze"
    assert manifest["method_params"]["num_layer_trainable"] == 3
    assert manifest["method_params"]["name_module_trainable"] == "mlp"
    state = tensors(folder / "trainable.safetensors")
    assert same(state, seed_checkpoints["freeze_state"])
    assert "transformer.layers.3.mlp.dense_h_to_4h.weight" in state
    model = ChatGLMForConditionalGeneration(seed_checkpoints["chatglm_config"])
    load_partial_state(model, folder / "trainable.safetensors")   # every name and shape matches the native model
    assert torch.equal(model.state_dict()["transformer.layers.3.mlp.dense_h_to_4h.weight"],
                       state["transformer.layers.3.mlp.dense_h_to_4h.weight"])


def test_pull_ptuning_sets_prefix_overrides(olah_env, seed_checkpoints):
    from medzoo.chatglm.configuration import ChatGLMConfig
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
    from medzoo.modeling import load_partial_state
    from hub_fixtures import CHATGLM_TINY

    run("pull", "wangrongsheng/MedQA-ChatGLM-PTuningV2@main", "--name", "medqa-pt")
    _, folder, manifest = zoo.get("medqa-pt")
    assert manifest["layout"] == "prefix" and manifest["method"] == "ptuning-v2"
    assert manifest["config_overrides"] == {"pre_seq_len": 16, "prefix_projection": False}
    state = tensors(folder / "prefix.safetensors")
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert same(state, seed_checkpoints["prefix_state"])
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CHATGLM_TINY, **manifest["config_overrides"]))
    load_partial_state(model, folder / "prefix.safetensors")


def test_bentsao_stored_base_path_is_not_trusted(olah_env):
    run("pull", "thinksoso/lora-llama-med")
    _, folder, manifest = zoo.get("lora-llama-med")
    assert manifest["recipe"] == "bentsao" and manifest["base_model"] == "llama-7b"
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "baffo32/decapoda-research-llama-7B-hf"
    assert "../llama_model" not in (folder / "adapter" / "adapter_config.json").read_text()
    assert (folder / "README.md").read_text().startswith("# lora-llama-med")  # the repo's own card is kept

    # the same files under a name the registry does not know: the stored path is refused, --base confirms
    result = run("pull", "someone/lora-copy", ok=False)
    assert result.exit_code == 2
    assert "someone/lora-copy: cannot tell its base model" in result.output and "'../llama_model'" in result.output
    assert "--base" in result.output and "lora-copy" not in zoo.entries()
    run("pull", "someone/lora-copy", "--base", "llama-7b")
    assert zoo.get("lora-copy")[2]["recipe"] == "bentsao"  # the only recipe on llama-7b offering lora


def test_pulled_bentsao_adapter_gives_original_logits(olah_env, seed_checkpoints, tmp_path):
    """End to end through medzoo.modeling.load_model: the pulled adapter on a local base folder."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from medzoo.modeling import load_model

    torch.manual_seed(3)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    base_dir = tmp_path / "llama_model"
    base.save_pretrained(base_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(0x4e00 + i): i + 3 for i in range(290)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(base_dir)
    run("pull", "someone/lora-copy", "--base", str(base_dir), "--recipe", "bentsao", "--name", "copy")
    manifest = zoo.get("copy")[2]
    assert manifest["base_model"] == str(base_dir)
    loaded = load_model("copy")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    reference = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir).eval(),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    set_peft_model_state_dict(reference, seed_checkpoints["bentsao_state"])
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(loaded.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_freeze_prefix_is_normalised(olah_env, seed_checkpoints):
    run("pull", "someone/freeze-with-prefix")
    _, folder, manifest = zoo.get("freeze-with-prefix")
    assert manifest["recipe"] == "medqa-chatglm" and manifest["base_model"] == "chatglm-6b"
    assert same(tensors(folder / "trainable.safetensors"), seed_checkpoints["freeze_state"])


def test_second_pull_is_instant_and_offline(olah_env, monkeypatch):
    run("pull", "wangrongsheng/MedQA-ChatGLM-Freeze")
    assert "already in your zoo" in run("pull", "wangrongsheng/MedQA-ChatGLM-Freeze").output
    # offline: the cache answers, the converted folder is rebuilt from it without the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    run("rm", "MedQA-ChatGLM-Freeze")
    assert "MedQA-ChatGLM-Freeze" not in zoo.entries()
    run("pull", "wangrongsheng/MedQA-ChatGLM-Freeze")
    assert zoo.get("MedQA-ChatGLM-Freeze")[2]["layout"] == "freeze"
    # a repo never pulled is not in the cache: offline says so
    result = run("pull", "wangrongsheng/MedQA-ChatGLM-LoRA", ok=False)
    assert result.exit_code == 2 and "not in the local cache and HF_HUB_OFFLINE is set" in result.output


def test_rm_removes_folder(olah_env):
    run("pull", "wangrongsheng/MedQA-ChatGLM-PTuningV2")
    folder = zoo.get("MedQA-ChatGLM-PTuningV2")[1]
    assert folder.is_dir()
    run("rm", "MedQA-ChatGLM-PTuningV2")
    assert not folder.exists() and "MedQA-ChatGLM-PTuningV2" not in zoo.entries()
    result = run("rm", "MedQA-ChatGLM-PTuningV2", ok=False)
    assert result.exit_code == 2 and "'MedQA-ChatGLM-PTuningV2' is not registered" in result.output


@pytest.mark.parametrize("repo, expected", [
    ("acme/does-not-exist", "acme/does-not-exist: repository not found on"),
    ("acme/mystery-weights", "acme/mystery-weights: adapter_model.bin is neither a P-Tuning v2 prefix encoder nor "
                             "Freeze layer weights, and there is no adapter_config.json or config.json; tensors: "
                             "encoder.block.0.weight"),
    ("acme/just-docs", "not a layout medzoo knows (no medzoo.json, adapter_config.json, config.json + weights or "
                       "adapter_model.bin); found: README.md, notes.txt"),
    ("acme/evil-pickle", "adapter_model.bin: not a plain tensor state dict, refused rather than unpickled"),
    ("wangrongsheng/MedQA-ChatGLM-LoRA@no-such-branch", "revision 'no-such-branch' not found"),
    ("bentso", "recipe 'bentso' is not registered; did you mean 'bentsao'?"),
])
def test_pull_errors(olah_env, repo, expected):
    result = run("pull", repo, ok=False)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Traceback" not in result.output
    assert zoo.entries() == {}


def test_unreachable_endpoint(hf_env, monkeypatch):
    from hub_fixtures import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    result = run("pull", "wangrongsheng/MedQA-ChatGLM-LoRA", ok=False)
    assert result.exit_code == 2
    assert "cannot reach http://127.0.0.1:" in result.output and "HF_ENDPOINT" in result.output
    assert zoo.entries() == {}


def test_private_repo_needs_token(hf_env, hub_server, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token=TOKEN)
    api.create_repo("alice/secret-lora", private=True)
    src = tmp_path / "src"
    src.mkdir()
    import torch

    torch.save({"transformer.layers.3.mlp.dense_4h_to_h.bias": torch.ones(4)}, src / "adapter_model.bin")
    api.upload_folder(repo_id="alice/secret-lora", folder_path=src)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    result = run("pull", "alice/secret-lora", ok=False)
    assert result.exit_code == 2
    assert "alice/secret-lora: repository not found" in result.output and "huggingface-cli login" in result.output
    assert "HF_TOKEN" in result.output
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = run("pull", "alice/secret-lora").output
    assert TOKEN not in out
    assert zoo.get("secret-lora")[2]["layout"] == "freeze"
    # a branch that does not exist (this server answers 404 RevisionNotFound, as the Hub does)
    result = run("pull", "alice/secret-lora@v9", "--name", "other", ok=False)
    assert result.exit_code == 2 and "alice/secret-lora: revision 'v9' not found" in result.output


def test_interrupted_pull_registers_nothing_and_resumes(hf_env, hub_server, monkeypatch, tmp_path,
                                                         seed_checkpoints):
    """A download that fails for good leaves nothing registered; the next pull fetches only what is missing
    (finished files stay in the cache) and rides out a dropped connection (the client retries)."""
    import torch
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token=TOKEN)
    api.create_repo("alice/big-freeze")
    src = tmp_path / "src"
    src.mkdir()
    torch.save(seed_checkpoints["freeze_state"], src / "adapter_model.bin")
    (src / "all_results.json").write_text('{"train_loss": 1.5}')
    api.upload_folder(repo_id="alice/big-freeze", folder_path=src)
    assert (src / "adapter_model.bin").stat().st_size > 4096
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    fetched = lambda: [r[1].rsplit("/", 1)[-1] for r in hub_server.state.requests  # noqa: E731
                       if r[0] == "GET" and "/resolve/" in r[1]]

    # the connection drops after 4 KB, then the retry fails: the pull stops
    hub_server.state.faults["adapter_model.bin"] = [("cut", 4096), ("status", 500)]
    result = run("pull", "alice/big-freeze", ok=False)
    assert result.exit_code == 2 and "run the same command again to resume" in result.output
    assert fetched().count("adapter_model.bin") == 2 and "all_results.json" in fetched()
    assert zoo.entries() == {}
    assert not zoo.models_dir().exists() or list(zoo.models_dir().iterdir()) == []

    # next time: only the missing file is fetched; a dropped connection is resumed where it stopped
    hub_server.state.requests.clear()
    hub_server.state.faults["adapter_model.bin"] = [("cut", 4096)]
    run("pull", "alice/big-freeze")
    assert fetched() == ["adapter_model.bin", "adapter_model.bin"]   # all_results.json came from the cache
    assert same(tensors(zoo.get("big-freeze")[1] / "trainable.safetensors"), seed_checkpoints["freeze_state"])


def test_pickles_in_repo_are_never_unpickled(olah_env, olah_repos):
    """The PTuningV2 replica's training_args.bin creates a file when unpickled: pulling must not create it."""
    marker = olah_repos / "UNPICKLED"
    assert not marker.exists()
    run("pull", "wangrongsheng/MedQA-ChatGLM-PTuningV2")
    assert "training_args.bin" in {i["file"] for i in zoo.get("MedQA-ChatGLM-PTuningV2")[2]["ignored"]}
    assert not marker.exists()
    repo = olah_repos / "models/wangrongsheng/MedQA-ChatGLM-PTuningV2"
    oid = (repo / "training_args.bin").read_text().split("sha256:")[1].split()[0]
    pickle.loads((repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid).read_bytes())
    assert marker.exists()   # the trap is real
    marker.unlink()


def test_gated_repo_says_so(hf_env, hub_server, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token=TOKEN)
    api.create_repo("alice/gated")
    hub_server.state.repos["alice/gated"]["gated"] = True
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    result = run("pull", "alice/gated", ok=False)
    assert result.exit_code == 2
    assert f"alice/gated is gated: accept its conditions at {hub_server.url}/alice/gated" in result.output
    assert "HF_TOKEN" in result.output


def test_pull_full_model_converts_bin_to_safetensors(hf_env, hub_server, monkeypatch, tmp_path, tiny_base):
    """A full model published as pytorch_model.bin: pulled into model/ as safetensors, same logits."""
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    from medzoo.modeling import load_model

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    src = tmp_path / "src"
    src.mkdir()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, src / "pytorch_model.bin")
    for f in tiny_base.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, src / f.name)
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags: [bentsao]\n---\n# a full fine-tune\n")
    api = HfApi(endpoint=hub_server.url, token=TOKEN)
    api.create_repo("alice/full-tiny")
    api.upload_folder(repo_id="alice/full-tiny", folder_path=src)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    out = run("pull", "alice/full-tiny", "--base", "medzoo-tiny").output
    _, folder, manifest = zoo.get("full-tiny")
    assert manifest["layout"] == "full" and manifest["recipe"] == "bentsao", out  # from the card's tags
    assert (folder / "model" / "model.safetensors").is_file() and not list(folder.rglob("*.bin"))
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(load_model("full-tiny").model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_local_dir(olah_env, tmp_path):
    target = tmp_path / "elsewhere" / "medqa-freeze"
    run("pull", "wangrongsheng/MedQA-ChatGLM-Freeze", "--local-dir", str(target), "--name", "fz")
    name, folder, manifest = zoo.get("fz")
    assert folder == target.resolve() and (target / "trainable.safetensors").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]   # no temp folder left behind
    out = run("rm", "fz").output
    assert "files kept" in out and target.is_dir() and "fz" not in zoo.entries()
