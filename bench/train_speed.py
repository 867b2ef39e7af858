"""Training speed and memory: the seeds' way of training against `medzoo train`, same model, data and steps.

    python bench/train_speed.py                      # CPU mode: a ~30M-parameter Llama built locally
    python bench/train_speed.py --steps 40 --rows 2000
    python bench/train_speed.py --gpu --shape llama-7b --methods lora,qlora,freeze,full   # on a CUDA machine

In ONE process launch it runs:
  1. the seed way — HF Trainer + peft LoRA, every example padded to the cut-off, no packing, no length
     grouping: how alpaca-lora / BenTsao's finetune.py train (written fresh here, faithful to that approach);
  2. `medzoo train bentsao` on the same base, data, LoRA settings and number of optimizer steps;
  3. LLaMA-Factory on the same data and settings when it is installed (skipped cleanly otherwise).
It reports real (non-padding) tokens/s, samples/s, padding fraction, peak memory (CPU RSS high-water mark
or CUDA max allocated) and final loss of each, the medzoo/seed ratios, and (GPU mode) MFU. It writes a
JSON result under bench/out/ and appends a Markdown table to bench/RESULTS.md.
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
CUTOFF = 256
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def reset_peak_rss() -> None:
    """Both runs share this process: reset its RSS high-water mark (Linux: clear_refs 5) before each."""
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


def build_base(folder: Path, shape: str, texts: list[str]) -> Path:
    """A Llama-architecture base with random weights: throughput does not depend on the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medzoo import tiny

    tokenizer = tiny.train_tokenizer(texts)
    shapes = {
        "cpu-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8),
        "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32),
    }
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=2048, tie_word_embeddings=False, **shapes[shape])
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return folder, n


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


def seed_way(base: Path, rows: list[dict], steps: int, micro: int, accum: int, device: str) -> dict:
    """HF Trainer + peft LoRA, each example padded to the cut-off (alpaca-lora's generate_and_tokenize_prompt
    with train_on_inputs=False, then padding to cutoff_len), fp32 on CPU / bf16 on GPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, TrainerCallback

    from medzoo.host import catalog

    template = catalog().templates["bentsao-med"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples, real_tokens = [], 0
    for row in rows:
        prompt = template.render(row["instruction"] + ("\n" + row["input"] if row.get("input") else ""))
        p_ids = tokenizer(prompt).input_ids
        full = (p_ids + tokenizer(row["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[:CUTOFF]
        labels = [-100] * min(len(p_ids), len(full)) + full[len(p_ids):]
        pad = CUTOFF - len(full)
        examples.append({"input_ids": full + [tokenizer.pad_token_id] * pad,
                         "attention_mask": [1] * len(full) + [0] * pad, "labels": labels + [-100] * pad,
                         "n": len(full)})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in examples[i].items() if k != "n"}

    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    out = tempfile.mkdtemp(prefix="seed-way-")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=3e-4, warmup_steps=0.1, lr_scheduler_type="linear",
                             logging_steps=1, save_strategy="no", report_to=[], bf16=(device == "cuda"),
                             dataloader_num_workers=0, seed=42, optim="adamw_torch",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Record()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    samples = steps * micro * accum
    # the Trainer walks the data in a random order; count real tokens over the examples it consumed
    mean_real = sum(e["n"] for e in examples) / len(examples)
    real = mean_real * samples
    result = {"seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": real / seconds,
              "padding_fraction": 1 - mean_real / CUTOFF, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
              "peak_memory_gb": (torch.cuda.max_memory_allocated() / 1024 ** 3) if device == "cuda" else peak_rss_gb()}
    del trainer, model
    gc.collect()
    return result


def medzoo_way(base: Path, data: Path, steps: int, micro: int, accum: int, device: str, work: Path) -> dict:
    """`medzoo train bentsao` in-process on the same base, data and LoRA settings."""
    from click.testing import CliRunner

    from medzoo.cli import main

    out = work / "medzoo-run"
    profile = "h100-80gb" if device == "cuda" else "cpu-demo"
    args = ["train", "bentsao", "--base", str(base), "--data", str(data), "--profile", profile,
            "--output-dir", str(out), "--max-steps", str(steps), "--set", f"micro_batch={micro}",
            "--set", f"grad_accum={accum}", "--set", f"batch={micro * accum}", "--val-size", "0",
            "--set", "cutoff_len=%d" % CUTOFF, "--set", "lr=3e-4", "--set", "warmup_ratio=0.1",
            "--set", "epochs=1000", "--set", "logging_steps=1", "--name", "bench-medzoo", "--quiet"]
    reset_peak_rss()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"medzoo train failed ({result.exit_code}):\n{result.output}")
    metrics = read_medzoo_metrics(out, micro * accum)
    if device == "cpu":  # the same meter as the seed way: this process's RSS high-water mark since the reset
        metrics["peak_memory_gb"] = peak_rss_gb()
    return metrics


def read_medzoo_metrics(run: Path, batch: int) -> dict:
    """The run's own figures: medzoo.json metrics (loop time, steps, real tokens/s) and metrics.jsonl."""
    metrics = json.loads((run / "medzoo.json").read_text())["metrics"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in logged if "step_loss" in m]
    last = steps[-5:]
    return {"seconds": metrics["seconds"], "samples_per_s": metrics["steps"] * batch / metrics["seconds"],
            "tokens_per_s": metrics["tokens_per_s"], "padding_fraction": steps[-1]["padding"],
            "final_loss": sum(m["step_loss"] for m in last) / len(last),
            "peak_memory_gb": max(m["peak_memory_gb"] for m in steps)}


def llama_factory_way() -> dict | None:
    try:
        import llamafactory  # noqa: F401
    except ImportError:
        return None
    return {"skipped": "LLaMA-Factory is installed but its runner is not wired in this benchmark yet"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--shape", default=None, help="cpu-30m (CPU default) or llama-7b (GPU default)")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    import torch

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    shape = args.shape or ("llama-7b" if args.gpu else "cpu-30m")
    work = Path(tempfile.mkdtemp(prefix="medzoo-train-bench-"))
    os.environ.setdefault("MEDZOO_HOME", str(work / "home"))
    rows = bentsao_rows(args.rows)
    data = work / "bentsao.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base, n_params = build_base(work / "base", shape, [r["instruction"] + r["output"] for r in rows])

    results = {"seed way (HF Trainer, pad to cut-off)": seed_way(base, rows, args.steps, args.micro, args.accum,
                                                                 device)}
    results["medzoo train"] = medzoo_way(base, data, args.steps, args.micro, args.accum, device, work)
    lf = llama_factory_way()
    if lf:
        results["LLaMA-Factory"] = lf
    seed, ours = results["seed way (HF Trainer, pad to cut-off)"], results["medzoo train"]
    ratios = {"tokens_per_s": ours["tokens_per_s"] / seed["tokens_per_s"],
              "samples_per_s": ours["samples_per_s"] / seed["samples_per_s"],
              "peak_memory": ours["peak_memory_gb"] / seed["peak_memory_gb"]}
    machine = (torch.cuda.get_device_name(0) if args.gpu else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores") + \
        f", torch {torch.__version__}"
    command = "python bench/train_speed.py " + " ".join(sys.argv[1:])
    record = {"date": datetime.date.today().isoformat(), "machine": machine, "command": command.strip(),
              "shape": shape, "params": n_params, "steps": args.steps, "micro_batch": args.micro,
              "grad_accum": args.accum, "cutoff_len": CUTOFF, "results": results, "ratios": ratios}
    if args.gpu:
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in machine), None)
        if peak:
            for r in results.values():
                if "tokens_per_s" in r:
                    r["mfu"] = 4 * n_params * r["tokens_per_s"] / (peak * 1e12)  # frozen base: ≈ 4·N per token
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"train_speed-{record['date']}-{shape}.json").write_text(json.dumps(record, indent=2))
    lines = [f"\n### Training speed, {shape} ({n_params / 1e6:.1f} M params), BenTsao LoRA — {record['date']}\n",
             f"Machine: {machine}. Command: `{record['command']}`. {args.steps} optimizer steps, micro-batch "
             f"{args.micro} × accumulation {args.accum}, cut-off {CUTOFF}, same data and LoRA (r 8, α 16, "
             "q_proj/v_proj).\n",
             "| run | real tokens/s | samples/s | padding | peak memory GB | final loss |" +
             (" MFU |" if args.gpu else ""), "|---|---|---|---|---|---|" + ("---|" if args.gpu else "")]
    for name, r in results.items():
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | {r.get('skipped', 'skipped')} | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['padding_fraction']:.1%} "
                     f"| {r['peak_memory_gb']:.2f} | {r['final_loss']:.3f} |" +
                     (f" {r.get('mfu', 0):.1%} |" if args.gpu else ""))
    lines.append(f"\nmedzoo / seed: real tokens/s ×{ratios['tokens_per_s']:.2f}, samples/s "
                 f"×{ratios['samples_per_s']:.2f}, peak memory ×{ratios['peak_memory']:.2f}.\n")
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
