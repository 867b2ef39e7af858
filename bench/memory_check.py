"""Peak training memory, estimated against measured at the real shapes, on any machine (no GPU needed).

    python bench/memory_check.py
    python bench/memory_check.py --shapes llama-7b --methods lora,full --profiles h100-80gb

For each shape × method × profile it resolves the run as `medzoo train` would (the recipe that offers the
method, the profile's precision, micro-batch and gradient checkpointing, cut-off 256 as BenTsao and
MedQA-ChatGLM train), prints `medzoo.memory.estimate` (what `medzoo info` and `train --dry-run` print) and
the peak that medzoo.memtrace measures for two real optimizer steps on fake tensors of that shape, and the
error of the estimate. The CUDA context (the estimate's overhead) is not in the measured peak, as it is not
in torch.cuda.max_memory_allocated, so the error is taken without it. Appends a table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = {"lora": "bentsao", "full": "bentsao", "freeze": "medqa-chatglm", "ptuning-v2": "medqa-chatglm"}
SHAPES = ("llama-7b", "glm4-9b", "qwen2.5-7b")
CUTOFF = 256


def config_of(shape: str):
    from transformers import GlmConfig, LlamaConfig, Qwen2Config

    if shape == "llama-7b":
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    if shape == "glm4-9b":
        return GlmConfig()  # GLM-4-9B-chat-hf's shape
    if shape == "qwen2.5-7b":
        return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
    if shape == "tiny-llama":  # tests: small enough to run for real on a CPU
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    raise SystemExit(f"--shapes: {shape!r} is not one of {', '.join(SHAPES)}")


def check(shape: str, method: str, profile: str, overrides: dict | None = None) -> dict:
    from medzoo import host, memory, memtrace
    from medzoo.recipes import resolve
    from medzoo.train.run import base_from_config

    cat = host.catalog()
    config = config_of(shape)
    run = resolve(cat, cat.recipes[RECIPE[method]], method=method, profile=profile,
                  overrides={"cutoff_len": CUTOFF, **(overrides or {})})
    base = base_from_config(config.to_dict(), shape, shape)
    est = memory.estimate(base, cat.profiles[profile], method, run["method_params"], run["training"])
    start = time.perf_counter()
    trace = memtrace.simulate(config, run)
    allocator = est.total_gb - est.overhead_gb
    return {"shape": shape, "method": method, "profile": profile, "micro_batch": run["training"]["micro_batch"],
            "gradient_checkpointing": run["gradient_checkpointing"], "precision": run["precision"],
            "estimate": est.as_dict(), "estimate_without_context_gb": allocator, "measured_peak_gb": trace.peak_gb,
            "measured_weights_gb": trace.weights_gb, "measured_between_steps_gb": trace.after_step_gb,
            "measured_forward_backward_gb": trace.forward_backward_gb, "measured_optimizer_gb": trace.optimizer_gb,
            "trainable_params": trace.trainable_params, "error": allocator / trace.peak_gb - 1,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="lora,freeze,ptuning-v2,full")
    ap.add_argument("--profiles", default="h100-80gb,gpu-24gb")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="'-': print only")
    args = ap.parse_args(argv)
    import torch

    rows = [check(s, m, p) for s in args.shapes.split(",") for m in args.methods.split(",")
            for p in args.profiles.split(",")]
    command = ("python bench/memory_check.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    lines = [f"\n### Peak training memory: estimate against measured (fake tensors, real shapes) — "
             f"{datetime.date.today().isoformat()}\n",
             f"Machine: {platform.machine()}, torch {torch.__version__} (no GPU needed). Command: `{command}`. "
             f"Cut-off {CUTOFF}; each profile's precision, micro-batch and gradient checkpointing; two AdamW steps. "
             "Measured = the highest sum of live tensor bytes (medzoo.memtrace); estimate = `medzoo info`'s, "
             "without its CUDA-context overhead.\n",
             "| shape | method | profile | micro | estimate GB | measured GB | error | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['profile']} | {r['micro_batch']} | "
                     f"{r['estimate_without_context_gb']:.1f} | {r['measured_peak_gb']:.1f} | {r['error']:+.1%} | "
                     f"{r['trainable_params'] / 1e6:.1f} M |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines.append(f"\nLargest error: {worst['error']:+.1%} ({worst['shape']}, {worst['method']}, {worst['profile']}).\n")
    text = "\n".join(lines)
    print(text)
    if str(args.results) != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
