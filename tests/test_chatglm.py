"""ChatGLM-6B (v1) on today's transformers: tiny random models with the original's tensor names, a sentencepiece
vocabulary trained here with ice_text.model's special pieces."""
import argparse
import json
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medzoo.objects import MedzooError  # noqa: E402

SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]
ZH = "患者发热咳嗽三天医生建议多喝水注意休息高血压糖尿病头痛失眠胃溃疡治疗方法症状检查问答"
EN = "the patient has fever and cough for three days doctor suggests rest water blood pressure".split()


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A small ice_text.model look-alike: <unk>=0, <s>, </s>, <pad>=3, then the user-defined pieces."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        zh = "".join(rng.choice(ZH) for _ in range(rng.randint(4, 16)))
        en = " ".join(rng.choice(EN) for _ in range(rng.randint(2, 8)))
        lines.append(f"{zh} {en}" if rng.random() < 0.5 else f"{en}，{zh}")
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "ice_text"), vocab_size=320,
        model_type="unigram", user_defined_symbols=SPECIAL + WHITESPACE, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        pad_piece="<pad>", character_coverage=1.0, remove_extra_whitespaces=False, minloglevel=2)
    return folder / "ice_text.model"


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    return ChatGLMTokenizer(str(vocab_file))


@pytest.fixture(scope="module")
def config(tokenizer):
    from medzoo.chatglm.configuration import ChatGLMConfig

    return ChatGLMConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=64, num_layers=2, num_attention_heads=4,
                         inner_hidden_size=128, max_sequence_length=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
                         gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id)


def make_model(config, seed=0, **overrides):
    from medzoo.chatglm.configuration import ChatGLMConfig
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration

    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**config.to_dict(), **overrides}))
    return model.eval()


@pytest.fixture(scope="module")
def model(config):
    return make_model(config)


def batch_of(tokenizer, prompts, responses=None):
    """prompt [gMASK] <sop> response <eop>, the prompt masked out of the labels (as medzoo's training does)."""
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        labels = [-100] * len(ids)
        if responses:
            answer = tokenizer(responses[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = ids + answer, labels + answer
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in rows])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
    labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in rows])
    return input_ids, mask, labels


def original_checkpoint(folder: Path, model, vocab_file, shards=2, extra_config=None):
    """The original file layout: .bin shards + index, remote-code config.json and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i in range(model.config.num_layers):  # the original stores its rotary constant
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(head_dim // 4)
    names = sorted(state)
    weight_map = {}
    for n in range(shards):
        part = names[n::shards]
        shard = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update({k: shard for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("transformers_version", "dtype")}
    config.update({"architectures": ["ChatGLMModel"], "torch_dtype": "float32", "transformers_version": "4.23.1",
                   "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}})
    config.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "ice_text.model").write_bytes(Path(vocab_file).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0, "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    return folder


# --- the GLM prefix-LM structure ------------------------------------------------------------------------------
def test_positions_and_mask_follow_the_glm_prefix_lm(config):
    from medzoo.chatglm.modeling import glm_positions_and_mask

    g, s, p = config.gmask_token_id, config.bos_token_id, config.pad_token_id
    ids = torch.tensor([[50, 51, 52, g, s, 60, 61], [p, p, 50, 51, 52, g, s]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    positions, hidden = glm_positions_and_mask(ids, mask, config)
    assert positions[0].tolist() == [[0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]
    assert positions[1].tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1]]
    visible = (~hidden[0, 0]).int().tolist()
    assert visible[0] == [1, 1, 1, 1, 0, 0, 0]  # the prompt sees the whole prompt, not <sop> and after
    assert visible[4] == [1, 1, 1, 1, 1, 0, 0]  # <sop> and later tokens are causal
    assert visible[6] == [1] * 7
    assert (~hidden[1, 0, 6]).int().tolist() == [0, 0, 1, 1, 1, 1, 1]  # pads hidden
    # [MASK] instead of [gMASK]: the answer is positioned at the mask; no <sop>: all bidirectional context.
    ids = torch.tensor([[50, config.mask_token_id, 52, s, 60], [50, 51, 52, 53, 54]])
    positions, hidden = glm_positions_and_mask(ids, None, config)
    assert positions[0].tolist() == [[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]
    assert positions[1].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert not hidden[1].any()


def test_module_names_and_shapes_are_the_originals(model, config):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    h, inner, vocab = config.hidden_size, config.inner_hidden_size, config.vocab_size
    assert shapes["transformer.word_embeddings.weight"] == (vocab, h)
    assert shapes["transformer.layers.1.attention.query_key_value.weight"] == (3 * h, h)
    assert shapes["transformer.layers.1.attention.dense.bias"] == (h,)
    assert shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"] == (inner, h)
    assert shapes["transformer.layers.0.mlp.dense_4h_to_h.weight"] == (h, inner)
    for name in ("input_layernorm", "post_attention_layernorm"):
        assert shapes[f"transformer.layers.0.{name}.weight"] == (h,)
    assert shapes["transformer.final_layernorm.bias"] == (h,)
    assert shapes["lm_head.weight"] == (vocab, h) and "lm_head.bias" not in shapes
    assert len(shapes) == 1 + 12 * config.num_layers + 2 + 1
    assert set(model._no_split_modules) == {"GLMBlock"} and model.supports_gradient_checkpointing


def test_layer_math_matches_the_documented_formulas(model, config):
    """One block recomputed by hand from the module docstring: residual scale, per-layer scaling, 2-D rotary."""
    from medzoo.chatglm.modeling import glm_positions_and_mask

    g, s = config.gmask_token_id, config.bos_token_id
    ids = torch.tensor([[40, 41, 42, g, s, 70]])
    positions, hidden = glm_positions_and_mask(ids, None, config)
    x = torch.randn(1, 6, config.hidden_size)
    block = model.transformer.layers[1]
    with torch.no_grad():
        got, _ = block(x, position_ids=positions, attention_mask=hidden)
        n, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        a = block.input_layernorm(x)
        qkv = block.attention.query_key_value(a).view(1, 6, n, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

        def rope(t, pos):
            r = t.shape[-1]
            inv = (1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)).half().float()
            ang = pos[0].float()[:, None] * inv
            ang = torch.cat([ang, ang], -1)[:, None, :]
            rot = torch.cat([-t[..., r // 2:], t[..., :r // 2]], -1)
            return t * ang.cos() + rot * ang.sin()

        q = torch.cat([rope(q[..., :d // 2], positions[:, 0]), rope(q[..., d // 2:], positions[:, 1])], -1)
        k = torch.cat([rope(k[..., :d // 2], positions[:, 0]), rope(k[..., d // 2:], positions[:, 1])], -1)
        coeff = 2.0  # layer_id 1
        scores = torch.einsum("bqnd,bknd->bnqk", q / (d ** 0.5 * coeff), k)
        scores = scores.masked_fill(hidden, -10000.0) * coeff
        ctx = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(1, 6, n * d)
        alpha = (2 * config.num_layers) ** 0.5
        h1 = a * alpha + block.attention.dense(ctx)
        y = block.post_attention_layernorm(h1)
        u = block.mlp.dense_h_to_4h(y)
        want = y * alpha + block.mlp.dense_4h_to_h(torch.nn.functional.gelu(u, approximate="tanh"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --- loading the original files ---------------------------------------------------------------------------------
def test_load_original_bin_shards_converts_once_to_safetensors(tmp_path, model, config, vocab_file, medzoo_home):
    from medzoo.chatglm.loading import load_chatglm

    source = original_checkpoint(tmp_path / "chatglm-6b", model, vocab_file)
    loaded, tok = load_chatglm(source)
    ids = torch.tensor([tok("患者发热")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    converted = list((medzoo_home / "converted").iterdir())
    assert [p.name.split("@")[0] for p in converted] == ["chatglm-6b"]  # no temporary folder left behind
    folder = converted[0]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    saved_config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in saved_config and saved_config["model_type"] == "chatglm"
    from safetensors import safe_open

    with safe_open(str(folder / "model-00001-of-00002.safetensors"), "pt") as f:
        assert not any("inv_freq" in k for k in f.keys())
    stamp = (folder / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    again, _ = load_chatglm(source)  # second time: the converted copy is reused
    assert (folder / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp
    assert tok.padding_side == "left" and tok.eos_token == "<eop>"


def test_load_from_the_hub_by_repo_id(tmp_path, model, vocab_file, medzoo_home, monkeypatch):
    """Through the real huggingface_hub client against tests/hubserver.py: snapshot, convert, load."""
    from huggingface_hub import HfApi
    from hub_fixtures import TOKEN
    from hubserver import HubServer

    from medzoo.chatglm.loading import load_chatglm

    server = HubServer(tmp_path / "hub-store", {TOKEN: "alice"}).start()
    try:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("alice/chatglm-6b")
        source = original_checkpoint(tmp_path / "upload", model, vocab_file)
        api.upload_folder(repo_id="alice/chatglm-6b", folder_path=source)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        loaded, tok = load_chatglm("alice/chatglm-6b", dtype=torch.float32)
        ids = torch.tensor([tok("头痛失眠")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        (converted,) = (medzoo_home / "converted").iterdir()
        name, commit = converted.name.split("@")
        assert name == "alice--chatglm-6b" and len(commit) == 40
        with pytest.raises(MedzooError, match="alice/missing: cannot download"):
            load_chatglm("alice/missing")
    finally:
        server.stop()


def test_load_safetensors_folder_in_place_and_overrides(tmp_path, model, config, vocab_file, medzoo_home):
    from medzoo.chatglm.loading import load_chatglm
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    ChatGLMTokenizer(str(vocab_file)).save_pretrained(folder)
    loaded, tok = load_chatglm(folder, config_overrides={"pre_seq_len": 4, "prefix_projection": False})
    assert not (medzoo_home / "converted").exists()
    assert loaded.config.pre_seq_len == 4
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    torch.testing.assert_close(loaded.transformer.layers[0].mlp.dense_h_to_4h.weight,
                               model.transformer.layers[0].mlp.dense_h_to_4h.weight)


def test_loading_refuses_what_it_cannot_trust(tmp_path, model, vocab_file, medzoo_home):
    from medzoo.chatglm.loading import load_chatglm

    pickled = original_checkpoint(tmp_path / "pickled", model, vocab_file, shards=1)
    torch.save({"transformer.word_embeddings.weight": torch.zeros(2), "training_args": argparse.Namespace(lr=5e-5)},
               pickled / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(MedzooError, match="tensor-only"):
        load_chatglm(pickled)
    leftovers = list((medzoo_home / "converted").iterdir()) if (medzoo_home / "converted").exists() else []
    assert leftovers == []  # the failed conversion left neither a result nor a temporary folder

    v2 = original_checkpoint(tmp_path / "chatglm2", model, vocab_file, extra_config={"multi_query_attention": True})
    with pytest.raises(MedzooError, match="ChatGLM2"):
        load_chatglm(v2)
    with pytest.raises(MedzooError, match="no config.json"):
        load_chatglm(tmp_path)


# --- training and generation ------------------------------------------------------------------------------------
def test_forward_backward_and_gradient_checkpointing(config, tokenizer):
    model = make_model(config).train()
    input_ids, mask, labels = batch_of(tokenizer, ["患者发热", "高血压 the patient"], ["多喝水", "注意休息 rest"])
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["transformer.layers.0.attention.query_key_value.weight"].abs().sum() > 0
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.transformer.layers)
    again = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    again.loss.backward()
    torch.testing.assert_close(again.loss, out.loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)
    # labels only on the answer: changing the loss-masked prompt labels changes nothing
    labels_all = input_ids.masked_fill(mask == 0, -100)
    assert model(input_ids=input_ids, attention_mask=mask, labels=labels_all).loss.item() != out.loss.item()


def test_generation_with_and_without_cache_agree(model, tokenizer):
    input_ids, mask, _ = batch_of(tokenizer, ["患者发热咳嗽三天"])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=3)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert cached.shape[1] == input_ids.shape[1] + 12
    assert cached.tolist() == uncached.tolist()
    # the last step's logits from the cache equal a full forward over the whole sequence
    out = model(cached[:, :-1], use_cache=True)
    full = model(cached).logits[:, -1]
    from medzoo.chatglm.modeling import glm_positions_and_mask

    positions, _ = glm_positions_and_mask(cached, None, model.config)
    step = model(cached[:, -1:], past_key_values=out.past_key_values, position_ids=positions[..., -1:]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_generation_matches_unbatched(model, tokenizer):
    prompts = ["患者发热咳嗽三天 the patient", "头痛"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][1, 0] == 0 and enc["input_ids"][1, 0] == tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    batched = model.generate(**enc, **kwargs)
    width = enc["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt")
        single = model.generate(**alone, **kwargs)
        assert batched[row, width:].tolist() == single[0, alone["input_ids"].shape[1]:].tolist()


# --- tuning methods ----------------------------------------------------------------------------------------------
def test_lora_on_query_key_value_trains_and_reloads(tmp_path, config, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_model(config)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["query_key_value"],
                                           task_type="CAUSAL_LM"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("query_key_value.lora_" in n for n in trainable)
    input_ids, mask, labels = batch_of(tokenizer, ["患者发热", "高血压"], ["多喝水 rest", "注意休息"])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(6):
        loss = lora(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        want = lora(input_ids=input_ids, attention_mask=mask).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model(config), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=mask).logits, want)
        assert not torch.allclose(make_model(config)(input_ids=input_ids, attention_mask=mask).logits, want)


def test_freeze_trains_only_the_last_layers_mlp(config, tokenizer):
    model = make_model(config).train()
    last = [config.num_layers - 1]  # MedQA-ChatGLM: the last 3 of 28; here the last 1 of 2
    for name, param in model.named_parameters():
        param.requires_grad = any(f"layers.{i}.mlp." in name for i in last)
    input_ids, mask, labels = batch_of(tokenizer, ["患者发热"], ["多喝水"])
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {f"transformer.layers.1.mlp.{m}.{w}" for m in ("dense_h_to_4h", "dense_4h_to_h")
                         for w in ("weight", "bias")}


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_v2_prefix(tmp_path, config, tokenizer, projection):
    from safetensors.torch import load_file, save_file

    base = make_model(config)
    tuned = make_model(config, seed=0, pre_seq_len=4, prefix_projection=projection)
    tuned.load_state_dict(base.state_dict(), strict=False)  # same base weights, random prefix
    prefix_names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    width = 2 * config.num_layers * config.hidden_size
    if projection:
        assert prefix_names == {"transformer.prefix_encoder.embedding.weight"} | {
            f"transformer.prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
        assert tuned.transformer.prefix_encoder.trans[2].weight.shape == (width, config.hidden_size)
    else:
        assert prefix_names == {"transformer.prefix_encoder.embedding.weight"}
        assert tuned.transformer.prefix_encoder.embedding.weight.shape == (4, width)  # 16 x 229376 for 6B

    input_ids, mask, labels = batch_of(tokenizer, ["患者发热", "高血压 the patient"], ["多喝水", "rest"])
    with torch.no_grad():
        plain = base(input_ids=input_ids, attention_mask=mask).logits
        prefixed = tuned(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(plain, prefixed)

    tuned.train()
    tuned(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tuned.named_parameters() if n in prefix_names)
    assert all(p.grad is None for n, p in tuned.named_parameters() if n not in prefix_names)
    tuned.zero_grad()
    tuned.transformer.prefix_dropout.p = 0.0  # the same prefix twice, so the two backward passes compare
    tuned(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if n in prefix_names}
    tuned.zero_grad()
    tuned.gradient_checkpointing_enable()  # the prefix reaches checkpointed layers as positional inputs
    tuned(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(tuned.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)
    tuned.gradient_checkpointing_disable()
    tuned.transformer.prefix_dropout.p = 0.1
    tuned.eval()

    state = {k: v for k, v in tuned.state_dict().items() if "prefix_encoder" in k}
    save_file(state, str(tmp_path / "prefix.safetensors"))
    fresh = make_model(config, seed=1, pre_seq_len=4, prefix_projection=projection)
    fresh.load_state_dict(base.state_dict(), strict=False)
    fresh.load_state_dict(load_file(str(tmp_path / "prefix.safetensors")), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=input_ids, attention_mask=mask).logits, prefixed)

    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                  pad_token_id=tokenizer.pad_token_id)
    assert fresh.generate(input_ids, use_cache=True, **kwargs).tolist() == \
        fresh.generate(input_ids, use_cache=False, **kwargs).tolist()


def test_auto_classes_round_trip_after_register(tmp_path, model, tokenizer, vocab_file):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from medzoo.chatglm.loading import register
    from medzoo.chatglm.modeling import ChatGLMModel
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    register()
    register()  # idempotent
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([tokenizer("患者发热咳嗽")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "m"), ChatGLMModel)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert isinstance(tok, ChatGLMTokenizer) and tok("患者")["input_ids"] == tokenizer("患者")["input_ids"]
    # an original config.json (remote-code auto_map) loads into medzoo's class without trust_remote_code
    source = original_checkpoint(tmp_path / "orig", model, vocab_file, shards=1)
    cfg = AutoConfig.from_pretrained(source)
    assert type(cfg).__name__ == "ChatGLMConfig" and cfg.num_layers == 2 and not hasattr(cfg, "auto_map")


# --- tokenizer ---------------------------------------------------------------------------------------------------
def test_tokenizer_whitespace_rules(tokenizer):
    tokens = tokenizer.tokenize("患者\n发热\t咳嗽  三天" + " " * 5 + "医生" + " " * 81 + "rest")
    assert "<n>" in tokens and "<|tab|>" in tokens
    assert "<|blank_2|>" in tokens and "<|blank_5|>" in tokens and "<|blank_80|>" in tokens
    assert not any(t.startswith("<|blank_") and t not in {"<|blank_2|>", "<|blank_5|>", "<|blank_80|>"}
                   for t in tokens)
    for text in ["患者\n发热", "a\tb", "患者  发热    咳嗽", "医生" + " " * 80 + "rest", "the" + " " * 81 + "water",
                 "the patient has fever\n\n多喝水", "line one\n\tindented  twice"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_prompt_layout(tokenizer, vocab_file):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
    assert tokenizer.bos_token == "<sop>" and tokenizer.bos_token_id == sp.piece_to_id("<sop>")
    assert tokenizer.eos_token == "<eop>" and tokenizer.eos_token_id == sp.piece_to_id("<eop>")
    assert tokenizer.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert tokenizer.mask_token_id == sp.piece_to_id("[MASK]")
    assert tokenizer.pad_token_id == 3 and tokenizer.padding_side == "left"
    prompt = tokenizer("患者发热")["input_ids"]
    bare = tokenizer("患者发热", add_special_tokens=False)["input_ids"]
    assert prompt == bare + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    pair = tokenizer("患者发热", "多喝水")["input_ids"]
    answer = tokenizer("多喝水", add_special_tokens=False)["input_ids"]
    assert pair == prompt + answer + [tokenizer.eos_token_id]
    assert tokenizer.decode(pair, skip_special_tokens=True).replace(" ", "") == "患者发热多喝水"
    # special tokens written in the text are single tokens
    assert tokenizer("[gMASK]<sop>", add_special_tokens=False)["input_ids"][-2:] == [
        tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert len(tokenizer.get_vocab()) == tokenizer.vocab_size == sp.get_piece_size()


def test_tokenizer_image_token_offset(vocab_file, tokenizer):
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    old = ChatGLMTokenizer(str(vocab_file), num_image_tokens=20000)  # the pre-April-2023 vocabulary
    text = "患者发热\n the patient"
    assert old(text)["input_ids"] == [i + 20000 for i in tokenizer(text)["input_ids"]]
    assert old.bos_token_id == tokenizer.bos_token_id + 20000
    assert old.vocab_size == tokenizer.vocab_size + 20000
    assert old.convert_ids_to_tokens(7) == "<image_7>" and old.convert_tokens_to_ids("<image_7>") == 7
    assert old.decode(old(text, add_special_tokens=False)["input_ids"]) == text


def test_ids_past_the_vocabulary_decode_to_nothing(tokenizer):
    ids = tokenizer("头痛 fever", add_special_tokens=False).input_ids
    past = tokenizer.num_image_tokens + tokenizer.sp.get_piece_size()
    assert tokenizer.decode(ids + [past, past + 100]) == tokenizer.decode(ids)


def test_tokenizer_left_padding_and_save_reload(tmp_path, tokenizer):
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    enc = tokenizer(["头痛", "患者发热咳嗽三天"], padding=True)
    short, long = enc["input_ids"]
    assert len(short) == len(long)
    n_pad = len(long) - len(tokenizer("头痛")["input_ids"])
    assert short[:n_pad] == [tokenizer.pad_token_id] * n_pad and enc["attention_mask"][0][:n_pad] == [0] * n_pad
    assert tokenizer.decode(short, skip_special_tokens=True).strip() == "头痛"
    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "ice_text.model").is_file()
    saved = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved["num_image_tokens"] == 0
    again = ChatGLMTokenizer.from_pretrained(tmp_path / "tok")
    text = "患者\n发热  三天\t the patient"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.padding_side == "left" and again.eos_token == "<eop>"
    with pytest.raises(MedzooError, match="ice_text.model"):
        ChatGLMTokenizer(str(tmp_path / "missing.model"))


def test_package_import_stays_light():
    import subprocess
    import sys

    code = "import sys, medzoo.chatglm; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
