"""`medzoo train`: every recipe × method on tiny models built here (Llama for LLaMA recipes, GLM-4 and the
native ChatGLM-6B for ChatGLM recipes), packing equivalence, resume after a real signal, bad rows, dry runs.

Everything is real: tiny models, the bundled sample data, the actual training loop, saving and loading."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from medzoo import host, zoo  # noqa: E402
from medzoo.cli import main  # noqa: E402
from medzoo.objects import MedzooError  # noqa: E402

LLAMA_RECIPES = ("bentsao", "bentsao-literature")
QUICK = {"batch": 4, "micro_batch": 2, "val_size": 0, "logging_steps": 1, "save_steps": 0, "eval_steps": 0,
         "lr": 1e-2, "warmup_ratio": 0.0, "warmup_steps": 0}


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def base_for(recipe, bases):
    arch = host.catalog().base_models[host.catalog().recipes[recipe].base_model].architecture
    return bases["llama"] if arch == "llama" else bases["glm"]


def quick_run(recipe, base, folder, method=None, data=None, overrides=None, max_steps=2, sample=True, run_changes=None,
              **kw):
    from medzoo.train import run as train_run

    cat = host.catalog()
    r = cat.recipes[recipe]
    data = data or ",".join(f"{d}*0.05" for d in r.datasets)
    run = train_run.plan(recipe, method=method, profile="cpu-demo", base=str(base), data=data, sample=sample,
                         overrides={**QUICK, **(overrides or {})}, max_steps=max_steps)
    run.update(run_changes or {})
    return train_run.execute(run, Path(folder), progress=False, echo=lambda m: None, **kw)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


PROBE = [1, 17, 42, 99, 123, 250, 77, 5]


# --- every recipe × every method it offers -------------------------------------------------------------------
def matrix():
    cat = host.catalog()
    return [(r, m) for r in sorted(cat.recipes) for m in cat.recipes[r].methods]


@pytest.mark.parametrize("recipe,method", matrix())
def test_recipe_method_trains_saves_and_reloads(recipe, method, train_bases, tmp_path):
    from medzoo.modeling import load_base, load_model

    base = base_for(recipe, train_bases)
    if method == "qlora":
        with pytest.raises(MedzooError, match="method .qlora. needs a CUDA GPU"):
            quick_run(recipe, base, tmp_path / "run", method=method)
        assert not (tmp_path / "run" / zoo.MANIFEST).exists() and not zoo.entries()
        return
    result = quick_run(recipe, base, tmp_path / "run", method=method)
    folder = tmp_path / "run"
    manifest = json.loads((folder / zoo.MANIFEST).read_text())
    assert manifest["recipe"] == recipe and manifest["method"] == method
    assert manifest["template"] == host.catalog().recipes[recipe].template
    expected = {"lora": "peft", "ptuning-v2": "peft", "freeze": "freeze", "full": "full"}[method]
    assert manifest["layout"] == expected == result.layout
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "README.md", "tokenizer"):
        assert (folder / name).exists(), name
    assert zoo.entries()["run"]["path"] == str(folder.resolve())
    assert result.summary.steps == 2 and result.summary.final_loss > 0
    if method == "freeze":  # the last N layers' named modules only, ids computed from the model
        from safetensors.torch import load_file

        names = load_file(str(folder / "trainable.safetensors"))
        n = int(manifest["method_params"]["num_layer_trainable"])
        assert names and all(any(f"layers.{i}.mlp." in k for i in range(3 - n, 3)) for k in names)
    before = logits_of(result.model.eval(), PROBE)
    loaded = load_model(str(folder), device="cpu")
    after = logits_of(loaded.model, PROBE)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    untrained = logits_of(load_base(str(base), device="cpu")[0].eval(), PROBE)
    assert (untrained - after).abs().max() > 1e-3  # training changed the model, so the reload check can fail


@pytest.mark.parametrize("recipe,method", [("medqa-chatglm", "lora"), ("medqa-chatglm", "freeze"),
                                           ("medqa-chatglm", "ptuning-v2"), ("med-chatglm", "full"),
                                           ("qinggeng", "lora")])
def test_native_chatglm_recipes_train_and_reload(recipe, method, train_bases, tmp_path):
    from medzoo.modeling import load_model

    if train_bases.get("chatglm") is None:
        pytest.skip("medzoo.chatglm not available")
    result = quick_run(recipe, train_bases["chatglm"], tmp_path / "run", method=method)
    manifest = json.loads((tmp_path / "run" / zoo.MANIFEST).read_text())
    if method == "ptuning-v2":  # ChatGLM-6B's own prefix encoder, as MedQA-ChatGLM trained it
        assert manifest["layout"] == "prefix"
        assert manifest["config_overrides"] == {"pre_seq_len": 16, "prefix_projection": False}
        from safetensors.torch import load_file

        assert list(load_file(str(tmp_path / "run" / "prefix.safetensors"))) == ["transformer.prefix_encoder.embedding.weight"]
    ids = [5, 30, 31, 40, 41, 50]
    before = logits_of(result.model.eval(), ids)
    after = logits_of(load_model(str(tmp_path / "run"), device="cpu").model, ids)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    from medzoo.modeling import load_base

    untrained = logits_of(load_base(str(train_bases["chatglm"]), device="cpu")[0].eval(), ids)
    assert (untrained - after).abs().max() > 1e-4  # 10× the reload tolerance: the reload check can fail


# --- packing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "glm"])
def test_packed_rows_give_the_same_per_example_losses(arch, train_bases):
    from transformers import AutoModelForCausalLM

    from medzoo.train import batching

    model = AutoModelForCausalLM.from_pretrained(str(train_bases[arch]), attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 5, 9, 3):
        ids = torch.randint(4, 200, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})

    def per_example(rows, packing, attention="sdpa"):
        b = batching.collate(rows, examples, 0, attention, packing)
        with torch.no_grad():
            losses = batching.token_losses(model(**b.tensors).logits, b.labels)
        out = {}
        for r, spans in enumerate(b.examples):
            for i, start, end in spans:
                out[i] = losses[r, start:end - 1].sum().item()  # position t predicts token t+1
        return out

    separate = {}
    for i in range(len(examples)):
        separate.update(per_example([[i]], packing=False))
    rows = batching.pack(list(range(len(examples))), [len(e["input_ids"]) for e in examples], 20)
    assert any(len(r) > 1 for r in rows)  # really packed
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        packed = per_example(rows, packing=True, attention=attention)
        for i in separate:
            assert abs(packed[i] - separate[i]) < 1e-5 * max(1.0, abs(separate[i])), (attention, i)
    # without the block-diagonal mask, examples would see each other: the test can fail
    model.set_attn_implementation("sdpa")
    b = batching.collate(rows, examples, 0, "sdpa", packing=False)
    flat = [[i for row in rows for i in row]]
    leaky = batching.collate(flat, examples, 0, "sdpa", packing=False)
    with torch.no_grad():
        l1 = batching.token_losses(model(**leaky.tensors).logits, leaky.labels).sum().item()
    assert abs(l1 - sum(separate.values())) > 1e-3


def test_packing_and_padding_train_to_the_same_weights(train_bases, tmp_path):
    """One optimizer step over the same examples, packed vs one per row: the same loss and adapter."""
    a = quick_run("bentsao", train_bases["llama"], tmp_path / "packed", overrides={"dropout": 0.0}, max_steps=1)
    b = quick_run("bentsao", train_bases["llama"], tmp_path / "padded", overrides={"dropout": 0.0, "packing": False},
                  max_steps=1, register=False)
    assert abs(a.summary.last_step_loss - b.summary.last_step_loss) < 1e-5
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "packed" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "padded" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(train_bases, tmp_path):
    a = quick_run("bentsao", train_bases["llama"], tmp_path / "plain", overrides={"dropout": 0.0}, max_steps=2)
    b = quick_run("bentsao", train_bases["llama"], tmp_path / "gc", overrides={"dropout": 0.0}, max_steps=2,
                  run_changes={"gradient_checkpointing": True}, register=False)
    assert b.model.get_base_model().is_gradient_checkpointing
    assert abs(a.summary.last_step_loss - b.summary.last_step_loss) < 1e-5
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "gc" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


# --- resume --------------------------------------------------------------------------------------------------
def _cli_args(base, folder, *extra):
    return ["train", "bentsao", "--profile", "cpu-demo", "--base", str(base), "--data", "huatuo-kg*0.1",
            "--set", "batch=4", "--set", "micro_batch=2", "--set", "val_size=0", "--set", "save_steps=2",
            "--set", "logging_steps=1", "--max-steps", "8", "--output-dir", str(folder), "--quiet", *extra]


def _final(folder):
    from safetensors.torch import load_file

    manifest = json.loads((Path(folder) / zoo.MANIFEST).read_text())
    return manifest["metrics"]["last_step_loss"], load_file(str(Path(folder) / "adapter" / "adapter_model.safetensors"))


def test_sigint_saves_a_checkpoint_and_resume_equals_uninterrupted(train_bases, tmp_path):
    base = train_bases["llama"]
    assert invoke(*_cli_args(base, tmp_path / "whole", "--name", "whole")).exit_code == 0
    folder = tmp_path / "cut"
    metrics = folder / "metrics.jsonl"

    def interrupt():  # a real SIGINT once step 3 is logged
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists() and any(json.loads(l).get("step", 0) >= 3 for l in metrics.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    cut = invoke(*_cli_args(base, folder, "--name", "cut"))
    watcher.join()
    assert cut.exit_code == 130, cut.output
    assert "--resume" in cut.output and not (folder / zoo.MANIFEST).exists() and "cut" not in zoo.entries()
    steps = [int(p.name.split("-")[1]) for p in (folder / "checkpoints").iterdir()]
    assert steps and max(steps) < 8 and not any(p.name.startswith(".") for p in (folder / "checkpoints").iterdir())
    resumed = invoke("train", "bentsao", "--resume", "--output-dir", folder, "--name", "cut", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    loss_a, wa = _final(tmp_path / "whole")
    loss_b, wb = _final(folder)
    assert abs(loss_a - loss_b) <= 1e-6
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    assert "cut" in zoo.entries()
    again = invoke("train", "bentsao", "--resume", "--output-dir", folder, "--quiet")
    assert again.exit_code == 2 and "finished run" in again.output
    # metrics of the resumed run continue the cut one without duplicates
    steps = [json.loads(l)["step"] for l in (folder / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_killed_run_resumes_from_its_last_checkpoint(train_bases, tmp_path):
    """SIGKILL (no chance to save): resume from the last periodic checkpoint, same result as uninterrupted."""
    base = train_bases["llama"]
    folder = tmp_path / "killed"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "medzoo.cli", *_cli_args(base, folder)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (folder / "checkpoints" / "step-4").is_dir():
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (folder / zoo.MANIFEST).exists()
    assert invoke("train", "bentsao", "--resume", "--output-dir", folder, "--quiet").exit_code == 0
    assert invoke(*_cli_args(base, tmp_path / "whole")).exit_code == 0
    loss_a, wa = _final(tmp_path / "whole")
    loss_b, wb = _final(folder)
    assert abs(loss_a - loss_b) <= 1e-6
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_checkpoints_are_atomic_and_limited(train_bases, tmp_path):
    quick_run("bentsao", train_bases["llama"], tmp_path / "run", max_steps=5,
              overrides={"save_steps": 1, "save_total_limit": 2})
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-3", "step-4"]
    for name in names:
        assert {p.name for p in (tmp_path / "run" / "checkpoints" / name).iterdir()} == \
            {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"}


# --- the embedded default ------------------------------------------------------------------------------------
def test_cpu_demo_end_to_end_loss_goes_down(tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "bentsao", "--profile", "cpu-demo", "--max-steps", "12", "--set", "batch=16",
                    "--set", "lr=1e-2", "--set", "warmup_ratio=0", "--set", "eval_steps=12", "--quiet")
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("bentsao-")
    records = [json.loads(l) for l in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.01, evals
    assert all(r["tokens_per_s"] > 0 and 0 <= r["padding"] < 1 and r["peak_memory_gb"] > 0
               for r in records if "loss" in r)
    assert "first loss" in result.output and "last loss" in result.output
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert config["base_model"] == "medzoo-tiny" and config["method"] == "lora" and config["sample"] is True
    card = (runs[0] / "README.md").read_text()
    assert "eval loss" in card and "tokens/s" in card
    listed = invoke("list", "--local")
    assert runs[0].name in listed.output


# --- data problems -------------------------------------------------------------------------------------------
def test_bad_rows_are_named_or_skipped_and_counted(train_bases, tmp_path):
    data = tmp_path / "mine.jsonl"
    good = [{"instruction": f"问题{i}：头痛怎么办？", "input": "", "output": "多休息，必要时就医。"} for i in range(12)]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(4, json.dumps({"instruction": "发烧怎么办？", "input": ""}, ensure_ascii=False))  # line 5: no output
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["train", "bentsao", "--profile", "cpu-demo", "--base", train_bases["llama"], "--data", data,
            "--set", "batch=4", "--set", "val_size=0", "--max-steps", "1", "--quiet"]
    bad = invoke(*args, "--output-dir", tmp_path / "a")
    assert bad.exit_code == 2
    assert f"{data}:5" in bad.output and "output" in bad.output
    assert not (tmp_path / "a" / zoo.MANIFEST).exists()
    ok = invoke(*args, "--output-dir", tmp_path / "b", "--skip-bad-rows")
    assert ok.exit_code == 0, ok.output
    assert "skipped 1 bad rows" in ok.output
    taken = invoke(*args, "--output-dir", tmp_path / "b", "--skip-bad-rows")
    assert taken.exit_code == 2 and "already holds a run" in taken.output
    if importlib.util.find_spec("tensorboard") is None:
        missing = invoke(*args, "--output-dir", tmp_path / "c", "--skip-bad-rows", "--report-to", "tensorboard")
        assert missing.exit_code == 2 and "tensorboard is not installed" in missing.output


# --- settings ------------------------------------------------------------------------------------------------
def test_dry_run_prints_the_resolved_run_and_memory_without_loading(tmp_path):
    result = invoke("train", "bentsao", "--profile", "cpu-demo", "--dry-run", "--set", "r=16", "--epochs", "2",
                    "--set", "cutoff_len=128", "--lr", "1e-4")
    assert result.exit_code == 0, result.output
    run = yaml.safe_load(result.output)
    assert run["method_params"]["r"] == 16 and run["training"]["epochs"] == 2
    assert run["training"]["lr"] == 1e-4 and run["training"]["cutoff_len"] == 128
    assert run["training"]["grad_accum"] * run["training"]["micro_batch"] == run["training"]["batch"]
    seed_run = yaml.safe_load(invoke("train", "bentsao", "--dry-run").output)  # a100-80gb: the seed's batch 128
    assert seed_run["training"]["batch"] == 128 and seed_run["training"]["grad_accum"] == 128 // 16
    assert run["base_model"] == "medzoo-tiny" and run["memory_estimate_gb"]["fits"] is True
    assert not (tmp_path / "runs").exists()
    seed = yaml.safe_load(invoke("train", "medqa-chatglm", "--dry-run", "--method", "freeze").output)
    assert seed["method_params"] == {"num_layer_trainable": 3, "name_module_trainable": "mlp"}
    assert seed["training"]["lr"] == 5e-5 and seed["training"]["scheduler"] == "cosine"
    assert seed["memory_estimate_gb"]["budget_gb"] == 80
    auto = yaml.safe_load(invoke("train", "bentsao", "--profile", "auto", "--dry-run").output)
    assert auto["profile"] == ("cpu-demo" if not torch.cuda.is_available() else auto["profile"])


def test_unknown_settings_are_errors_naming_them(tmp_path):
    bad = invoke("train", "bentsao", "--dry-run", "--set", "lora_rank=4")
    assert bad.exit_code == 2 and "'lora_rank'" in bad.output and "--set" in bad.output
    config = tmp_path / "my.yaml"
    config.write_text("lr: 1e-4\nepochs: 1\nbogus_key: 3\n")
    bad = invoke("train", "bentsao", "--dry-run", "--config", config)
    assert bad.exit_code == 2 and f"{config}:3" in bad.output and "'bogus_key'" in bad.output
    config.write_text("method: lora\ntraining:\n  lr: 0.001\nmethod_params:\n  r: 4\n")
    run = yaml.safe_load(invoke("train", "bentsao", "--dry-run", "--config", config, "--set", "r=2").output)
    assert run["training"]["lr"] == 0.001 and run["method_params"]["r"] == 2  # --set wins over --config
    bad = invoke("train", "bentsao", "--dry-run", "--method", "freeze")
    assert bad.exit_code == 2 and "freeze" in bad.output
    bad = invoke("train", "qinggeng", "--dry-run", "--set", "optimizer")
    assert bad.exit_code == 2 and "key=value" in bad.output


def test_freeze_layer_count_beyond_the_model_is_an_error(train_bases, tmp_path):
    with pytest.raises(MedzooError, match="num_layer_trainable: 9 is out of range; the model has 3 layers"):
        quick_run("medqa-chatglm", train_bases["glm"], tmp_path / "r", method="freeze",
                  overrides={"num_layer_trainable": 9})


# --- multi-process -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_train_like_one(strategy, train_bases, tmp_path):
    """--nproc 2 relaunches through torch.distributed.run (gloo on CPU); DDP or FSDP with the step's examples
    split over the ranks ends with the weights of one process training on all of them."""
    common = ["train", "bentsao", "--profile", "cpu-demo", "--base", str(train_bases["llama"]), "--data",
              "huatuo-kg*0.1", "--set", "batch=8", "--set", "micro_batch=2", "--set", "val_size=0",
              "--set", "dropout=0", "--max-steps", "3", "--quiet"]
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "medzoo.cli", *common, "--nproc", "2", "--strategy", strategy,
                           "--set", "save_steps=2", "--output-dir", str(tmp_path / "ddp"), "--name", "ddp"],
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp" in zoo.entries() and proc.stdout.count("saved") == 1  # rank 0 alone writes and registers
    assert (tmp_path / "ddp" / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    assert invoke(*common, "--output-dir", tmp_path / "one", "--name", "one").exit_code == 0
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
