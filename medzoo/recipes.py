"""Resolving a recipe into the concrete settings of one run: recipe defaults < method defaults < profile < user."""
from __future__ import annotations

import json
from typing import Any

from medzoo.host import Catalog, unknown
from medzoo.objects import MedzooError, Recipe

# Every training key a recipe may set, with its default and meaning.
TRAINING_KEYS: dict[str, tuple[Any, str]] = {
    "epochs": (3, "passes over the training data"),
    "lr": (1e-4, "peak learning rate"),
    "batch": (32, "global batch size: micro_batch x grad_accum x devices"),
    "micro_batch": (None, "per-device batch; None = the hardware profile's"),
    "grad_accum": (None, "gradient accumulation; None = derived to keep the global batch"),
    "scheduler": ("linear", "linear | cosine | constant | piecewise-linear"),
    "warmup_ratio": (0.0, "fraction of steps spent warming up"),
    "warmup_steps": (0, "warm-up steps; wins over warmup_ratio when > 0"),
    "optimizer": ("adamw", "adamw | lion | sgd"),
    "weight_decay": (0.0, "decoupled weight decay"),
    "adam_epsilon": (1e-8, "Adam's epsilon"),
    "max_grad_norm": (1.0, "gradient clipping norm"),
    "cutoff_len": (512, "longest example in tokens (prompt + answer)"),
    "max_source_length": (None, "longest prompt in tokens; None = no separate limit"),
    "max_target_length": (None, "longest answer in tokens; None = no separate limit"),
    "val_size": (0, "held-out validation rows (int) or fraction (float < 1)"),
    "seed": (42, "random seed for data order and initialisation"),
    "logging_steps": (10, "log every N optimizer steps"),
    "save_steps": (0, "checkpoint every N optimizer steps; 0 = at the end of each epoch"),
    "eval_steps": (0, "evaluate every N optimizer steps; 0 = at the end of each epoch"),
    "save_total_limit": (3, "checkpoints kept"),
    "train_on_inputs": (False, "also compute the loss on the prompt"),
    "packing": (True, "pack several examples per sequence, attention reset per example"),
    "group_by_length": (True, "batch examples of similar length together"),
    "load_in_8bit": (False, "the seed loaded its base in 8-bit (CUDA only)"),
}


def training_defaults(recipe: Recipe) -> dict[str, Any]:
    out = {k: v for k, (v, _) in TRAINING_KEYS.items()}
    out.update(recipe.training)
    return out


def method_params(cat: Catalog, recipe: Recipe, method: str) -> dict[str, Any]:
    if method not in recipe.methods:
        raise MedzooError(unknown(f"tuning method for recipe {recipe.name!r}:", method, recipe.methods)
                          .replace(" is not registered", " is not offered"))
    params = dict(cat.methods[method].defaults)
    params.update(recipe.methods[method])
    return params


def parse_value(text: str) -> Any:
    """`--set key=value` values: JSON when it parses (numbers, booleans, lists), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def apply_overrides(training: dict, params: dict, overrides: dict, where: str = "--set") -> None:
    """Put each override into the training or method settings; an unknown key is an error naming it."""
    for key, value in overrides.items():
        if key in training:
            training[key] = value
        elif key in params:
            params[key] = value
        else:
            choices = list(training) + list(params)
            raise MedzooError(f"{where}: {unknown('setting', key, choices)}")


def _warmup_layer(training: dict, layer) -> None:
    """Warm-up is one setting written two ways, and steps > 0 win over a ratio: so a layer (profile, user)
    that gives only `warmup_ratio` also drops the steps an earlier layer set (QingGeng's 5000)."""
    if "warmup_ratio" in layer and "warmup_steps" not in layer:
        training["warmup_steps"] = 0


def resolve(cat: Catalog, recipe: Recipe, method: str | None = None, profile: str | None = None,
            overrides: dict | None = None, where: str = "--set") -> dict[str, Any]:
    """The full resolved settings of a run, as a plain dict (what `train --dry-run` prints and runs save)."""
    method = method or recipe.default_method
    profile_name = profile or recipe.default_profile
    prof = cat.get("profiles", profile_name)
    training = training_defaults(recipe)
    training.update({k: v for k, v in prof.training.items() if k in training})
    _warmup_layer(training, prof.training)
    params = method_params(cat, recipe, method)
    apply_overrides(training, params, overrides or {}, where)
    _warmup_layer(training, overrides or {})
    devices = prof.devices if prof.placement in ("ddp", "fsdp") else 1
    micro = training["micro_batch"] or prof.micro_batch
    if training["grad_accum"] is None:
        training["grad_accum"] = max(1, training["batch"] // (micro * devices))
    training["micro_batch"] = micro
    return {
        "recipe": recipe.name,
        "base_model": recipe.base_model,
        "template": recipe.template,
        "datasets": list(recipe.datasets),
        "method": method,
        "method_params": params,
        "profile": prof.name,
        "precision": prof.precision,
        "quantization": prof.quantization,
        "gradient_checkpointing": prof.gradient_checkpointing,
        "placement": prof.placement,
        "training": training,
        "generation": dict(recipe.generation),
    }
