"""Training speed and memory: the seeds' way of training against `medzoo train`, same model, data and steps.

    python bench/train_speed.py                      # CPU mode: a ~30M-parameter Llama built locally, LoRA
    python bench/train_speed.py --steps 40 --rows 2000 --methods lora,freeze,full
    python bench/train_speed.py --llamafactory-python /tmp/lf-venv/bin/python   # with LLaMA-Factory too
    python bench/train_speed.py --gpu --shape llama-7b   # CUDA: lora, qlora, freeze, full (where memory allows)
    python bench/train_speed.py --gpu --shape glm4-9b

For each tuning method, in ONE process launch, it runs:
  1. the seed way: HF Trainer + peft (or the seeds' Freeze / full), every example padded to the cut-off, no
     packing, no length grouping: how alpaca-lora / BenTsao's finetune.py and MedQA-ChatGLM train (written
     fresh here, faithful to that approach); QLoRA as qlora.py does it (4-bit NF4 + prepare_model_for_kbit_training);
  2. `medzoo train bentsao` (Freeze: `medzoo train medqa-chatglm`, the seed recipe that trains it) on
     the same base, data, method settings and number of optimizer steps;
  3. LLaMA-Factory on the same data and settings when an interpreter that has it is given or is this one
     (skipped cleanly otherwise; bench/llamafactory_way.py says how to set its venv up).
It reports real (non-padding) tokens/s, samples/s, padding fraction, peak memory (CPU RSS high-water mark
or CUDA max allocated) and final loss of each, the medzoo/seed ratios and, in GPU mode, MFU and medzoo's
peak against the estimate `medzoo info` prints for that profile. It writes a JSON result under bench/out/
and appends a Markdown table to bench/RESULTS.md.

Shapes: `tiny` (tests), `cpu-30m`, and the real `llama-7b` (32000 vocabulary) and `glm4-9b` (GlmConfig's
defaults: GLM-4-9B-chat-hf, 151552 vocabulary) with random weights: throughput does not depend on the weights.
MFU = k·N·(real tokens/s) / the GPU's dense bf16 peak, with k = 6 for full tuning and 4 for the frozen-base
methods (forward 2·N, backward through activations 2·N, no weight gradients), N = parameters outside the
input embedding (a lookup, not a matrix product). Attention's own s² FLOPs are left out (small at 256 tokens).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
CUTOFF = 256
LR = 3e-4
WARMUP = 0.1
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
METHODS = ("lora", "qlora", "freeze", "full")
# (architecture, config keywords, the real vocabulary size or None for the tokenizer's own)
SHAPES = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2), None),
    "cpu-30m": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                              num_key_value_heads=8), None),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32), 32000),
    "glm4-9b": ("glm", {}, 151552),
}
SEED = "seed way"
OURS = "medzoo train"
LF = "LLaMA-Factory"


def reset_peak_rss() -> None:
    """All runs share this process: reset its RSS high-water mark (Linux: clear_refs 5) before each."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def build_base(folder: Path, shape: str, texts: list[str], device: str) -> tuple[Path, int, int]:
    """A base of `shape` with random weights; returns (folder, parameters, parameters outside the embedding)."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

    from medzoo import tiny

    tokenizer = tiny.train_tokenizer(texts)
    arch, dims, vocab = SHAPES[shape]
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "glm": (GlmConfig, GlmForCausalLM)}[arch]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = config_class(vocab_size=max(vocab or 0, len(tokenizer)), max_position_embeddings=2048,
                          tie_word_embeddings=False, **ids, **dims)
    torch.manual_seed(0)
    if device == "cuda":  # a 7-9B model is built on the GPU in bf16 (fast), then saved
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = model_class(config)
        finally:
            torch.set_default_dtype(default)
    else:
        model = model_class(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    n_matmul = n - model.get_input_embeddings().weight.numel()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder, n, n_matmul


def bentsao_rows(rows: int) -> list[dict]:
    """The bundled BenTsao sample, repeated (with a seeded shuffle) up to `rows` rows."""
    from importlib import resources

    text = (resources.files("medzoo_plugins.bentsao") / "data" / "llama_data.sample.json").read_text("utf-8")
    sample = [json.loads(line) for line in text.splitlines() if line.strip()]
    rng = random.Random(0)
    out = []
    while len(out) < rows:
        rng.shuffle(sample)
        out.extend(sample)
    return out[:rows]


def recipe_for(method: str) -> str:
    """BenTsao's recipe, but for Freeze (which BenTsao never offered) MedQA-ChatGLM's, the seed that trained it."""
    return "medqa-chatglm" if method == "freeze" else "bentsao"


def rendered(rows: list[dict], recipe: str) -> list[dict]:
    """{"prompt", "output"} with the recipe's template rendered, as all three runs see the text."""
    from medzoo.host import catalog

    cat = catalog()
    template = cat.templates[cat.recipes[recipe].template]
    return [{"prompt": template.render(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")),
             "output": r["output"]} for r in rows]


def freeze_layers(base: Path) -> int:
    """The seeds' Freeze trains the last 3 layers' MLP; fewer on a smaller model."""
    config = json.loads((base / "config.json").read_text())
    return min(3, max(1, config["num_hidden_layers"] // 2))


def seed_model(base: Path, method: str, device: str, n_freeze: int):
    """The seed scripts' model set-up for `method`: peft LoRA on an 8-bit/half base became LoRA on a bf16
    base (fp32 on CPU); QLoRA as qlora.py; Freeze as MedQA-ChatGLM (half base, the trained MLPs in fp32);
    full in fp32 master weights with bf16 autocast (the Trainer's bf16=True)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    half = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = {"dtype": torch.float32 if method == "full" else half, "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=half)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if method != "qlora":
        model = model.to(device)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, lora)
    if method == "lora":
        return get_peft_model(model, lora)
    if method == "freeze":
        layers = model.model.layers
        keep = {f"model.layers.{i}.mlp." for i in range(len(layers) - n_freeze, len(layers))}
        for name, param in model.named_parameters():
            param.requires_grad_(any(name.startswith(k) for k in keep))
            if param.requires_grad:
                param.data = param.data.float()
    return model


def seed_way(base: Path, rows: list[dict], method: str, steps: int, micro: int, accum: int, device: str,
             n_freeze: int) -> dict:
    """HF Trainer, each example padded to the cut-off (alpaca-lora's generate_and_tokenize_prompt with
    train_on_inputs=False, then padding to cutoff_len)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = []
    for row in rows:
        p_ids = tokenizer(row["prompt"]).input_ids
        full = (p_ids + tokenizer(row["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[:CUTOFF]
        labels = [-100] * min(len(p_ids), len(full)) + full[len(p_ids):]
        pad = CUTOFF - len(full)
        examples.append({"input_ids": full + [tokenizer.pad_token_id] * pad,
                         "attention_mask": [1] * len(full) + [0] * pad, "labels": labels + [-100] * pad})
    model = seed_model(base, method, device, n_freeze)
    seen = {"rows": 0, "real": 0}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in examples[i].items()}

    class Counting(Trainer):  # count the rows and real tokens of the micro-batches actually trained on
        def training_step(self, model, inputs, *rest, **kw):
            seen["rows"] += inputs["input_ids"].shape[0]
            seen["real"] = seen["real"] + inputs["attention_mask"].sum()
            return super().training_step(model, inputs, *rest, **kw)

    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="seed-way-"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accum, max_steps=steps, learning_rate=LR,
                             warmup_steps=WARMUP, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             report_to=[], bf16=(device == "cuda"), dataloader_num_workers=0, seed=42,
                             optim="adamw_torch", disable_tqdm=True,
                             gradient_checkpointing=(method == "qlora"),
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Counting(model=model, args=args, train_dataset=Data(), callbacks=[Record()])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    real = int(seen["real"])
    result = {"seconds": seconds, "samples_per_s": seen["rows"] / seconds, "tokens_per_s": real / seconds,
              "padding_fraction": 1 - real / (seen["rows"] * CUTOFF),
              "final_loss": sum(losses[-5:]) / len(losses[-5:]),
              "peak_memory_gb": (torch.cuda.max_memory_allocated() / 1024 ** 3) if device == "cuda" else peak_rss_gb()}
    del trainer, model
    free(device)
    return result


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def medzoo_profile(method: str, device: str) -> str:
    if device != "cuda":
        return "cpu-demo"
    return "gpu-24gb-qlora" if method == "qlora" else "h100-80gb"


def medzoo_args(base: Path, data: Path, method: str, steps: int, micro: int, accum: int, device: str, out: Path,
                n_freeze: int) -> list[str]:
    args = ["train", recipe_for(method), "--base", str(base), "--data", str(data), "--method", method,
            "--profile", medzoo_profile(method, device), "--output-dir", str(out), "--max-steps", str(steps),
            "--set", f"micro_batch={micro}", "--set", f"grad_accum={accum}", "--set", f"batch={micro * accum}",
            "--val-size", "0", "--set", f"cutoff_len={CUTOFF}", "--set", f"lr={LR}",
            "--set", f"warmup_ratio={WARMUP}", "--set", "epochs=1000", "--set", "logging_steps=1",
            "--name", f"bench-{method}", "--quiet"]
    if method == "freeze":
        args += ["--set", f"num_layer_trainable={n_freeze}"]
    return args


def medzoo_way(args: list[str], device: str) -> dict:
    """`medzoo train` in-process."""
    from click.testing import CliRunner

    from medzoo.cli import main

    out = Path(args[args.index("--output-dir") + 1])
    reset_peak_rss()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"medzoo train failed ({result.exit_code}):\n{result.output}")
    metrics = read_medzoo_metrics(out)
    if device == "cpu":  # the same meter as the seed way: this process's RSS high-water mark since the reset
        metrics["peak_memory_gb"] = peak_rss_gb()
    free(device)
    return metrics


def read_medzoo_metrics(run: Path) -> dict:
    """The run's own figures: medzoo.json metrics (loop time, steps, real tokens, padding) and metrics.jsonl."""
    import yaml

    metrics = json.loads((run / "medzoo.json").read_text())["metrics"]
    training = yaml.safe_load((run / "config.yaml").read_text().split("\n", 1)[1])["training"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in logged if "step_loss" in m]
    last = steps[-5:]
    batch = int(training["micro_batch"]) * int(training["grad_accum"])
    return {"seconds": metrics["seconds"], "samples_per_s": metrics["steps"] * batch / metrics["seconds"],
            "tokens_per_s": metrics["tokens_per_s"], "padding_fraction": metrics["padding"],
            "final_loss": sum(m["step_loss"] for m in last) / len(last),
            "peak_memory_gb": max(m["peak_memory_gb"] for m in steps)}


def estimate_for(base: Path, method: str, device: str, micro: int, n_freeze: int):
    """What `medzoo info` / `medzoo train --dry-run` estimate for this base, method and profile."""
    from medzoo import host
    from medzoo.recipes import resolve as resolve_run
    from medzoo.train.run import estimate

    cat = host.catalog()
    sets = {"micro_batch": micro, "cutoff_len": CUTOFF}
    if method == "freeze":
        sets["num_layer_trainable"] = n_freeze
    run = resolve_run(cat, cat.recipes[recipe_for(method)], method=method, profile=medzoo_profile(method, device),
                      overrides=sets)
    run["base_model"] = str(base)
    return estimate(run)


def card_gb() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: cpu-30m, or llama-7b with --gpu")
    ap.add_argument("--methods", help="comma-separated, of lora, qlora, freeze, full (default: lora on CPU, all "
                                      "four with --gpu)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--llamafactory-python", help="a Python that has llamafactory (bench/llamafactory_way.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="folder for the JSON result")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md",
                    help="Markdown file the table is appended to ('-': print only)")
    args = ap.parse_args(argv)
    import torch

    import llamafactory_way

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    shape = args.shape or ("llama-7b" if args.gpu else "cpu-30m")
    methods = (args.methods or ("lora,qlora,freeze,full" if args.gpu else "lora")).split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    try:
        lf_python = llamafactory_way.find_python(args.llamafactory_python)
    except llamafactory_way.LlamaFactoryError as e:
        raise SystemExit(f"--llamafactory-python: {e}") from None
    work = Path(tempfile.mkdtemp(prefix="medzoo-train-bench-"))
    os.environ.setdefault("MEDZOO_HOME", str(work / "home"))
    rows = bentsao_rows(args.rows)
    data = work / "bentsao.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base, n_params, n_matmul = build_base(work / "base", shape, [r["instruction"] + r["output"] for r in rows], device)
    n_freeze = freeze_layers(base)
    peak = None
    if args.gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)

    per_method = {}
    for method in methods:
        runs: dict = {}
        examples = rendered(rows, recipe_for(method))
        est = estimate_for(base, method, device, args.micro, n_freeze)
        if method == "qlora" and device != "cuda":
            runs = {k: {"skipped": "QLoRA needs CUDA (bitsandbytes)"} for k in (SEED, OURS)}
        elif device == "cuda" and est.total_gb > card_gb():
            runs = {k: {"skipped": f"estimated {est.total_gb:.0f} GB > the card's {card_gb():.0f} GB"}
                    for k in (SEED, OURS)}
        else:
            runs[SEED] = seed_way(base, examples, method, args.steps, args.micro, args.accum, device, n_freeze)
            runs[OURS] = medzoo_way(medzoo_args(base, data, method, args.steps, args.micro, args.accum, device,
                                                work / f"medzoo-{method}", n_freeze), device)
        if lf_python:
            try:
                runs[LF] = llamafactory_way.run(
                    lf_python, base, examples, method=method, steps=args.steps, micro=args.micro, accum=args.accum,
                    cutoff=CUTOFF, lr=LR, warmup_ratio=WARMUP, lora=LORA, freeze_layers=n_freeze, device=device,
                    work=work, gradient_checkpointing=(method == "qlora"))
            except llamafactory_way.LlamaFactoryError as e:
                runs[LF] = {"skipped": str(e)}
        else:
            runs[LF] = {"skipped": "not installed (--llamafactory-python; see bench/llamafactory_way.py)"}
        for r in runs.values():
            if peak and "tokens_per_s" in r:
                r["mfu"] = (6 if method == "full" else 4) * n_matmul * r["tokens_per_s"] / (peak * 1e12)
        entry = {"runs": runs, "estimate_gb": est.as_dict(), "profile": medzoo_profile(method, device)}
        seed, ours = runs[SEED], runs[OURS]
        if "tokens_per_s" in seed and "tokens_per_s" in ours:
            entry["ratios"] = {"tokens_per_s": ours["tokens_per_s"] / seed["tokens_per_s"],
                               "samples_per_s": ours["samples_per_s"] / seed["samples_per_s"],
                               "peak_memory": ours["peak_memory_gb"] / seed["peak_memory_gb"]}
        per_method[method] = entry

    machine = (torch.cuda.get_device_name(0) if args.gpu else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores") + \
        f", torch {torch.__version__}"
    command = ("python bench/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    record = {"date": datetime.date.today().isoformat(), "machine": machine, "command": command, "shape": shape,
              "params": n_params, "matmul_params": n_matmul, "steps": args.steps, "micro_batch": args.micro,
              "grad_accum": args.accum, "cutoff_len": CUTOFF, "freeze_layers": n_freeze, "methods": per_method}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"train_speed-{record['date']}-{shape}.json").write_text(json.dumps(record, indent=2))
    text = markdown(record, gpu=args.gpu)
    print(text)
    if str(args.results) != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text)
    return record


def markdown(record: dict, gpu: bool) -> str:
    lines = [f"\n### Training speed, {record['shape']} ({record['params'] / 1e6:.1f} M params), BenTsao data — "
             f"{record['date']}\n",
             f"Machine: {record['machine']}. Command: `{record['command']}`. {record['steps']} optimizer steps, "
             f"micro-batch {record['micro_batch']} × accumulation {record['grad_accum']}, cut-off "
             f"{record['cutoff_len']}, same data (BenTsao's template; MedQA-ChatGLM's for Freeze); LoRA r 8, α 16 on q_proj/v_proj; Freeze: the last "
             f"{record['freeze_layers']} layers' MLP.\n",
             "| method | run | real tokens/s | samples/s | padding | peak memory GB | final loss |" +
             (" MFU |" if gpu else ""), "|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    notes = []
    for method, entry in record["methods"].items():
        for name, r in entry["runs"].items():
            if "tokens_per_s" not in r:
                lines.append(f"| {method} | {name} | skipped: {r.get('skipped', '')} | | | | |" + (" |" if gpu else ""))
                continue
            lines.append(f"| {method} | {name} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | "
                         f"{r['padding_fraction']:.1%} | {r['peak_memory_gb']:.2f} | {r['final_loss']:.3f} |" +
                         (f" {r.get('mfu', 0):.1%} |" if gpu else ""))
        if "ratios" in entry:
            q = entry["ratios"]
            notes.append(f"- {method}: medzoo / seed real tokens/s ×{q['tokens_per_s']:.2f}, samples/s "
                         f"×{q['samples_per_s']:.2f}, peak memory ×{q['peak_memory']:.2f}.")
        ours = entry["runs"].get(OURS, {})
        if gpu and "peak_memory_gb" in ours:
            est = entry["estimate_gb"]
            allocator = est["total_gb"] - est["overhead_gb"]  # max_memory_allocated holds no CUDA context
            notes.append(f"  medzoo's peak {ours['peak_memory_gb']:.1f} GB against the estimate for profile "
                         f"{entry['profile']}: {allocator:.1f} GB without the {est['overhead_gb']:.0f} GB context "
                         f"({ours['peak_memory_gb'] / allocator - 1:+.0%}); fits its {est['budget_gb']:.0f} GB: "
                         f"{'yes' if ours['peak_memory_gb'] + est['overhead_gb'] <= est['budget_gb'] else 'no'}.")
    return "\n".join(lines + [""] + notes) + "\n"


if __name__ == "__main__":
    main()
