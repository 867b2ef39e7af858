"""`medzoo push` against tests/hubserver.py through the real huggingface_hub client, and the round trip
push -> pull -> same files, same logits."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from hub_fixtures import TOKEN

from medzoo import cards, zoo
from medzoo.cli import main

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def run(*args, ok=True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def run_folder(tiny_models, tiny_base, tmp_path):
    """A trained-run folder on medzoo-tiny as train writes it: adapter, tokenizer, config, metrics, plot,
    checkpoints (with a pickle that must never be pushed)."""
    folder = tmp_path / "runs" / "bentsao-20261121-101500"
    shutil.copytree(tiny_models["lora"], folder)
    manifest = json.loads((folder / "medzoo.json").read_text())
    manifest.update(source="train:runs/bentsao-20261121-101500", base_model_id="local:medzoo-tiny",
                    method_params={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    (folder / "medzoo.json").write_text(json.dumps(manifest))
    (folder / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_base / name).is_file():
            shutil.copy(tiny_base / name, folder / "tokenizer" / name)
    (folder / "config.yaml").write_text("# medzoo train bentsao --profile cpu-demo\nrecipe: bentsao\n"
                                        "profile: cpu-demo\nmethod: lora\ndatasets: [huatuo-kg]\nepochs: 1\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 4, "loss": 3.0 - s / 4}) + "\n"
                                                  for s in range(1, 5)))
    (folder / "loss.png").write_bytes(PNG)
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"\x80\x04N.")
    (folder / "notes.txt").write_text("my notes\n")
    return folder


@pytest.fixture
def hub_env(hf_env, hub_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub_server


def remote_files(server, repo_id, branch="main"):
    repo = server.state.repos[repo_id]
    return sorted(repo["commits"][repo["branches"][branch]]["files"])


EXPECTED = [".gitattributes", "README.md", "adapter/README.md", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "config.yaml", "loss.png", "medzoo.json", "metrics.jsonl",
            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


def test_dry_run_lists_exactly_and_uploads_nothing(hub_env, run_folder):
    out = run("push", str(run_folder), "alice/bentsao-tiny", "--dry-run").output
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "skipped" not in line]
    expected = [p for p in EXPECTED if p != ".gitattributes" and (p != "adapter/README.md" or
                                                                 (run_folder / "adapter/README.md").exists())]
    assert listed == expected
    size = (run_folder / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"adapter/adapter_model.safetensors  {size / 1024:.1f} KB" in out
    assert "skipped checkpoints/: intermediate training checkpoints are never pushed" in out
    assert "skipped notes.txt: not part of a medzoo model folder" in out
    assert hub_env.state.repos == {}          # nothing created, nothing uploaded
    assert not [r for r in hub_env.state.requests if r[0] != "GET"]


def test_push_then_repush_makes_no_commit(hub_env, run_folder):
    from huggingface_hub import HfApi

    out = run("push", str(run_folder), "alice/bentsao-tiny", "--private").output
    assert TOKEN not in out
    assert "pushed" in out
    expected = [p for p in EXPECTED if p != "adapter/README.md" or (run_folder / "adapter/README.md").exists()]
    assert remote_files(hub_env, "alice/bentsao-tiny") == expected
    assert not [p for p in remote_files(hub_env, "alice/bentsao-tiny") if p.endswith((".bin", ".pt"))]
    assert hub_env.state.repos["alice/bentsao-tiny"]["private"] is True
    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    card = api.model_info("alice/bentsao-tiny").card_data.to_dict()
    assert card["library_name"] == "peft" and "zh" in card["language"]
    assert {"medical", "medzoo", "bentsao"} <= set(card["tags"])
    assert "base_model" not in card           # a local base is no Hub id
    readme = hub_env.state.read_blob(hub_env.state.repos["alice/bentsao-tiny"]["commits"][
        hub_env.state.repos["alice/bentsao-tiny"]["branches"]["main"]]["files"]["README.md"]["sha256"]).decode()
    assert "| final loss | 2.0 |" in readme and "cpu-demo" in readme
    meta = cards.split(readme, "README.md")[0]
    assert set(cards.REQUIRED) - set(meta) == {"base_model"}

    commits = len(hub_env.state.repos["alice/bentsao-tiny"]["commits"])
    sha = api.repo_info("alice/bentsao-tiny").sha
    out = run("push", str(run_folder), "alice/bentsao-tiny").output
    assert "up to date: nothing uploaded, no new commit" in out
    assert len(hub_env.state.repos["alice/bentsao-tiny"]["commits"]) == commits
    assert api.repo_info("alice/bentsao-tiny").sha == sha
    assert len([r for r in hub_env.state.requests if "/commit/" in r[1]]) == 1   # the first push's only

    # one more logged step: only what changed goes up, in one new commit
    with open(run_folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "epoch": 1.25, "loss": 1.9}) + "\n")
    out = run("push", str(run_folder), "alice/bentsao-tiny", "-m", "more steps").output
    uploaded = sorted(line.split()[0] for line in out.splitlines() if line.endswith("(uploaded)"))
    assert uploaded == ["README.md", "metrics.jsonl"]
    repo = hub_env.state.repos["alice/bentsao-tiny"]
    assert len(repo["commits"]) == commits + 1 and repo["commits"][repo["branches"]["main"]]["message"] == "more steps"


def test_push_to_branch(hub_env, run_folder):
    run("push", str(run_folder), "alice/bentsao-tiny", "--revision", "dev")
    assert "medzoo.json" in remote_files(hub_env, "alice/bentsao-tiny", "dev")
    assert remote_files(hub_env, "alice/bentsao-tiny", "main") == [".gitattributes"]


def test_round_trip_same_files_same_logits(hub_env, run_folder, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from medzoo.modeling import load_model

    zoo.register("bentsao-run", run_folder)
    run("push", "bentsao-run", "alice/bentsao-tiny")
    monkeypatch.delenv("HF_TOKEN")            # a public repo pulls without a token
    out = run("pull", "alice/bentsao-tiny", "--name", "back").output
    assert "layout peft" in out
    _, folder, manifest = zoo.get("back")
    original = zoo.read_manifest(run_folder)
    for key in ("recipe", "method", "layout", "base_model", "template", "method_params"):
        assert manifest[key] == original[key], key
    assert manifest["source"].startswith("hf://alice/bentsao-tiny@")
    assert manifest["trained_from"] == "train:runs/bentsao-20261121-101500"
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                "loss.png", "tokenizer/tokenizer.json"):
        assert (folder / rel).read_bytes() == (run_folder / rel).read_bytes(), rel
    assert not (folder / "checkpoints").exists() and not (folder / "notes.txt").exists()
    a = load_file(str(run_folder / "adapter/adapter_model.safetensors"))
    b = load_file(str(folder / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)

    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        before = load_model(str(run_folder)).model(input_ids=ids).logits
        after = load_model("back").model(input_ids=ids).logits
    assert torch.equal(before, after)

    # and chat answers the same from both
    one = run("chat", str(run_folder), "-p", "头痛怎么办？", "--max-new-tokens", "4", "--greedy").output
    two = run("chat", "back", "-p", "头痛怎么办？", "--max-new-tokens", "4", "--greedy").output
    assert one.strip() and one == two


def _refused(hub_env, folder, expected):
    result = run("push", str(folder), "alice/x", ok=False)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert TOKEN not in result.output
    assert hub_env.state.repos == {}


def test_refuses_pickles(hub_env, run_folder):
    (run_folder / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    _refused(hub_env, run_folder, "refusing to push " + str(run_folder) + "/adapter/adapter_model.bin: a pickle")


def test_refuses_links_out_of_the_folder(hub_env, run_folder, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, run_folder / "tokenizer" / "special_tokens_map.json")
    _refused(hub_env, run_folder, f"tokenizer/special_tokens_map.json: it links to {outside}, outside the model folder")


def test_refuses_secrets(hub_env, run_folder):
    (run_folder / "config.yaml").write_text(f"recipe: bentsao\nhub_token: {TOKEN}\n")
    _refused(hub_env, run_folder, "config.yaml: it contains your Hugging Face token")


def test_refuses_secret_files(hub_env, run_folder):
    (run_folder / "tokenizer" / ".env").write_text("WANDB_API_KEY=abcdefabcdefabcdef\n")
    _refused(hub_env, run_folder, "tokenizer/.env: its name is that of a secrets file")


def test_refuses_other_tokens(hub_env, run_folder):
    (run_folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "note": "hf_abcdefghijklmnopqrstuvwxyz0123456789"}\n')
    _refused(hub_env, run_folder, "metrics.jsonl: it contains what looks like an access token or password")


def test_push_without_token(hub_env, run_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = run("push", str(run_folder), "alice/x", ok=False)
    assert result.exit_code == 2
    assert "alice/x" in result.output and "huggingface-cli login" in result.output
    assert hub_env.state.repos == {}


def test_push_unknown_model(hub_env):
    result = run("push", "nope", "alice/x", ok=False)
    assert result.exit_code == 2 and "'nope' is not in your zoo" in result.output
