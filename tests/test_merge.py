"""`medzoo merge`: a standalone export that plain transformers loads, with the same logits as base + adapter.

Tolerance: merged vs. base+adapter logits agree to atol 1e-5 in fp32 (LoRA's merge reorders one matmul sum)."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from medzoo.cli import main

ATOL = 1e-5
TEXT = "下面是一个问题，运用医学知识来正确回答提问.\n### 问题:\n偏头痛有哪些症状？\n### 回答:\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def logits(model, tokenizer):
    import torch

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def plain_load(folder):
    """What a user without medzoo does: nothing but transformers, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(folder) / "config.json").read_text())
    assert "auto_map" not in config  # no code from medzoo or anywhere else is needed
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_merged_export_loads_in_plain_transformers_with_equal_logits(tiny_models, tiny_base, tmp_path, method):
    from medzoo.modeling import load_model

    out = tmp_path / "export"
    result = run("merge", tiny_models[method], "--out", out, "--max-shard-size", "300KB", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["merged"] is True and Path(info["out"]) == out.resolve()

    tuned = load_model(str(tiny_models[method]))
    expected = logits(tuned.model, tuned.tokenizer)
    model, tokenizer = plain_load(out)
    got = logits(model, tokenizer)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL
    base, base_tok = plain_load(tiny_base)
    assert (logits(base, base_tok) - expected).abs().max().item() > 1e-3  # the export is not just the base

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded by --max-shard-size
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["num_beams"] == 4 and generation["max_new_tokens"] == 256  # BenTsao's infer.py
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "### 回答:" in card and method in card
    manifest = json.loads((out / "medzoo.json").read_text())
    assert manifest["layout"] == "full" and manifest["template"] == "bentsao-med"
    assert not list(tmp_path.glob(".export.*"))  # no temp folder left behind


def test_registered_export_chats_like_the_original(tiny_models, tmp_path):
    out = tmp_path / "merged"
    assert run("merge", tiny_models["lora"], "--out", out, "--register", "tiny-merged").exit_code == 0
    listed = run("list", "--local", "--json")
    assert "tiny-merged" in json.loads(listed.output)
    answers = []
    for model in (tiny_models["lora"], "tiny-merged"):
        r = run("chat", model, "-p", "偏头痛有哪些症状？", "--greedy", "--max-new-tokens", "24", "--json")
        assert r.exit_code == 0, r.output
        answers.append(json.loads(r.output)["answer"])
    assert answers[0] == answers[1]


def test_ptuning_exports_base_plus_prefix(tiny_models, tiny_base, tmp_path):
    from medzoo.modeling import load_model

    out = tmp_path / "pt"
    result = run("merge", tiny_models["ptuning-v2"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "cannot be merged" in result.output and "plain transformers loads only the base" in result.output
    assert (out / "adapter" / "adapter_config.json").is_file()
    tuned = load_model(str(tiny_models["ptuning-v2"]))
    again = load_model(str(out))
    assert (logits(again.model, again.tokenizer) - logits(tuned.model, tuned.tokenizer)).abs().max() <= ATOL
    model, tokenizer = plain_load(out)
    base, base_tok = plain_load(tiny_base)
    assert (logits(model, tokenizer) - logits(base, base_tok)).abs().max() <= ATOL


def test_merge_refuses_clearly(tiny_models, tmp_path):
    tmp_path = tmp_path / "work"  # (the test's MEDZOO_HOME lives in the real tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("x")
    cases = [
        (("merge", tiny_models["lora"], "--out", taken), "not empty"),
        (("merge", "no-such-model", "--out", tmp_path / "a"), "no-such-model"),
        (("merge", "bentsao", "--out", tmp_path / "b", "--base", "medzoo-tiny"), "nothing to merge"),
        (("merge", tiny_models["lora"], "--out", tmp_path / "c", "--max-shard-size", "lots"), "nothing written"),
        (("merge", tiny_models["lora"], "--out", tmp_path / "d", "--register", "bad name"), "zoo name"),
        (("merge", tiny_models["lora"], "--out", tmp_path / "e", "--load-in-4bit"), "CUDA"),
    ]
    for args, words in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output
    assert (taken / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written


def test_corrupt_adapter_is_named(tiny_models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["lora"], bad)
    weights = bad / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = run("merge", bad, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "adapter_model.safetensors" in result.output and "corrupt" in result.output
    assert not (tmp_path / "out").exists()
