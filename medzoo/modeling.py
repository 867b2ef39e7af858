"""Loading models: a base by catalog name, hub id or folder, and any model of the zoo whatever its layout
(docs/model-folder.md). Chat, web, serve, merge, push round-trips and training all load through here.

Nothing is loaded with remote code unless the caller passes ``trust_remote_code=True``; ChatGLM-6B (v1)
bases load through medzoo's own implementation (medzoo.chatglm) instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medzoo import host, zoo
from medzoo.objects import BaseModel, MedzooError, PromptTemplate, Recipe

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32"}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: PromptTemplate
    manifest: dict
    recipe: Recipe | None
    name: str
    folder: Path | None = None
    generation: dict = field(default_factory=dict)   # the recipe's defaults, then the model's own


def pick_device(device: str | None = None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedzooError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise MedzooError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "", "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise MedzooError(f"--dtype {dtype!r}: expected one of auto, bf16, fp16, fp32")
    return getattr(torch, DTYPES[dtype])


def quantization_config(quantization: str | None, dtype):
    if not quantization:
        return None
    import torch

    if not torch.cuda.is_available():
        raise MedzooError(f"{quantization} quantization needs a CUDA GPU (bitsandbytes); this machine has none. "
                          "Use a profile without quantization, e.g. --profile cpu-demo or gpu-24gb")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MedzooError(f"{quantization} quantization needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "4bit"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization in ("int8", "8bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    raise MedzooError(f"quantization {quantization!r}: expected nf4 or int8")


def base_source(base: str) -> tuple[BaseModel | None, str, str | None]:
    """(registered BaseModel or None, local folder or hub id to load, revision) for a base name."""
    cat = host.catalog()
    if base in cat.base_models:
        b = cat.base_models[base]
        if b.hub_id.startswith("local:"):
            from medzoo import tiny

            if b.name != tiny.NAME:
                raise MedzooError(f"base model {base!r} is local-only and medzoo does not know how to build it")
            return b, str(tiny.ensure()), None
        return b, b.hub_id, b.revision
    if Path(base).is_dir():
        return None, str(Path(base).resolve()), None
    for b in cat.base_models.values():
        if b.hub_id.lower() == base.lower():
            return b, b.hub_id, b.revision
    return None, base, None


def _is_chatglm(registered: BaseModel | None, src: str) -> bool:
    if registered is not None:
        return registered.architecture == "chatglm"
    config = Path(src) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type") == "chatglm"
        except ValueError:
            raise MedzooError(f"{config}: not valid JSON") from None
    return False


def load_base(base: str, *, device: str | None = None, dtype: str | None = None, revision: str | None = None,
              trust_remote_code: bool = False, config_overrides: dict | None = None,
              quantization: str | None = None, device_map: Any = None):
    """(model, tokenizer) of a base model given by catalog name, hub id or folder."""
    import torch  # noqa: F401

    registered, src, default_revision = base_source(base)
    revision = revision or default_revision
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    quant = quantization_config(quantization, torch_dtype)
    if _is_chatglm(registered, src) and not trust_remote_code:
        from medzoo.chatglm.loading import load_chatglm

        model, tokenizer = load_chatglm(src, revision=revision, dtype=torch_dtype, device=device,
                                        config_overrides=config_overrides)
        return model, _ensure_pad(tokenizer)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
        for key, value in (config_overrides or {}).items():
            setattr(config, key, value)
        kwargs = {"dtype": torch_dtype}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map=device_map or {"": 0})
        elif device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(src, config=config, revision=revision,
                                                     trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise MedzooError(f"base model {src!r} needs its own remote code; medzoo never runs it unless you "
                              "pass --trust-remote-code") from None
        raise MedzooError(f"base model {src!r}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise MedzooError(f"base model {src!r} cannot be loaded: {str(exc).splitlines()[0]} "
                          "(offline? set HF_ENDPOINT or pull it first)") from None
    if quant is None and device_map is None:
        model.to(device)
    return model, _ensure_pad(tokenizer)


def _ensure_pad(tokenizer):
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_state(path: Path) -> dict:
    """Tensors from a safetensors file; a corrupt or truncated file is an error naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise MedzooError(f"{path}: missing weights file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        raise MedzooError(f"{path}: corrupt or unreadable safetensors file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def load_partial_state(model, path: Path) -> None:
    """Load trained tensors (Freeze layers, a P-Tuning prefix) into a model; every tensor must match by
    name and shape, so a state dict of another model is refused instead of half-applied."""
    state = load_state(path)
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise MedzooError(f"{path}: tensor {name!r} is not a parameter of the base model "
                              f"({type(model).__name__}); is this checkpoint for another base?")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise MedzooError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the base model's is "
                              f"{tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def load_model(spec: str, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
               quantization: str | None = None, base: str | None = None) -> LoadedModel:
    """Any model: a zoo name or model folder (trained or pulled), or a recipe name (its base model with its
    template; ``base`` overrides which base)."""
    cat = host.catalog()
    is_folder = (Path(spec) / zoo.MANIFEST).is_file()
    if not is_folder and spec not in zoo.entries() and (spec in cat.recipes or spec in cat.aliases):
        recipe = cat.recipe(spec)
        base_name = base or recipe.base_model
        model, tokenizer = load_base(base_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                     quantization=quantization)
        model.eval()
        manifest = {"recipe": recipe.name, "method": "base", "base_model": base_name, "template": recipe.template}
        return LoadedModel(model, tokenizer, cat.templates[recipe.template], manifest, recipe, spec,
                           generation=dict(recipe.generation))
    name, folder, manifest = zoo.get(spec)
    recipe = cat.recipes.get(manifest["recipe"])
    template_name = manifest.get("template") or (recipe.template if recipe else None)
    if template_name not in cat.templates:
        raise MedzooError(f"{folder}/medzoo.json: template {template_name!r} is not registered "
                          "(is the plugin that defines it installed?)")
    layout = manifest.get("layout", "peft")
    overrides = manifest.get("config_overrides") or {}
    if layout == "full":
        # a merged export (`medzoo merge`) keeps the model at the folder's root so plain transformers loads it
        weights = folder / "model" if (folder / "model").is_dir() else folder
        model, tokenizer = load_base(str(weights), device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code, quantization=quantization)
    else:
        model, tokenizer = load_base(base or manifest["base_model"], device=device, dtype=dtype,
                                     revision=manifest.get("base_revision"), trust_remote_code=trust_remote_code,
                                     config_overrides=overrides, quantization=quantization)
        if layout == "peft":
            model = _load_adapter(model, folder / "adapter")
        elif layout in ("freeze", "prefix"):
            load_partial_state(model, folder / ("trainable.safetensors" if layout == "freeze" else "prefix.safetensors"))
        else:
            raise MedzooError(f"{folder}/medzoo.json: unknown layout {layout!r}")
    if (folder / "tokenizer").is_dir():
        tokenizer = _ensure_pad(_load_tokenizer(folder / "tokenizer", trust_remote_code))
    model.eval()
    generation = dict(recipe.generation) if recipe else {}
    generation.update(manifest.get("generation") or {})
    return LoadedModel(model, tokenizer, cat.templates[template_name], manifest, recipe, name, folder, generation)


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    config = path / "tokenizer_config.json"
    if config.is_file() and "ChatGLM" in config.read_text(encoding="utf-8"):
        from medzoo.chatglm.loading import register

        register()
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _load_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise MedzooError(f"{adapter_dir}: no adapter_config.json")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MedzooError(f"{config}: not valid JSON ({exc})") from None
    weights = adapter_dir / "adapter_model.safetensors"
    load_state(weights)  # a corrupt file fails here with its name, not deep inside peft
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MedzooError(f"{adapter_dir}: the adapter does not fit the base model: "
                          f"{str(exc).splitlines()[0]}") from None
