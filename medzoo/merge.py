"""Export a model of the zoo as one standalone folder (``medzoo merge``).

LoRA (and QLoRA) adapters are folded into the base weights (peft ``merge_and_unload``); Freeze and full
models already are whole models once loaded. Either way the folder is a plain transformers model —
sharded safetensors, config, tokenizer, ``generation_config.json`` with the recipe's defaults and a model card
— that ``AutoModelForCausalLM.from_pretrained(folder)`` loads with no medzoo installed, plus a ``medzoo.json``
(layout "full") so the zoo loads it too, with the recipe's template.

P-Tuning v2 cannot be merged: its prefix is extra key/value vectors in every layer, not a change of any
weight. Its export is the base model (at the root, loadable by transformers) plus the prefix (peft
``adapter/`` or ChatGLM's ``prefix_encoder`` inside the weights) that medzoo applies on load.

The export is written to a temporary folder next to the target and renamed into place at the end, so an
interrupted export never leaves a folder that looks complete.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from medzoo import zoo
from medzoo.objects import MedzooError

GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


@dataclass
class Export:
    folder: Path
    merged: bool                      # False: P-Tuning v2, exported as base + prefix
    method: str
    message: str
    registered: str | None = None


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def export(lm, out: Path, *, max_shard_size: str = "2GB", register: str | None = None,
           replace: bool = False) -> Export:
    """Write ``lm`` (a :class:`medzoo.modeling.LoadedModel`) as a standalone folder at ``out``."""
    out = Path(out).resolve()
    if register is not None and not zoo.NAME.match(register):
        raise MedzooError(f"--register {register!r}: a zoo name holds only letters, digits, '.', '_', '-', '@'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replace:
        raise MedzooError(f"{out} exists and is not empty; choose another --out or pass --force")
    manifest = lm.manifest
    method, layout = manifest.get("method", "base"), manifest.get("layout", "peft")
    if method == "base":
        raise MedzooError(f"{lm.name} is a base model with nothing to merge; `medzoo merge` takes a trained or "
                          "pulled model (see `medzoo list --local`)")
    if getattr(lm.model, "is_loaded_in_4bit", False) or getattr(lm.model, "is_loaded_in_8bit", False) \
            or getattr(getattr(lm.model, "config", None), "quantization_config", None):
        raise MedzooError("merging needs the base's full-precision weights; drop --load-in-4bit/--load-in-8bit "
                          "(merge on CPU with --device cpu if the GPU is too small)")

    model, merged, adapter = lm.model, True, None
    if layout == "peft" and _is_prompt_learning(model):
        merged, adapter = False, model
        model = model.get_base_model()
        message = (f"{method} cannot be merged into the weights (its prefix is extra keys/values in every layer, "
                   f"not a weight change): exported the base model plus the prefix in adapter/; medzoo loads "
                   f"the folder as the tuned model, plain transformers loads only the base")
    elif layout == "peft":
        model = model.merge_and_unload()
        lm.model = model  # the adapter is folded in: the loaded object is no longer a peft model
        message = f"merged the {method} adapter into the base weights"
    elif layout == "prefix":
        merged = False
        message = (f"{method} cannot be merged into the weights: exported the base with its prefix encoder "
                   "(config pre_seq_len); loadable by medzoo")
    else:
        message = f"exported the {method} model ({layout} layout) as one standalone model"
    chatglm = getattr(getattr(model, "config", None), "model_type", None) == "chatglm"
    if chatglm:  # ChatGLM-6B (v1) exists in transformers only as remote code, which medzoo does not run
        message += ("; ChatGLM-6B has no class in transformers: call medzoo.chatglm.register() before "
                    "AutoModelForCausalLM/AutoTokenizer.from_pretrained")

    try:
        with zoo.atomic_dir(out) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
            generation = _generation(lm)
            _write_generation_config(tmp, lm, generation)
            new_manifest = {
                "format": 1, "recipe": manifest.get("recipe"), "method": method,
                "layout": "full" if adapter is None else "peft",
                "base_model": manifest.get("base_model") if adapter is None else str(out),
                "base_model_id": manifest.get("base_model_id") or manifest.get("base_model"),
                "base_revision": manifest.get("base_revision"),
                "template": lm.template.name, "method_params": manifest.get("method_params") or {},
                "generation": generation,
                "config_overrides": (manifest.get("config_overrides") or {}) if layout == "prefix" else {},
                "source": f"merge:{manifest.get('source') or lm.name}", "merged": merged,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if adapter is not None:
                adapter.save_pretrained(tmp / "adapter")
            zoo.write_manifest(tmp, new_manifest)
            (tmp / "README.md").write_text(card(lm, new_manifest, message, chatglm=chatglm), encoding="utf-8")
    except ValueError as exc:  # e.g. a --max-shard-size transformers cannot parse
        raise MedzooError(f"export to {out} failed, nothing written: {str(exc).splitlines()[0]}") from None
    result = Export(out, merged, method, message)
    if register:
        zoo.register(register, out, replace=replace)
        result.registered = register
    return result


def _generation(lm) -> dict:
    from medzoo import generate

    return {k: v for k, v in generate.settings(lm).items() if k in GENERATION_KEYS}


def _write_generation_config(folder: Path, lm, generation: dict) -> None:
    """generation_config.json with the recipe's defaults, so plain ``model.generate`` answers the same way.
    Sampling settings are left out when the recipe decodes without sampling (transformers refuses them)."""
    from transformers import GenerationConfig

    keep = {k: v for k, v in generation.items() if generation.get("do_sample") or k not in SAMPLING_ONLY}
    tok = lm.tokenizer
    ids = {k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                             ("pad_token_id", tok.pad_token_id)) if v is not None}
    GenerationConfig(**ids, **keep).save_pretrained(folder)


def card(lm, manifest: dict, message: str, chatglm: bool = False) -> str:
    t = lm.template
    example = t.render("偏头痛有哪些症状？")
    base = manifest.get("base_model_id")
    front = ["---", "library_name: transformers", "language:", "- zh", "tags:", "- medical", "- medzoo",
             f"- {manifest.get('recipe')}", f"- {manifest.get('method')}"]
    if base and not Path(str(base)).is_absolute() and "/" in str(base):
        front.append(f"base_model: {base}")
    front.append("---")
    settings = ", ".join(f"{k}={v}" for k, v in manifest["generation"].items())
    load = ("AutoModelForCausalLM.from_pretrained(path)  # the base model only: the prefix needs medzoo"
            if manifest["layout"] == "peft" else "AutoModelForCausalLM.from_pretrained(path)")
    register = ("from medzoo.chatglm import register\nregister()  # ChatGLM-6B (v1): medzoo's own classes, "
                "no remote code\n" if chatglm else "")
    body = f"""
# {lm.name} (exported by medzoo merge)

Recipe **{manifest.get('recipe')}**, tuning method **{manifest.get('method')}**, base `{base}`.
{message[0].upper() + message[1:]}.

## Prompt

The model was trained on the `{t.name}` template and answers well only in it. A question becomes:

```
{example}
```
{f"Cut the answer at {', '.join(repr(s) for s in t.stop)}." if t.stop else ""}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{register}path = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(path)
model = {load}
```

or with medzoo, which applies the template and the stop strings: `medzoo chat <this folder>`.

Generation defaults (also in `generation_config.json` where transformers accepts them): {settings}.
"""
    return "\n".join(front) + "\n" + body
