"""Optimizers (adamw, lion, sgd) and learning-rate schedules (linear, cosine, constant, piecewise-linear),
as the recipes name them."""
from __future__ import annotations

import math

from medzoo.objects import MedzooError

OPTIMIZERS = ("adamw", "lion", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "piecewise-linear")


def _lion_class():
    import torch

    class Lion(torch.optim.Optimizer):
        """Lion (Chen et al. 2023), as QingGeng trained with: sign of an interpolated momentum, decoupled decay."""

        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                    exp_avg = state["exp_avg"]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    update = exp_avg.mul(beta1).add(p.grad, alpha=1 - beta1).sign_()
                    p.add_(update, alpha=-group["lr"])
                    exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
            return loss

    return Lion


def optimizer(params, training: dict):
    import torch

    name = str(training["optimizer"]).lower()
    lr, wd = float(training["lr"]), float(training["weight_decay"])
    if name in ("adamw", "adamw_torch", "adam"):
        return torch.optim.AdamW(params, lr=lr, eps=float(training["adam_epsilon"]), weight_decay=wd)
    if name == "lion":
        return _lion_class()(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    raise MedzooError(f"training key optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}")


def warmup_steps(training: dict, total: int) -> int:
    if int(training.get("warmup_steps") or 0) > 0:
        return int(training["warmup_steps"])
    return int(math.ceil(float(training.get("warmup_ratio") or 0) * total))


def lr_factor(name: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as transformers' schedules compute it."""
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name in ("linear", "piecewise-linear"):  # QingGeng: linear warm-up, then linear decay to 0
        return max(0.0, (total - step) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise MedzooError(f"training key scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")


def scheduler(opt, training: dict, total: int):
    import torch

    name = str(training["scheduler"]).lower()
    warmup = warmup_steps(training, total)
    lr_factor(name, warmup, warmup, total)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(name, step, warmup, total))
