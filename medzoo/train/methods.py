"""Tuning methods: ``apply_<x>(model, params, run) -> model`` (named in medzoo.builtin), and how each one's
trained weights are saved into a model folder (docs/model-folder.md).

``params`` are the recipe's hyper-parameters for the method (medzoo.recipes.method_params); ``run`` is the
resolved run dict (medzoo.recipes.resolve).
"""
from __future__ import annotations

import re
from pathlib import Path

from medzoo.objects import MedzooError

# The seeds name attention projections by their own architecture's module names; the same projection has
# another name elsewhere (ChatGLM's fused query_key_value = Llama/GLM-4's q/k/v_proj). A target that does not
# exist in the model is translated through this table, so a recipe's LoRA means the same thing on its
# modern base; a target that exists nowhere is an error naming it.
TARGET_ALIASES = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "q_proj": ("query_key_value",),
    "k_proj": ("query_key_value",),
    "v_proj": ("query_key_value",),
    "dense": ("o_proj",),
    "o_proj": ("dense",),
    "dense_h_to_4h": ("gate_proj", "up_proj"),
    "dense_4h_to_h": ("down_proj",),
    "gate_proj": ("dense_h_to_4h",),
    "up_proj": ("dense_h_to_4h",),
    "down_proj": ("dense_4h_to_h",),
}
LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.layers", "transformer.encoder.layers",
               "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _unwrap(model):
    """The transformers model under peft / DDP wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def linear_names(model) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def resolve_targets(model, targets) -> list[str]:
    """The recipe's LoRA target modules, translated to this architecture's names where they differ."""
    targets = _as_list(targets)
    present = linear_names(model)
    out: list[str] = []
    for target in targets:
        names = [target] if target in present else [a for a in TARGET_ALIASES.get(target, ()) if a in present]
        if not names:
            raise MedzooError(f"method parameter target_modules: {target!r} is not a linear layer of "
                              f"{type(_unwrap(model)).__name__}; its linear layers are: {', '.join(sorted(present))}")
        out.extend(n for n in names if n not in out)
    return out


def decoder_layers(model) -> tuple[str, list]:
    """(dotted path, module list) of the model's decoder layers, found generically."""
    import torch

    base = _unwrap(model)
    for path in LAYER_LISTS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return path, list(obj)
    raise MedzooError(f"freeze: cannot find the decoder layer list of {type(base).__name__} "
                      f"(looked for {', '.join(LAYER_LISTS)})")


def apply_lora(model, params: dict, run: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=int(params["r"]), lora_alpha=float(params["alpha"]),
                        lora_dropout=float(params["dropout"]), target_modules=resolve_targets(model, params["target_modules"]))
    return get_peft_model(model, config)


def apply_qlora(model, params: dict, run: dict):
    import torch

    if not torch.cuda.is_available():
        raise MedzooError("method qlora needs a CUDA GPU (4-bit NF4 through bitsandbytes); this machine has none. "
                          "Use --method lora (or a profile without quantization)")
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(run.get("gradient_checkpointing")),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, params, run)


def freeze_names(model, params: dict) -> list[str]:
    """Names (as in the model's state_dict) of the parameters Freeze trains: the last N layers' named modules."""
    n = int(params["num_layer_trainable"])
    modules = _as_list(params["name_module_trainable"])
    path, layers = decoder_layers(model)
    if not 0 < n <= len(layers):
        raise MedzooError(f"method parameter num_layer_trainable: {n} is out of range; the model has {len(layers)} layers")
    ids = list(range(len(layers) - n, len(layers)))  # the seed hard-coded 27/26/25 for 28 layers
    base = _unwrap(model)
    pattern = re.compile(rf"^{re.escape(path)}\.({'|'.join(map(str, ids))})\.({'|'.join(map(re.escape, modules))})\.")
    names = [name for name, _ in base.named_parameters() if pattern.match(name)]
    if not names:
        raise MedzooError(f"method parameter name_module_trainable: no module named {modules} in layers {ids} "
                          f"of {type(base).__name__}")
    return names


def apply_freeze(model, params: dict, run: dict):
    names = set(freeze_names(model, params))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return model


def has_native_prefix(model) -> bool:
    """ChatGLM-6B's own P-Tuning v2 (``transformer.prefix_encoder``, created when config.pre_seq_len is set)."""
    return getattr(getattr(_unwrap(model), "transformer", None), "prefix_encoder", None) is not None


def apply_ptuning(model, params: dict, run: dict):
    if has_native_prefix(model):
        for name, param in model.named_parameters():
            param.requires_grad_(".prefix_encoder." in f".{name}")
        return model
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(params["pre_seq_len"]),
                                prefix_projection=bool(params["prefix_projection"]))
    if params.get("prefix_hidden_size"):
        config.encoder_hidden_size = int(params["prefix_hidden_size"])
    return get_peft_model(model, config)


def apply_full(model, params: dict, run: dict):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def gradient_checkpointing(model, run: dict) -> tuple[bool, str | None]:
    """(use gradient checkpointing, why not where the profile asked for it). transformers drops the
    past_key_values under gradient checkpointing, and peft's P-Tuning v2 passes its prefixes as exactly
    that: the step would fail on a mask/key length mismatch."""
    if not run["gradient_checkpointing"]:
        return False, None
    if run["method"] == "ptuning-v2" and layout_of(model, "ptuning-v2") == "peft":
        return False, (f"profile {run['profile']!r} asks for gradient checkpointing, but peft's P-Tuning v2 "
                       "prefixes are dropped under it by transformers; training without it (more activation memory)")
    return True, None


def prepare(model, run: dict) -> str | None:
    """Ready a model whose method is applied for training (medzoo.train.run and medzoo.memtrace alike):
    trainable weights in fp32 under mixed precision, gradient checkpointing where the profile asks for it
    and the method allows. Returns the note to show where it does not."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    checkpointing, note = gradient_checkpointing(model, run)
    if checkpointing:
        inner = _unwrap(model)
        inner.config.use_cache = False
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return note


def packable(model, run: dict, prefix_lm: bool) -> bool:
    """Whether micro-batches are packed: prefix-LM masks (ChatGLM-6B) and peft's prefix keys take a 2-D
    mask only."""
    if not run["training"].get("packing", True) or prefix_lm:
        return False
    return not (run["method"] == "ptuning-v2" and layout_of(model, "ptuning-v2") == "peft")


def layout_of(model, method: str) -> str:
    if method == "full":
        return "full"
    if method == "freeze":
        return "freeze"
    if method == "ptuning-v2" and has_native_prefix(model):
        return "prefix"
    return "peft"


def trainable_state(model) -> dict:
    """The trained tensors by their names in the unwrapped model's state_dict (what checkpoints store)."""
    base = model.module if hasattr(model, "module") and not hasattr(model, "config") else model
    return {name: p.detach() for name, p in base.named_parameters() if p.requires_grad}


def save_weights(model, tokenizer, method: str, folder: Path, state: dict | None = None) -> str:
    """Write the trained weights in the method's layout (docs/model-folder.md) and return the layout.
    ``state``: the full state dict gathered from a sharded (FSDP) model; None reads the model itself."""
    from safetensors.torch import save_file

    folder = Path(folder)
    layout = layout_of(model, method)
    if hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # DDP
    kwargs = {"state_dict": state} if state is not None else {}
    if layout == "peft":
        model.save_pretrained(str(folder / "adapter"), safe_serialization=True, **kwargs)
    elif layout in ("freeze", "prefix"):
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        source = state if state is not None else {n: p for n, p in model.named_parameters()}
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in source.items() if n in trained}
        save_file(tensors, str(folder / ("trainable.safetensors" if layout == "freeze" else "prefix.safetensors")))
    else:
        model.save_pretrained(str(folder / "model"), safe_serialization=True, max_shard_size="2GB", **kwargs)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return layout
