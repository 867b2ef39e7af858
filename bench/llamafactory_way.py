"""LLaMA-Factory's way, for bench/train_speed.py: the same base, data and settings trained by LLaMA-Factory.

LLaMA-Factory 0.9.5 pins older transformers/peft/accelerate/datasets than medzoo uses, so it lives in a
virtualenv of its own and runs as a subprocess: this file, run by that venv's Python, is the driver.

    python3 -m venv /tmp/lf-venv
    /tmp/lf-venv/bin/pip install torch==2.13.0     # first: the torch medzoo uses (here a local CPU wheel)
    echo torch==2.13.0 > /tmp/lf-pin.txt           # without the pin pip moves to the torch of the newest torchvision
    /tmp/lf-venv/bin/pip install llamafactory==0.9.5 -c /tmp/lf-pin.txt
    # PyPI's torchvision and torchaudio are CUDA builds, and torchaudio's last release (2.11.0) is older than
    # torch 2.13: their compiled parts do not load (a broken torchvision even breaks transformers' Trainer).
    # LLaMA-Factory trains text without either, but imports torchaudio, which imports fine without its .so:
    /tmp/lf-venv/bin/pip uninstall -y torchvision  # a CPU torch only; keep it where it matches a CUDA torch
    rm /tmp/lf-venv/lib/python3.11/site-packages/torchaudio/lib/*.so
    /tmp/lf-venv/bin/pip install bitsandbytes      # CUDA only, for qlora

The benchmark calls find_python("/tmp/lf-venv/bin/python") (or find_python(None): this interpreter if it has
llamafactory, else None and LLaMA-Factory is skipped) and then run() per method. run() writes into its work
folder the examples as an alpaca JSON file with a dataset_info.json and LLaMA-Factory's arguments as JSON,
then runs `<venv python> bench/llamafactory_way.py <config.json>`: drive() calls LLaMA-Factory's own entry
(llamafactory.train.tuner.run_exp) with a callback that times the training loop and prints one
RESULT_PREFIX line. LLaMA-Factory's whole output goes to <work>/llamafactory-<method>.log.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "MEDZOO-LLAMAFACTORY-RESULT "
TEMPLATE = "medzoo-rendered"   # registered by drive(): "empty" plus the tokenizer's own BOS and an EOS
DATASET = "medzoo_bench"


class LlamaFactoryError(RuntimeError):
    """LLaMA-Factory could not be found or its run failed; the message says where to look."""


def find_python(explicit: str | None) -> str | None:
    """The interpreter that runs LLaMA-Factory: `explicit` (checked), else this one if it has llamafactory,
    else None."""
    if explicit:
        if not Path(explicit).is_file():
            raise LlamaFactoryError(f"LLaMA-Factory python {explicit}: no such file")
        # the training entry, not just the package: a venv whose torchvision does not match its torch
        # imports `llamafactory` fine and fails only here
        check = subprocess.run([explicit, "-c", "from llamafactory.train.tuner import run_exp"],
                               capture_output=True, text=True, check=False)
        if check.returncode:
            last = (check.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LlamaFactoryError(f"LLaMA-Factory python {explicit}: cannot import llamafactory's trainer: {last}")
        return explicit
    return sys.executable if importlib.util.find_spec("llamafactory") else None


def lf_args(method: str, base: Path, work: Path, *, steps: int, micro: int, accum: int, cutoff: int, lr: float,
            warmup_ratio: float, lora: dict, freeze_layers: int, device: str,
            gradient_checkpointing: bool = False) -> dict:
    """LLaMA-Factory's arguments (the keys of its YAML configs) for one run."""
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(base), "trust_remote_code": False,
        "template": TEMPLATE, "dataset": DATASET, "dataset_dir": str(work), "cutoff_len": cutoff,
        "packing": False, "overwrite_cache": True, "preprocessing_num_workers": None,
        "output_dir": str(work / "output"), "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum, "max_steps": steps, "learning_rate": lr,
        "lr_scheduler_type": "linear", "warmup_ratio": warmup_ratio, "optim": "adamw_torch", "seed": 42,
        "bf16": device == "cuda", "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "plot_loss": False, "disable_tqdm": True, "flash_attn": "sdpa",
        "dataloader_num_workers": 0,
        # LLaMA-Factory turns gradient checkpointing on by default; the seed way and medzoo's cpu-demo and
        # h100-80gb profiles train without it
        "disable_gradient_checkpointing": not gradient_checkpointing,
    }
    if method in ("lora", "qlora"):
        args.update(finetuning_type="lora", lora_rank=lora["r"], lora_alpha=lora["alpha"],
                    lora_dropout=lora["dropout"], lora_target=",".join(lora["targets"]))
    if method == "qlora":
        args.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4", double_quantization=True)
    elif method == "freeze":
        args.update(finetuning_type="freeze", freeze_trainable_layers=freeze_layers, freeze_trainable_modules="mlp")
    elif method == "full":
        args.update(finetuning_type="full")
    elif method != "lora":
        raise ValueError(f"method {method!r}: expected lora, qlora, freeze or full")
    return args


def run(python: str, base: Path, examples: list[dict], *, method: str, steps: int, micro: int, accum: int,
        cutoff: int, lr: float, warmup_ratio: float, lora: dict, freeze_layers: int, device: str, work: Path,
        gradient_checkpointing: bool = False) -> dict:
    """Train `base` on `examples` ({"prompt": rendered prompt, "output": answer}) with LLaMA-Factory under
    `python` and return the benchmark's figures, or {"skipped": reason}."""
    if method == "qlora" and device != "cuda":
        return {"skipped": "qlora quantizes the base to 4 bits with bitsandbytes, which needs CUDA; this run is on CPU"}
    work = Path(work) / f"llamafactory-{method}"
    if work.exists():
        shutil.rmtree(work)  # LLaMA-Factory would resume from, or refuse, a used output_dir
    work.mkdir(parents=True)
    # the prompt arrives rendered: as "instruction" with an empty "input" LLaMA-Factory passes it on untouched
    rows = [{"instruction": e["prompt"], "input": "", "output": e["output"]} for e in examples]
    (work / "data.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (work / "dataset_info.json").write_text(json.dumps({DATASET: {
        "file_name": "data.json", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}, indent=2))
    args = lf_args(method, Path(base).resolve(), work, steps=steps, micro=micro, accum=accum, cutoff=cutoff, lr=lr,
                   warmup_ratio=warmup_ratio, lora=lora, freeze_layers=freeze_layers, device=device,
                   gradient_checkpointing=gradient_checkpointing)
    config = work / "config.json"
    config.write_text(json.dumps({"args": args, "method": method, "device": device,
                                  "result": str(work / "result.json")}, indent=2))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "datasets-cache"),
               WANDB_DISABLED="true")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU on a GPU machine too
    else:
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # several visible GPUs without torchrun is an error in LF
    log = work.parent / f"llamafactory-{method}.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run([python, str(Path(__file__).resolve()), str(config)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=work, check=False)
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    found = [line[len(RESULT_PREFIX):] for line in lines if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not found:
        last = ([line.strip() for line in lines if line.strip()] or ["(no output)"])[-1]  # the exception's line
        raise LlamaFactoryError(f"LLaMA-Factory {method} run failed (exit {proc.returncode}): {last} "
                                f"— full log: {log}")
    return json.loads(found[-1])["figures"]


# ---- the driver: everything below runs in LLaMA-Factory's venv ------------------------------------------

def _vm_hwm_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def _register_template(tokenizer) -> None:
    """LLaMA-Factory's `empty` template adds nothing around the content and no EOS; medzoo and the seed way
    train on tokenizer(prompt) (with the tokenizer's special tokens, BOS for Llama) + tokenizer(answer,
    no special tokens) + [eos]. This template is `empty` with those special tokens and an EOS."""
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter
    from llamafactory.data.template import register_template

    probe = "x y"
    full = tokenizer(probe).input_ids
    bare = tokenizer(probe, add_special_tokens=False).input_ids
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    before = [{"token": t} for t in tokenizer.convert_ids_to_tokens(full[:start])]
    after = [{"token": t} for t in tokenizer.convert_ids_to_tokens(full[start + len(bare):])]
    register_template(name=TEMPLATE, format_prefix=EmptyFormatter(slots=before) if before else None,
                      format_user=StringFormatter(slots=["{{content}}", *after]),
                      format_assistant=StringFormatter(slots=["{{content}}", {"eos_token"}]))


def _check_tokens(tokenizer, rows: list[dict]) -> None:
    """Every example must become exactly the ids medzoo and the seed way train on."""
    from llamafactory.data import TEMPLATES

    template = TEMPLATES[TEMPLATE]
    for n, row in enumerate(rows):
        prompt, answer = template.encode_oneturn(tokenizer, [{"role": "user", "content": row["instruction"]},
                                                            {"role": "assistant", "content": row["output"]}])
        want = (tokenizer(row["instruction"]).input_ids,
                tokenizer(row["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
        if (prompt, answer) != (list(want[0]), list(want[1])):
            raise SystemExit(f"data.json row {n}: LLaMA-Factory's template encodes it differently from "
                             f"tokenizer(prompt) + tokenizer(answer) + [eos]")


def drive(config_path: str) -> None:
    """Run LLaMA-Factory's SFT on the config run() wrote and print its figures on one RESULT_PREFIX line."""
    config = json.loads(Path(config_path).read_text())
    args, device = config["args"], config["device"]
    import llamafactory
    import torch
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    from llamafactory.train.tuner import run_exp
    from transformers import AutoTokenizer, TrainerCallback

    if args.get("quantization_bit") and importlib.util.find_spec("bitsandbytes") is None:
        print(RESULT_PREFIX + json.dumps({"figures": {
            "skipped": f"qlora needs bitsandbytes in {sys.prefix}: {sys.executable} -m pip install bitsandbytes"}}))
        return
    tokenizer = AutoTokenizer.from_pretrained(args["model_name_or_path"])
    _register_template(tokenizer)
    rows = json.loads((Path(args["dataset_dir"]) / "data.json").read_text(encoding="utf-8"))
    _check_tokens(tokenizer, rows)

    # Tokens are counted on the micro-batches the trainer actually trains on, as they reach training_step
    # (after LLaMA-Factory's collator padded each to its longest row, rounded up to a multiple of 8):
    # processed = input_ids.numel(), real = attention_mask.sum(). Counting in the collator would also count
    # the batch the dataloader prefetches past the last step; transformers' include_num_input_tokens_seen
    # keeps only one of the two numbers.
    # The real count stays a tensor until the end: reading it per batch would make the GPU wait.
    seen = {"rows": 0, "processed": 0, "real": 0}
    inner_step = CustomSeq2SeqTrainer.training_step

    def training_step(self, model, inputs, *rest, **kw):
        seen["rows"] += inputs["input_ids"].shape[0]
        seen["processed"] += inputs["input_ids"].numel()
        seen["real"] = seen["real"] + inputs["attention_mask"].sum()
        return inner_step(self, model, inputs, *rest, **kw)

    CustomSeq2SeqTrainer.training_step = training_step
    # run_sft saves the weights after training, outside the timed loop; the benchmark keeps none (a full 7B
    # would write 13 GB)
    CustomSeq2SeqTrainer.save_model = lambda self, *a, **kw: None

    clock: dict = {"losses": [], "step_ends": []}

    class Meter(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            clock["hwm_loading_gb"] = _vm_hwm_gb()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:  # as the seed way's meter: the high-water mark from here on (Linux clear_refs 5)
                try:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                except OSError:
                    pass
            clock["begin"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            clock["step_ends"].append(time.perf_counter() - clock["begin"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock["losses"].append(float(logs["loss"]))

        def on_train_end(self, *a, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            clock["seconds"] = time.perf_counter() - clock["begin"]
            clock["peak_gb"] = (torch.cuda.max_memory_allocated() / 1024 ** 3 if device == "cuda"
                                else _vm_hwm_gb())

    run_exp(args=args, callbacks=[Meter()])

    seen["real"] = int(seen["real"])
    seconds, last = clock["seconds"], clock["losses"][-5:]
    # samples are the rows trained on: steps * micro * accum, fewer only where an epoch ends in a short batch
    figures = {"seconds": seconds, "samples_per_s": seen["rows"] / seconds, "tokens_per_s": seen["real"] / seconds,
               "padding_fraction": 1 - seen["real"] / seen["processed"], "final_loss": sum(last) / len(last),
               "peak_memory_gb": clock["peak_gb"], "version": llamafactory.__version__}
    if device == "cpu":  # the whole subprocess's high-water mark, loading and tokenizing included
        figures["peak_memory_gb_with_loading"] = max(clock["peak_gb"], clock["hwm_loading_gb"])
    record = {"figures": figures, "losses": clock["losses"], "step_ends_s": clock["step_ends"], "tokens": seen,
              "torch": torch.__version__}
    Path(config["result"]).write_text(json.dumps(record, indent=2))
    print(RESULT_PREFIX + json.dumps(record), flush=True)


if __name__ == "__main__":
    drive(sys.argv[1])
