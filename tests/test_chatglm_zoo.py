"""Issue 7 end to end: the three MedQA-ChatGLM checkpoints (LoRA, Freeze, P-Tuning v2) pulled from their Hub
replicas, and QingGeng / Med-ChatGLM style runs, all `chat`, `merge` and train through medzoo on today's
transformers, with medzoo's native ChatGLM-6B.

The replicas (tests/hub_fixtures.py) hold weights for a tiny ChatGLM-6B of shape CHATGLM_TINY; the base folder
built here has that shape and an ``ice_text.model``-style sentencepiece vocabulary whose special ids are the
config's (<pad> 3, <sop> 4, <eop> 5, [MASK] 6, [gMASK] 7). Every answer medzoo gives is checked against the
same model put together by hand (native base + the published tensors applied as the original project did) and
decoded greedily by a plain argmax loop."""
import json

import pytest
import yaml
from click.testing import CliRunner

from hub_fixtures import CHATGLM_TINY, PRE_SEQ_LEN

torch = pytest.importorskip("torch")

from medzoo import zoo  # noqa: E402
from medzoo.cli import main  # noqa: E402

REPOS = {"lora": "wangrongsheng/MedQA-ChatGLM-LoRA", "freeze": "wangrongsheng/MedQA-ChatGLM-Freeze",
         "ptuning-v2": "wangrongsheng/MedQA-ChatGLM-PTuningV2"}
NAMES = {k: v.split("/")[1] for k, v in REPOS.items()}
QUESTION = "患者发热咳嗽三天怎么办"
STEPS = 8
SPECIAL = ["<sop>", "<eop>", "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<ENC>", "<dBLOCK>"]  # ids 4..11
WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]
ZH = "患者发热咳嗽三天医生建议多喝水注意休息高血压糖尿病头痛失眠胃溃疡治疗方法症状检查怎么办问答"
PROBE = [20, 30, 40, 50, CHATGLM_TINY["gmask_token_id"], CHATGLM_TINY["bos_token_id"], 60, 70]


def run(*args, input=None, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medqa_base(tmp_path_factory):
    """A tiny native ChatGLM-6B folder (config.json + model.safetensors + ice_text.model) of the replicas' shape."""
    import random

    import sentencepiece as spm

    from medzoo.chatglm.configuration import ChatGLMConfig
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    work = tmp_path_factory.mktemp("medqa-base")
    rng = random.Random(0)
    lines = ["".join(rng.choice(ZH) for _ in range(rng.randint(4, 16))) for _ in range(300)]
    lines += [f"[Round {i % 10}] 问：" + "".join(rng.choice(ZH) for _ in range(6)) + " 答："
              + "".join(rng.choice(ZH) for _ in range(6)) for i in range(50)]
    (work / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "ice_text"), vocab_size=CHATGLM_TINY["vocab_size"],
        model_type="unigram", user_defined_symbols=SPECIAL + WHITESPACE, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        pad_piece="<pad>", character_coverage=1.0, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    tok = ChatGLMTokenizer(str(work / "ice_text.model"))
    assert tok.vocab_size == CHATGLM_TINY["vocab_size"]   # every id the model can emit decodes
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.gmask_token_id) == \
        tuple(CHATGLM_TINY[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id",
                                        "gmask_token_id"))
    torch.manual_seed(6)   # a base on which each of the three checkpoints changes the greedy answers
    folder = work / "chatglm-tiny"
    ChatGLMForConditionalGeneration(ChatGLMConfig(**CHATGLM_TINY)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def chatglm_base(tmp_path_factory):
    """train_fixtures' tiny native ChatGLM-6B (vocabulary from the bundled samples), without the session's
    train_bases fixture, which also pre-trains medzoo-tiny for the Llama/GLM bases this file does not use."""
    from train_fixtures import make_chatglm

    folder = make_chatglm(tmp_path_factory.mktemp("train-chatglm") / "chatglm")
    if folder is None:
        pytest.skip("medzoo.chatglm not available")
    return folder


@pytest.fixture
def pulled(olah_env):
    """The three MedQA-ChatGLM replicas pulled into this test's zoo."""
    for repo in REPOS.values():
        run("pull", repo)
    return NAMES


def by_hand(base, kind, seed_checkpoints):
    """The native ChatGLM base with the published tensors applied as MedQA-ChatGLM did: peft LoRA on
    query_key_value (r 8, alpha 32); the Freeze state dict loaded over the last 3 MLPs; the prefix encoder
    state dict on a base built with pre_seq_len 16, prefix_projection False."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from medzoo.chatglm.loading import read_config
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration

    overrides = {"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False} if kind == "ptuning-v2" else {}
    model = ChatGLMForConditionalGeneration.from_pretrained(str(base), config=read_config(base, overrides)).eval()
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                 target_modules=["query_key_value"], task_type="CAUSAL_LM"))
        set_peft_model_state_dict(model, seed_checkpoints["lora_state"])
    elif kind in ("freeze", "ptuning-v2"):
        state = seed_checkpoints["freeze_state" if kind == "freeze" else "prefix_state"]
        _, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(state) <= set(model.state_dict())
    return model.eval()


def greedy(model, ids, steps=STEPS, eos=CHATGLM_TINY["eos_token_id"]):
    """Plain argmax decoding, one full forward per token (no cache, no generate())."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
    return new


def answer_text(tokenizer, new, stop="[Round"):
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text.split(stop)[0].strip()


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def tokenizer_of(folder):
    from medzoo.chatglm.loading import load_tokenizer

    return load_tokenizer(folder)


# --- 1. chat on the three pulled checkpoints --------------------------------------------------------------------
def test_prompt_is_chatglm_template_plus_gmask_sop(pulled, medqa_base):
    from medzoo import generate
    from medzoo.modeling import load_model

    lm = load_model(pulled["lora"], base=str(medqa_base), device="cpu")
    assert lm.template.name == "chatglm-6b" and lm.manifest["recipe"] == "medqa-chatglm"
    tok = lm.tokenizer
    bare = tok.sp.encode(QUESTION)   # the sentencepiece ids themselves (num_image_tokens 0)
    ids = generate.encode(lm, QUESTION)
    assert ids == bare + [7, 4]   # no history: the bare query, then [gMASK] <sop>
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["[gMASK]", "<sop>"]


@pytest.mark.parametrize("kind", ["lora", "freeze", "ptuning-v2"])
def test_chat_answers_as_the_original_would(kind, pulled, medqa_base, seed_checkpoints):
    name = pulled[kind]
    manifest = zoo.get(name)[2]
    assert manifest["base_model"] == "chatglm-6b" and manifest["method"] == kind
    out = run("chat", name, "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS, "--base", medqa_base).output

    tok = tokenizer_of(medqa_base)
    prompt = tok.sp.encode(QUESTION) + [tok.gmask_token_id, tok.bos_token_id]
    tuned_ids = greedy(by_hand(medqa_base, kind, seed_checkpoints), prompt)
    plain_ids = greedy(by_hand(medqa_base, "base", seed_checkpoints), prompt)
    assert tuned_ids != plain_ids   # the weights matter: applying the wrong ones (or none) changes the answer
    expected = answer_text(tok, tuned_ids)
    assert expected and out.strip() == expected

    data = json.loads(run("chat", name, "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS, "--json",
                          "--base", medqa_base).output)
    assert data["answer"] == expected and data["model"] == name
    assert (data["recipe"], data["method"], data["template"]) == ("medqa-chatglm", kind, "chatglm-6b")
    assert data["prompt_tokens"] == len(prompt) and data["tokens"] == len(tuned_ids)
    assert data["finish_reason"] == ("stop" if tuned_ids[-1] == tok.eos_token_id else "length")


# --- 2. merge ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "freeze"])
def test_merge_gives_standalone_chatglm(kind, pulled, medqa_base, seed_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medzoo.chatglm import register

    out = tmp_path / "merged"
    result = run("merge", pulled[kind], "--out", out, "--base", medqa_base, "--device", "cpu")
    assert "wrote" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config.get("pre_seq_len") in (None, 0)
    assert not list(out.glob("adapter*")) and list(out.glob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "medzoo.chatglm" in card and "register()" in card   # plain transformers has no ChatGLM-6B class
    assert "medzoo.chatglm" in result.output
    manifest = json.loads((out / zoo.MANIFEST).read_text())
    assert manifest["layout"] == "full" and manifest["merged"] is True and manifest["template"] == "chatglm-6b"

    register()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert AutoTokenizer.from_pretrained(str(out)).sp.encode(QUESTION) == tokenizer_of(medqa_base).sp.encode(QUESTION)
    reference = by_hand(medqa_base, kind, seed_checkpoints)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    assert (logits(model) - logits(by_hand(medqa_base, "base", seed_checkpoints))).abs().max() > 1e-3

    # the export is a zoo model of its own: chat on the folder answers as the pulled model did
    pulled_answer = run("chat", pulled[kind], "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS,
                        "--base", medqa_base).output
    assert run("chat", out, "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS).output == pulled_answer


def test_merge_ptuning_exports_base_plus_prefix(pulled, medqa_base, seed_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from medzoo.chatglm import register
    from medzoo.modeling import load_model

    out = tmp_path / "pt"
    said = run("merge", pulled["ptuning-v2"], "--out", out, "--base", medqa_base).output
    assert "cannot be merged into the weights" in said and "prefix encoder" in said
    assert "medzoo.chatglm.register()" in said
    assert "plain transformers loads only the base" not in said   # the prefix is inside the exported weights
    manifest = json.loads((out / zoo.MANIFEST).read_text())
    assert manifest["merged"] is False and manifest["method"] == "ptuning-v2" and manifest["layout"] == "full"
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == PRE_SEQ_LEN and config["prefix_projection"] is False
    assert "cannot be merged" in (out / "README.md").read_text()

    reference = by_hand(medqa_base, "ptuning-v2", seed_checkpoints)
    register()
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(plain.transformer.prefix_encoder.embedding.weight,
                               seed_checkpoints["prefix_state"]["transformer.prefix_encoder.embedding.weight"])
    torch.testing.assert_close(logits(plain), logits(reference), atol=1e-5, rtol=1e-5)
    loaded = load_model(str(out), device="cpu")
    torch.testing.assert_close(logits(loaded.model), logits(reference), atol=1e-5, rtol=1e-5)
    assert (logits(reference) - logits(by_hand(medqa_base, "base", seed_checkpoints))).abs().max() > 1e-3


# --- 3. QingGeng / Med-ChatGLM style runs --------------------------------------------------------------------
def _train(recipe, base, folder, *extra):
    run("train", recipe, "--base", base, "--sample", "--max-steps", 2, "--profile", "cpu-demo", "--val-size", 0,
        "--output-dir", folder, "--name", folder.name, "--quiet", *extra)
    manifest = json.loads((folder / zoo.MANIFEST).read_text())
    assert zoo.get(folder.name)[1] == folder.resolve()
    return manifest


def test_cpu_demo_warmup_replaces_qinggengs_5000_steps():
    from medzoo import host, recipes

    cat = host.catalog()
    qinggeng = cat.recipes["qinggeng"]
    assert recipes.resolve(cat, qinggeng)["training"]["warmup_steps"] == 5000       # the seed's profile: as published
    demo = recipes.resolve(cat, qinggeng, profile="cpu-demo")["training"]
    assert (demo["warmup_steps"], demo["warmup_ratio"]) == (0, 0.05)
    assert recipes.resolve(cat, qinggeng, profile="cpu-demo",
                           overrides={"warmup_steps": 7})["training"]["warmup_steps"] == 7   # the user still wins


def test_qinggeng_run_trains_chats_and_merges(chatglm_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medzoo import generate
    from medzoo.chatglm import register
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
    from medzoo.modeling import load_model

    base = chatglm_base
    manifest = _train("qinggeng", base, tmp_path / "qg", "--lr", 1e-2)
    assert (manifest["recipe"], manifest["method"], manifest["layout"]) == ("qinggeng", "lora", "peft")
    training = yaml.safe_load((tmp_path / "qg" / "config.yaml").read_text())["training"]
    # Lion as the original; cpu-demo's warm-up replaces QingGeng's 5000 steps (a 2-step run would not move)
    assert training["optimizer"] == "lion" and training["warmup_steps"] == 0
    lm = load_model("qg", device="cpu")
    tok = lm.tokenizer
    # no template: tok(input) + [gMASK] + <sop>
    assert generate.encode(lm, QUESTION) == tok.sp.encode(QUESTION) + [tok.gmask_token_id, tok.bos_token_id]

    hand = PeftModel.from_pretrained(ChatGLMForConditionalGeneration.from_pretrained(str(base)),
                                     str(tmp_path / "qg" / "adapter")).eval()
    prompt = generate.encode(lm, QUESTION)
    expected = answer_text(tok, greedy(hand, prompt, eos=tok.eos_token_id), stop="\x00")
    out = run("chat", "qg", "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS).output
    assert expected and out.strip() == expected
    plain = ChatGLMForConditionalGeneration.from_pretrained(str(base)).eval()
    assert (logits(hand, prompt) - logits(plain, prompt)).abs().max() > 1e-4   # the run changed the model

    out_dir = tmp_path / "qg-merged"
    run("merge", "qg", "--out", out_dir)
    register()
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    torch.testing.assert_close(logits(merged, prompt), logits(hand, prompt), atol=1e-5, rtol=1e-5)
    assert run("chat", out_dir, "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS).output.strip() == expected


def test_med_chatglm_full_run_trains_chats_and_merges(chatglm_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from medzoo import generate
    from medzoo.chatglm import register
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
    from medzoo.modeling import load_model

    base = chatglm_base
    manifest = _train("med-chatglm", base, tmp_path / "mc", "--method", "full")
    assert (manifest["recipe"], manifest["method"], manifest["layout"]) == ("med-chatglm", "full", "full")
    lm = load_model("mc", device="cpu")
    tok = lm.tokenizer
    prompt = generate.encode(lm, QUESTION)
    assert prompt == tok(f"问题：{QUESTION}\n回答: ", add_special_tokens=False).input_ids + [tok.gmask_token_id,
                                                                                           tok.bos_token_id]
    hand = ChatGLMForConditionalGeneration.from_pretrained(str(tmp_path / "mc" / "model")).eval()
    plain = ChatGLMForConditionalGeneration.from_pretrained(str(base)).eval()
    assert (logits(hand, prompt) - logits(plain, prompt)).abs().max() > 1e-4
    expected = answer_text(tok, greedy(hand, prompt, eos=tok.eos_token_id), stop="问题：")
    out = run("chat", "mc", "-p", QUESTION, "--greedy", "--max-new-tokens", STEPS).output
    assert expected and out.strip() == expected

    out_dir = tmp_path / "mc-merged"
    run("merge", "mc", "--out", out_dir)
    register()
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    torch.testing.assert_close(logits(merged, prompt), logits(hand, prompt), atol=1e-5, rtol=1e-5)


# --- 4. multi-turn ---------------------------------------------------------------------------------------------
def test_history_is_rendered_in_rounds(pulled, medqa_base):
    from medzoo import generate
    from medzoo.modeling import load_model

    lm = load_model(pulled["freeze"], base=str(medqa_base), device="cpu")
    tok = lm.tokenizer
    history = [("头痛怎么办", "注意休息"), ("失眠怎么办", "多喝水")]
    text = "[Round 0]\n问：头痛怎么办\n答：注意休息\n[Round 1]\n问：失眠怎么办\n答：多喝水\n[Round 2]\n问：" \
           + QUESTION + "\n答："
    ids = generate.encode(lm, QUESTION, history)
    assert ids == tok(text, add_special_tokens=False).input_ids + [7, 4]
    assert tok.convert_tokens_to_ids("<n>") in ids   # newlines are ChatGLM's <n> piece
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_interactive_chat_keeps_the_history(pulled, medqa_base, seed_checkpoints):
    q1, q2 = "头痛怎么办", "失眠怎么办"
    out = run("chat", pulled["lora"], "--greedy", "--max-new-tokens", STEPS, "--base", medqa_base,
              input=f"{q1}\n{q2}\n/exit\n").output
    answers = [part.split("\n\n用户>")[0].strip() for part in out.split("模型> ")[1:]]
    assert len(answers) == 2, out

    tok = tokenizer_of(medqa_base)
    model = by_hand(medqa_base, "lora", seed_checkpoints)
    a1 = answer_text(tok, greedy(model, tok(q1).input_ids))
    assert tok(q1).input_ids[-2:] == [7, 4] and answers[0] == a1
    second = f"[Round 0]\n问：{q1}\n答：{a1}\n[Round 1]\n问：{q2}\n答："
    a2 = answer_text(tok, greedy(model, tok(second).input_ids))
    assert answers[1] == a2
    assert a2 != answer_text(tok, greedy(model, tok(q2).input_ids))   # the history reached the model
