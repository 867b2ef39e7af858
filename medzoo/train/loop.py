"""The training loop: exact data order, gradient accumulation over packed micro-batches, mixed precision,
logging, evaluation, atomic checkpoints, resume and Ctrl-C.

A hand-written loop rather than transformers' Trainer or accelerate: packing needs its own collation and
loss normalisation (target tokens per optimizer step), resume must restore the data order and RNG at an
optimizer-step boundary to be bit-exact, and model-parallel placement (device_map) and DDP both reduce to a
few lines here. Everything the loop needs arrives in a ``Loop``; nothing is global.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medzoo import zoo
from medzoo.objects import MedzooError
from medzoo.train import batching, optim

CHECKPOINTS = "checkpoints"
INTERRUPTED = 130


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; the CLI exits 130."""

    def __init__(self, checkpoint: Path | None, signum: int):
        super().__init__(f"interrupted; checkpoint saved in {checkpoint}" if checkpoint else "interrupted")
        self.checkpoint = checkpoint
        self.signum = signum


@dataclass
class Loop:
    model: Any
    train: list                 # encoded examples: {"input_ids": [...], "labels": [...]}
    val: list
    training: dict              # the resolved training settings
    folder: Path                # the run folder (metrics.jsonl, checkpoints/)
    pad_id: int
    device: Any                 # where inputs go
    attention: str = "sdpa"     # the model's attention implementation
    packing: bool = True
    amp_dtype: Any = None       # torch.bfloat16 / torch.float16 under autocast; None = no autocast
    max_steps: int | None = None
    rank: int = 0
    world: int = 1
    progress: bool = True
    reporters: list = field(default_factory=list)
    echo: Callable[[str], None] = print


@dataclass
class Summary:
    steps: int
    first_loss: float | None     # the first step's loss
    final_loss: float | None     # the mean loss of the last logging window
    eval_loss: float | None
    initial_eval_loss: float | None  # the held-out loss before the first step
    last_step_loss: float | None
    tokens: int                  # real (non-padding) tokens trained on
    tokens_per_s: float
    padding: float               # fraction of computed positions that were padding
    peak_memory_gb: float
    seconds: float
    resumed_from: int | None = None


def total_steps(loop: Loop) -> int:
    t = loop.training
    total = int(t["epochs"]) * batching.steps_per_epoch(len(loop.train), int(t["batch"]))
    return min(total, int(loop.max_steps)) if loop.max_steps else total


def peak_memory_gb(device) -> float:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024 ** 3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def target_count(example: dict) -> int:
    return sum(1 for x in example["labels"][1:] if x != batching.IGNORE)


# --- RNG and checkpoints -----------------------------------------------------------------------------------

def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(model) -> bool:
    """FSDP2 (fully_shard): parameters are DTensors, and every rank takes part in gathering them."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def gather_state(model, trainable_only: bool = True) -> dict:
    """Full tensors of the (trainable) weights. Sharded models gather across ranks (collective: every rank
    calls it; rank 0 gets the tensors); others are read directly."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    if trainable_only:
        from medzoo.train.methods import trainable_state

        return trainable_state(model)
    return model.state_dict()


def gather_optimizer(model, opt) -> dict:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def save_checkpoint(loop: Loop, step: int, opt, sched, scaler, rng: dict, state: dict,
                    tensors: dict | None = None, opt_state: dict | None = None) -> Path:
    """checkpoints/step-N, written to a temp folder and renamed: a crash never leaves a half checkpoint."""
    import torch
    from safetensors.torch import save_file

    tensors = gather_state(loop.model) if tensors is None else tensors
    opt_state = opt.state_dict() if opt_state is None else opt_state
    final = loop.folder / CHECKPOINTS / f"step-{step}"
    with zoo.atomic_dir(final) as tmp:
        save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
    keep = int(loop.training.get("save_total_limit") or 0)
    if keep > 0:
        for old in list_checkpoints(loop.folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(loop: Loop, path: Path, opt, sched, scaler) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load_file

    model = loop.model.module if hasattr(loop.model, "module") and not hasattr(loop.model, "config") else loop.model
    tensors = load_file(str(path / "trainable.safetensors"))
    own = dict(model.named_parameters())
    missing = sorted(set(n for n, p in own.items() if p.requires_grad) - set(tensors))
    if missing:
        raise MedzooError(f"{path}: checkpoint does not match this run's trainable weights (missing {missing[0]!r})")
    # a run folder may come from elsewhere: tensors and plain containers only, never arbitrary pickles
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if is_sharded(model):  # every rank reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, opt, states["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        opt.load_state_dict(states["optimizer"])
    sched.load_state_dict(states["scheduler"])
    if scaler is not None and states.get("scaler"):
        scaler.load_state_dict(states["scaler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    return json.loads((path / "state.json").read_text()), rng


# --- signals ---------------------------------------------------------------------------------------------

class StopFlag:
    """The first SIGINT/SIGTERM asks the loop to stop at the next micro-batch and save; a second SIGINT
    raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- the loop --------------------------------------------------------------------------------------------

def _all_sum(values: list[float], loop: Loop) -> list[float]:
    if loop.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=loop.device if str(loop.device).startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _forward_loss(loop: Loop, batch) -> tuple[Any, float]:
    """(sum of token losses, its float) for one micro-batch."""
    import torch

    ctx = (torch.autocast(device_type=str(loop.device).split(":")[0], dtype=loop.amp_dtype)
           if loop.amp_dtype is not None else _nullcontext())
    with ctx:
        logits = loop.model(**batch.tensors).logits
    losses = batching.token_losses(logits, batch.labels.to(logits.device))
    total = losses.sum()
    return total, float(total.detach())


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def evaluate(loop: Loop) -> float | None:
    import torch

    if not loop.val:
        return None
    lengths = [len(e["input_ids"]) for e in loop.val]
    t = loop.training
    micro = batching.plan(list(range(len(loop.val))), lengths, int(t["micro_batch"]), loop.packing,
                          int(t["cutoff_len"]), loop.world, loop.rank)
    was_training = loop.model.training
    loop.model.eval()
    total = 0.0
    with torch.no_grad():
        for rows in micro:
            batch = batching.collate(rows, loop.val, loop.pad_id, loop.attention, loop.packing, loop.device)
            total += _forward_loss(loop, batch)[1]
    loop.model.train(was_training)
    total, = _all_sum([total], loop)
    return total / max(1, sum(target_count(e) for e in loop.val))


def run(loop: Loop, resume_from: Path | None = None) -> Summary:
    import torch

    t = loop.training
    n, batch_size, seed = len(loop.train), int(t["batch"]), int(t["seed"])
    if n == 0:
        raise MedzooError("no training examples left after loading, filtering and the validation split")
    total = total_steps(loop)
    per_epoch = batching.steps_per_epoch(n, batch_size)
    lengths = [len(e["input_ids"]) for e in loop.train]
    targets = [target_count(e) for e in loop.train]
    params = [p for p in loop.model.parameters() if p.requires_grad]
    if not params:
        raise MedzooError("the tuning method left no trainable parameter")
    opt = optim.optimizer(params, t)
    sched = optim.scheduler(opt, t, total)
    scaler = torch.amp.GradScaler("cuda") if loop.amp_dtype == torch.float16 else None
    save_every = int(t.get("save_steps") or 0) or per_epoch
    eval_every = int(t.get("eval_steps") or 0) or per_epoch
    log_every = max(1, int(t.get("logging_steps") or 1))
    metrics_path = loop.folder / "metrics.jsonl"

    state = {"step": 0, "tokens": 0, "slots": 0, "seconds": 0.0, "first_loss": None, "last_loss": None,
             "window_loss": None, "eval_loss": None, "initial_eval_loss": None}
    resumed_from = None
    if resume_from is not None:
        state, rng = load_checkpoint(loop, resume_from, opt, sched, scaler)
        set_rng_state(rng)
        resumed_from = state["step"]
        if loop.rank == 0 and metrics_path.exists():  # drop what was logged after the checkpoint
            lines = [l for l in metrics_path.read_text().splitlines() if l.strip()]
            keep = [l for l in lines if json.loads(l).get("step", 0) <= state["step"]]
            metrics_path.write_text("".join(l + "\n" for l in keep))
    step = state["step"]
    rng_next = rng_state()

    bar = None
    if loop.progress and loop.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    loop.model.train()
    started = time.perf_counter() - state["seconds"]
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "slots": 0, "t0": time.perf_counter()}

    def log(record: dict) -> None:
        if loop.rank != 0:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in loop.reporters:
            reporter.log(record)

    def checkpoint(at: int, rng: dict) -> Path | None:
        path = None
        tensors, opt_state = gather_state(loop.model), gather_optimizer(loop.model, opt)  # collective when sharded
        if loop.rank == 0:
            state["seconds"] = time.perf_counter() - started
            path = save_checkpoint(loop, at, opt, sched, scaler, rng, state, tensors, opt_state)
        if loop.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return path or (loop.folder / CHECKPOINTS / f"step-{at}")

    if step == 0 and loop.val:
        state["initial_eval_loss"] = evaluate(loop)
        log({"step": 0, "eval_loss": state["initial_eval_loss"]})
    with StopFlag() as stop:
        while step < total:
            rng_start = rng_next
            indices = batching.step_examples(n, batch_size, seed, step)
            step_targets = max(1, sum(targets[i] for i in indices))
            micro = batching.plan(indices, lengths, int(t["micro_batch"]), loop.packing, int(t["cutoff_len"]),
                                  loop.world, loop.rank)
            loss_sum = 0.0
            for m, rows in enumerate(micro):
                if _stop_requested(stop, loop):
                    opt.zero_grad(set_to_none=True)
                    path = checkpoint(step, rng_start)
                    if bar:
                        bar.close()
                    raise Interrupted(path, stop.signum or signal.SIGINT)
                b = batching.collate(rows, loop.train, loop.pad_id, loop.attention, loop.packing, loop.device)
                sync = m == len(micro) - 1 or loop.world == 1
                ctx = loop.model.no_sync() if not sync and hasattr(loop.model, "no_sync") else _nullcontext()
                with ctx:
                    total_loss, value = _forward_loss(loop, b)
                    if not rows:
                        total_loss = total_loss * 0.0
                        value = 0.0
                    scaled = total_loss * (loop.world / step_targets)  # DDP averages gradients over ranks
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += value
                if rows:
                    window["tokens"] += b.real_tokens
                    window["slots"] += b.slots
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(t["max_grad_norm"]))
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            lr = sched.get_last_lr()[0]
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rng_next = rng_state()
            step_loss, tokens, slots = _all_sum([loss_sum, window["tokens"], window["slots"]], loop)
            step_loss /= step_targets
            if not math.isfinite(step_loss):
                raise MedzooError(f"loss became {step_loss} at step {step}; lower --lr or use fp32/bf16")
            state["first_loss"] = state["first_loss"] if state["first_loss"] is not None else step_loss
            state["last_loss"] = step_loss
            window["loss"] += step_loss
            window["steps"] += 1
            if step % log_every == 0 or step == total or step == 1:
                elapsed = time.perf_counter() - window["t0"]
                state["tokens"] += int(tokens)
                state["slots"] += int(slots)
                record = {"step": step, "epoch": round(step / per_epoch, 4), "loss": window["loss"] / window["steps"],
                          "step_loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                          "padding": round(1 - tokens / max(1, slots), 4),
                          "peak_memory_gb": round(peak_memory_gb(loop.device), 3)}
                log(record)
                state["window_loss"] = record["loss"]
                if bar:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window.update(loss=0.0, steps=0, tokens=0, slots=0, t0=time.perf_counter())
            if bar:
                bar.update(1)
            if loop.val and (step % eval_every == 0 or step == total):
                state["eval_loss"] = evaluate(loop)
                log({"step": step, "eval_loss": state["eval_loss"]})
            if step % save_every == 0 and step < total:
                checkpoint(step, rng_next)
    if bar:
        bar.close()
    state["tokens"] += int(window["tokens"])
    state["slots"] += int(window["slots"])
    seconds = time.perf_counter() - started
    return Summary(steps=step, first_loss=state["first_loss"], final_loss=state["window_loss"],
                   eval_loss=state["eval_loss"], initial_eval_loss=state.get("initial_eval_loss"),
                   last_step_loss=state["last_loss"], tokens=state["tokens"],
                   tokens_per_s=state["tokens"] / max(seconds, 1e-9),
                   padding=1 - state["tokens"] / max(1, state["slots"]), peak_memory_gb=peak_memory_gb(loop.device),
                   seconds=seconds, resumed_from=resumed_from)


def _stop_requested(stop: StopFlag, loop: Loop) -> bool:
    if loop.world == 1:
        return bool(stop.signum)
    flag, = _all_sum([1.0 if stop.signum else 0.0], loop)  # every rank stops at the same micro-batch
    return flag > 0
