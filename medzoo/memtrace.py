"""A training step's peak memory at the real shape, measured without the hardware.

The base is built from its config on fake tensors (torch's FakeTensorMode: shapes, dtypes and the whole
autograd graph, no storage), the run's tuning method is applied with medzoo's own code, and two optimizer
steps run on a worst-case micro-batch (every row `cutoff_len` tokens, packed as medzoo packs) with the
profile's precision (autocast), gradient checkpointing and AdamW as the CUDA path uses it (foreach). A
dispatch mode counts every tensor storage while it is alive, so the peak is what a caching allocator's
max_memory_allocated would report for the same ops, without the CUDA context.

What differs from a real CUDA run: attention runs torch's CPU flash kernel, which saves what the CUDA flash
and memory-efficient kernels save (output and log-sum-exp, no s² matrix); bitsandbytes' 4-bit layers are not
simulated (QLoRA is not measured here); allocator rounding (512-byte blocks) and cuBLAS workspaces are left
out. `python bench/memory_check.py` sets these peaks against `medzoo.memory.estimate`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

GB = 1024 ** 3


@dataclass(frozen=True)
class Trace:
    peak_gb: float        # live tensor bytes at the highest point of the steps
    weights_gb: float     # parameters and buffers before the first step
    after_step_gb: float  # what stays between steps: weights, optimizer state (gradients freed)
    trainable_params: int
    forward_backward_gb: float  # the last step's peak during forward and backward
    optimizer_gb: float         # its peak during the optimizer step


class _Live:
    """Counts the bytes of every storage created under it (or added) until it is freed."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def add(self, tensor) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._gone, key)

    def _gone(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        live = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    live.add(t)
                return out

        return Count()


def _to_fake(model, fake_mode) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor of the same shape, dtype and grad flag."""
    import torch

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                with fake_mode:
                    data = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                with fake_mode:
                    module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")


def simulate(config, run: dict, steps: int = 2, fake: bool = True) -> Trace:
    """Peak memory of `run` (a resolved run: method, method_params, precision, gradient_checkpointing,
    training) on a base of transformers `config`, on one device. fake=False runs the same steps on real CPU
    tensors (small models only: the tests check that both count the same)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from medzoo import host
    from medzoo.objects import resolve
    from medzoo.train import batching, methods, optim

    if run.get("quantization"):
        raise ValueError("4-bit/8-bit bases (bitsandbytes) are not simulated")
    cat = host.catalog()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run["precision"])
    full = run["method"] == "full"
    load_dtype = torch.float32 if (half is None or full) else half  # as medzoo.train.run._precision
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(load_dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model = resolve(cat.methods[run["method"]].apply)(model, dict(run["method_params"]), run)
    methods.prepare(model, run)
    model.train()

    training = run["training"]
    micro, cutoff = int(training["micro_batch"]), int(training["cutoff_len"])
    packing = methods.packable(model, run, prefix_lm=config.model_type == "chatglm")
    if packing:  # two examples a row: the packed block-diagonal mask at full length, as medzoo.train.run
        half_len = cutoff // 2
        examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (half_len, cutoff - half_len)] * micro
        rows = [[2 * b, 2 * b + 1] for b in range(micro)]
    else:  # peft's prefix keys take a 2-D mask only: one example a row
        examples = [{"input_ids": [1] * cutoff, "labels": [1] * cutoff}] * micro
        rows = [[b] for b in range(micro)]
    batch = batching.collate(rows, examples, 0, "sdpa", packing)

    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # peft keeps a small index tensor outside its buffers
        _to_fake(model, mode)
    else:
        import contextlib

        mode = contextlib.nullcontext()
        mode.from_tensor = lambda t: t
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
            for name, buf in model.named_buffers():
                if "inv_freq" in name:  # rotary frequencies: any finite values do
                    buf.copy_(1.0 / (10000 ** (torch.arange(buf.numel(), dtype=torch.float32) / buf.numel())))
    live = _Live()
    for tensor in list(model.parameters()) + list(model.buffers()):
        live.add(tensor)
    weights = live.live
    trainable = [p for p in model.parameters() if p.requires_grad]
    with mode:
        tensors = {k: mode.from_tensor(v) for k, v in batch.tensors.items()}
        labels = mode.from_tensor(batch.labels)
        opt = optim.optimizer(trainable, training)
        for group in opt.param_groups:
            group["foreach"] = True  # the CUDA default; its temporaries count
        top = 0
        with live.mode():
            for t in list(tensors.values()) + [labels]:
                live.add(t)
            for _ in range(steps):
                live.peak = live.live
                ctx = torch.autocast("cpu", dtype=half) if half is not None else torch.autocast("cpu", enabled=False)
                with ctx:
                    logits = model(**tensors).logits
                loss = batching.token_losses(logits, labels).sum()
                del logits
                loss.backward()
                del loss
                fwd_bwd, live.peak = live.peak, live.live
                opt.step()
                opt.zero_grad(set_to_none=True)
                opt_peak, live.peak = live.peak, max(fwd_bwd, live.peak)
                top = max(top, live.peak)
            after = live.live
    return Trace(top / GB, weights / GB, after / GB, sum(p.numel() for p in trainable), fwd_bwd / GB,
                 opt_peak / GB)
