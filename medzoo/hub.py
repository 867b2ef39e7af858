"""Talks to the Hugging Face Hub: ``pull`` downloads a published checkpoint, identifies what it is and converts it
into a model folder of the local zoo (docs/model-folder.md); ``push`` uploads a zoo model folder (safetensors
only) with a model card.

Downloads go through ``huggingface_hub.snapshot_download``: the standard cache, resumable, parallel, with a
progress bar. HF_ENDPOINT, HF_HUB_CACHE/HF_HOME and HF_HUB_OFFLINE are read when a command runs (not when
huggingface_hub was imported), so a mirror or offline mode chosen at any time is honoured. Pickled files are
read with ``torch.load(weights_only=True)`` at most; the original projects' ``finetuning_args.bin`` and
``training_args.bin`` are pickles of their own classes and are never loaded. A token is never printed.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medzoo import cards, host, registry, zoo
from medzoo.objects import MedzooError, PublishedCheckpoint

DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "ice_text.model",
                   "chat_template.jinja", "chat_template.json", "sentencepiece.bpe.model", "spiece.model")
NEVER_LOADED = {  # file name -> why it is never opened
    "finetuning_args.bin": "a pickle of the original project's own argument class: never unpickled",
    "training_args.bin": "a pickle of transformers' TrainingArguments: never unpickled",
    "optimizer.pt": "optimizer state: not needed to run the model, never unpickled",
    "scheduler.pt": "scheduler state: not needed to run the model, never unpickled",
    "rng_state.pth": "random-number state: not needed to run the model, never unpickled",
}
RUN_LOGS = ("trainer_state.json", "train_results.json", "all_results.json", "eval_results.json")
LAYOUT_OF_REGISTRY = {"peft": "peft", "freeze-state-dict": "freeze", "prefix-state-dict": "prefix",
                      "full": "full", "medzoo": "medzoo"}
PEFT_METHODS = {"LORA": "lora", "PREFIX_TUNING": "ptuning-v2", "P_TUNING": "ptuning-v2"}
LEGACY_ADAPTER_KEYS = ("enable_lora", "merge_weights")   # peft < 0.3 wrote these; current peft warns on them
PUSH_TOP = ("medzoo.json", "adapter", "trainable.safetensors", "prefix.safetensors", "model", "tokenizer",
            "config.yaml", "metrics.jsonl", "loss.png")
SECRET_NAME = re.compile(r"^(\.env(\..*)?|\.netrc|\.git-credentials|credentials.*|id_(rsa|dsa|ecdsa|ed25519).*|"
                         r".*\.(pem|key|p12|pfx)|\.?(hf_)?token|.*\.token|secrets?\.(json|ya?ml|txt))$", re.I)
SECRET_TEXT = [re.compile(rb"hf_[A-Za-z0-9]{30,}"),
               re.compile(rb"(?i)(api[_-]?key|secret|password|passwd|access[_-]?token|auth[_-]?token|hf_token)"
                          rb"[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-./+]{12,}")]


# -- settings, read at call time ------------------------------------------------------------------------------

def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


LOGIN_HINT = "log in with `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"


# -- what to pull ---------------------------------------------------------------------------------------------

@dataclass
class Target:
    repo_id: str
    revision: str
    checkpoint: PublishedCheckpoint | None = None


def parse_target(spec: str, cat, reg, method: str | None = None, revision: str | None = None) -> Target:
    """`owner/name`, `owner/name@revision`, or a recipe name (its first published checkpoint, or the one
    with `method`)."""
    repo_id, _, at_rev = spec.partition("@")
    if revision and at_rev and revision != at_rev:
        raise MedzooError(f"{spec!r} names revision {at_rev!r} but --revision says {revision!r}; give one")
    revision = revision or at_rev or None
    if "/" not in repo_id:
        name = cat.aliases.get(repo_id, repo_id)
        if name not in cat.recipes:
            raise MedzooError(host.unknown("recipe", repo_id, list(cat.recipes) + list(cat.aliases))
                              + " (give a recipe name or a Hub repo as owner/name)")
        published = reg.checkpoints_of(name)
        if method:
            published = [c for c in published if c.method == method]
        if not published:
            offered = sorted({c.method for c in reg.checkpoints_of(name)})
            what = f" with method {method!r} (published: {', '.join(offered) or 'none'})" if method else ""
            raise MedzooError(f"recipe {name!r} has no published checkpoint{what} in {reg.path.name}")
        ckpt = published[0]
        return Target(ckpt.repo_id, revision or ckpt.revision, ckpt)
    if not HUB_ID.match(repo_id):
        raise MedzooError(f"{repo_id!r} is not a Hub repo id (owner/name)")
    ckpt = reg.checkpoint(repo_id)
    if ckpt is not None and method and ckpt.method != method:
        raise MedzooError(f"{repo_id} is a {ckpt.method} checkpoint ({reg.path.name}:{reg.lines[ckpt.repo_id]}), "
                          f"not {method}")
    return Target(ckpt.repo_id if ckpt else repo_id, revision or (ckpt.revision if ckpt else "main"), ckpt)


# -- download -------------------------------------------------------------------------------------------------

def _transport_error(exc: BaseException) -> bool:
    return any(type(e).__module__.split(".")[0].startswith("httpx") for e in _chain(exc))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def download(repo_id: str, revision: str) -> tuple[Path, str]:
    """(snapshot folder, commit sha) of repo_id@revision, from the cache when it is there."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = endpoint()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), endpoint=where,
                                   local_files_only=offline())
    except GatedRepoError:
        raise MedzooError(f"{repo_id} is gated: accept its conditions at {where}/{repo_id}, then "
                          f"{LOGIN_HINT}") from None
    except RevisionNotFoundError:
        raise MedzooError(f"{repo_id}: revision {revision!r} not found (see {where}/{repo_id}/tree/main)") from None
    except RepositoryNotFoundError:
        # some servers (mirrors) answer a missing revision like a missing repo: ask about the repo alone
        if revision != "main" and not offline():
            try:
                HfApi(endpoint=where).repo_info(repo_id, revision="main")
            except Exception:
                pass
            else:
                raise MedzooError(f"{repo_id}: revision {revision!r} not found") from None
        hint = ("; if it is private, check that your token may read it" if has_token()
                else f"; if it is private or gated, {LOGIN_HINT}")
        raise MedzooError(f"{repo_id}: repository not found on {where}{hint}") from None
    except LocalEntryNotFoundError as exc:
        if offline():
            raise MedzooError(f"{repo_id}@{revision} is not in the local cache and HF_HUB_OFFLINE is set: pull it "
                              "once online (unset HF_HUB_OFFLINE)") from None
        raise MedzooError(f"cannot reach {where} to pull {repo_id} ({_reason(exc)}) and it is not in the local "
                          "cache: check your network, set HF_ENDPOINT to a reachable mirror, or pull once online "
                          "and use HF_HUB_OFFLINE=1 later") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise MedzooError(f"{repo_id}: {where} refused access (HTTP {status}); {LOGIN_HINT} with a token that "
                              "may read it") from None
        raise MedzooError(f"{repo_id}: download from {where} failed (HTTP {status}); run the same command "
                          "again to resume") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MedzooError(f"disk full while downloading {repo_id} into {cache_dir() or 'the Hugging Face cache'}"
                              ": free space or point HF_HOME elsewhere; the same command resumes") from None
        if _transport_error(exc) or "Consistency check failed" in str(exc):
            raise MedzooError(f"download of {repo_id} was interrupted ({_reason(exc)}); run the same command "
                              "again to resume") from None
        raise
    except Exception as exc:
        if _transport_error(exc):
            raise MedzooError(f"download of {repo_id} was interrupted ({_reason(exc)}); run the same command "
                              "again to resume") from None
        raise
    folder = Path(folder)
    return folder, folder.name


def _reason(exc: BaseException) -> str:
    for e in _chain(exc):
        if type(e).__module__.split(".")[0].startswith("httpx") or isinstance(e, ConnectionError):
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- identify -------------------------------------------------------------------------------------------------

@dataclass
class Identified:
    layout: str                          # peft | freeze | prefix | full | medzoo
    recipe: str
    method: str
    base_model: str                      # registered name, or hub id / path the user confirmed
    base_model_id: str
    base_revision: str | None
    template: str
    method_params: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)
    tensors: dict | None = None          # state-dict layouts: normalised name -> tensor
    evidence: list = field(default_factory=list)  # how each fact was found, for the report
    manifest: dict | None = None         # a medzoo-pushed repo's own medzoo.json


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.relative_to(folder).as_posix().startswith(".git"))


def read_state(path: Path) -> dict:
    """Tensors of a safetensors file or of a raw torch state dict (weights only: never arbitrary pickles)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise MedzooError(f"{path.name}: unreadable safetensors file ({type(exc).__name__})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedzooError(f"{path.name}: not a plain tensor state dict, refused rather than unpickled "
                          f"({first[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedzooError(f"{path.name}: holds {type(state).__name__}, not a state dict of tensors")
    return state


def _card_meta(folder: Path) -> dict:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        meta, _, _ = cards.split(readme.read_text(encoding="utf-8", errors="replace"), "README.md")
    except MedzooError:
        return {}
    return meta


def _registered_base(cat, value) -> str | None:
    """The registered BaseModel a stored value names (by name or hub id), or None. Paths never match."""
    if not isinstance(value, str) or not value:
        return None
    if value in cat.base_models:
        return value
    for b in cat.base_models.values():
        if b.hub_id.lower() == value.lower():
            return b.name
    return None


def _architecture(names) -> str | None:
    names = list(names)
    if any("prefix_encoder" in n or "query_key_value" in n or "dense_h_to_4h" in n or n.startswith("transformer.")
           for n in names):
        return "chatglm"
    if any(".self_attn." in n or ".mlp.gate_proj" in n for n in names):
        return "llama"
    return None


def normalise_freeze(state: dict, architecture: str | None) -> tuple[dict, dict]:
    """Tensor names as in the base model's state dict, and the Freeze parameters they imply."""
    out, layers, modules = {}, set(), set()
    for name, tensor in state.items():
        n = name
        for prefix in ("base_model.model.", "module.", "_orig_mod."):
            while n.startswith(prefix):
                n = n[len(prefix):]
        if architecture == "chatglm" and n.startswith("layers."):
            n = "transformer." + n
        m = re.search(r"(?:^|\.)layers\.(\d+)\.([A-Za-z_]+)\.", n)
        if not m:
            raise MedzooError(f"tensor {name!r} is not inside a transformer layer; not a Freeze checkpoint")
        layers.add(int(m.group(1)))
        modules.add(m.group(2))
        out[n] = tensor.contiguous()
    params = {"num_layer_trainable": len(layers), "name_module_trainable": ",".join(sorted(modules)),
              "layers": sorted(layers)}
    return out, params


def normalise_prefix(state: dict) -> tuple[dict, dict]:
    out = {}
    for name, tensor in state.items():
        i = name.find("prefix_encoder.")
        if i < 0:
            raise MedzooError(f"tensor {name!r} is not part of a prefix encoder")
        out["transformer." + name[i:]] = tensor.contiguous()
    key = "transformer.prefix_encoder.embedding.weight"
    if key not in out:
        raise MedzooError(f"no prefix_encoder.embedding.weight among {', '.join(sorted(state))}")
    overrides = {"pre_seq_len": int(out[key].shape[0]),
                 "prefix_projection": any(".trans." in n for n in out)}
    return out, overrides


def _find(files: list[str], *names: str) -> str | None:
    for name in names:
        if name in files:
            return name
    return None


def identify(folder: Path, target: Target, cat, *, base: str | None = None, recipe: str | None = None) -> Identified:
    """What the snapshot holds and what it is, trusting in order: the user's --base/--recipe, registry.yaml,
    the card's metadata, the adapter config, the tensor names."""
    files = files_of(folder)
    ckpt = target.checkpoint
    evidence = []
    state = None
    adapter_cfg = None
    manifest = None
    if "medzoo.json" in files:
        layout = "medzoo"
        manifest = zoo.read_manifest(folder)
    elif _find(files, "adapter_config.json", "adapter/adapter_config.json"):
        layout = "peft"
        path = folder / _find(files, "adapter_config.json", "adapter/adapter_config.json")
        try:
            adapter_cfg = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise MedzooError(f"{target.repo_id}: {path.name} is not valid JSON ({exc})") from None
    elif "config.json" in files and any(re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)", f)
                                        or f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                                        for f in files):
        layout = "full"
    else:
        weights = _find(files, "adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin",
                        "model.safetensors")
        if weights is None:
            raise MedzooError(f"{target.repo_id}@{target.revision[:12]}: not a layout medzoo knows (no medzoo.json, "
                              "adapter_config.json, config.json + weights or adapter_model.bin); found: "
                              f"{', '.join(files) or 'no files'}")
        state = read_state(folder / weights)
        names = sorted(state)
        if any("prefix_encoder" in n for n in names):
            layout = "prefix"
        elif names and all(re.search(r"(?:^|\.)layers\.\d+\.", n) for n in names):
            layout = "freeze"
        else:
            shown = ", ".join(names[:6]) + (f", … ({len(names)} tensors)" if len(names) > 6 else "")
            raise MedzooError(f"{target.repo_id}: {weights} is neither a P-Tuning v2 prefix encoder nor Freeze layer "
                              f"weights, and there is no adapter_config.json or config.json; tensors: {shown or 'none'}")
        evidence.append(f"layout {layout}: from the tensor names in {weights}")
    if ckpt is not None:
        expected = LAYOUT_OF_REGISTRY[ckpt.layout]
        if expected != layout:
            raise MedzooError(f"{target.repo_id}: registry.yaml says layout {ckpt.layout!r} but the repo holds a "
                              f"{layout} checkpoint (files: {', '.join(files)})")
    card = _card_meta(folder)

    # base model: --base, registry, medzoo.json, card, adapter config, tensor architecture
    base_name, base_id, base_rev = None, None, None
    if base:
        reg_base = _registered_base(cat, base)
        if reg_base:
            base_name = reg_base
        else:
            base_name, base_id = base, base
        evidence.append(f"base {base}: given with --base")
    elif ckpt is not None:
        base_name = ckpt.base_model
        evidence.append(f"base {base_name}: registry.yaml")
    else:
        candidates = []
        if manifest:
            candidates += [("medzoo.json", manifest.get("base_model")), ("medzoo.json", manifest.get("base_model_id"))]
        cb = card.get("base_model")
        candidates += [("the card's base_model", v) for v in (cb if isinstance(cb, list) else [cb])]
        if adapter_cfg:
            candidates.append(("adapter_config.json", adapter_cfg.get("base_model_name_or_path")))
        for source, value in candidates:
            if _registered_base(cat, value):
                base_name = _registered_base(cat, value)
                evidence.append(f"base {base_name}: {source} says {value!r}")
                break
        if base_name is None and state is not None:
            arch = _architecture(state)
            matching = [b.name for b in cat.base_models.values() if b.architecture == arch]
            if len(matching) == 1:
                base_name = matching[0]
                evidence.append(f"base {base_name}: the only registered {arch} base (tensor names)")
        if base_name is None:
            stored = [f"{s} says {v!r}" for s, v in candidates if v]
            raise MedzooError(f"{target.repo_id}: cannot tell its base model"
                              f"{' (' + '; '.join(stored) + ', not a registered base)' if stored else ''}; "
                              "pass --base with a registered base name or hub id")
    if base_name in cat.base_models:
        b = cat.base_models[base_name]
        base_id, base_rev = b.hub_id, b.revision
    if manifest and not base and ckpt is None and manifest.get("base_revision") and \
            base_id == manifest.get("base_model_id"):
        base_rev = manifest.get("base_revision")

    # tuning method
    if ckpt is not None:
        method = ckpt.method
    elif manifest and manifest.get("method"):
        method = manifest["method"]
    elif layout == "peft":
        peft_type = str(adapter_cfg.get("peft_type", "")).upper()
        if peft_type not in PEFT_METHODS:
            raise MedzooError(f"{target.repo_id}: adapter_config.json has peft_type {peft_type or 'none'!r}; "
                              f"medzoo knows {', '.join(PEFT_METHODS)}")
        method = PEFT_METHODS[peft_type]
    else:
        method = {"freeze": "freeze", "prefix": "ptuning-v2", "full": "full"}[layout]

    # recipe: --recipe, registry, medzoo.json, card tags, the one recipe on this base offering this method
    if recipe:
        recipe_name = cat.aliases.get(recipe, recipe)
        if recipe_name not in cat.recipes:
            raise MedzooError(host.unknown("recipe", recipe, list(cat.recipes) + list(cat.aliases)))
    elif ckpt is not None:
        recipe_name = ckpt.recipe
    elif manifest and cat.aliases.get(manifest.get("recipe"), manifest.get("recipe")) in cat.recipes:
        recipe_name = cat.aliases.get(manifest["recipe"], manifest["recipe"])
    else:
        tags = [t for t in (card.get("tags") or []) if isinstance(t, str)]
        tagged = [cat.aliases.get(t, t) for t in tags if cat.aliases.get(t, t) in cat.recipes]
        fitting = sorted(r.name for r in cat.recipes.values()
                         if base_name in (r.base_model, r.modern_base) and method in r.methods and not r.variant_of)
        if tagged:
            recipe_name = tagged[0]
            evidence.append(f"recipe {recipe_name}: the card's tags")
        elif len(fitting) == 1:
            recipe_name = fitting[0]
            evidence.append(f"recipe {recipe_name}: the only recipe on {base_name} offering {method}")
        else:
            raise MedzooError(f"{target.repo_id}: cannot tell which recipe it belongs to"
                              f"{' (candidates: ' + ', '.join(fitting) + ')' if fitting else ''}; pass --recipe")
    r = cat.recipes[recipe_name]
    template = (manifest or {}).get("template") or r.template
    if template not in cat.templates:
        template = r.template

    ident = Identified(layout=layout, recipe=recipe_name, method=method, base_model=base_name,
                       base_model_id=base_id or base_name, base_revision=base_rev, template=template,
                       evidence=evidence, manifest=manifest)
    from medzoo import recipes as recipes_mod

    try:
        ident.method_params = dict(recipes_mod.method_params(cat, r, method)) if method in r.methods else {}
    except Exception:
        ident.method_params = {}
    if manifest:
        ident.method_params = dict(manifest.get("method_params") or ident.method_params)
        ident.config_overrides = dict(manifest.get("config_overrides") or {})
    if adapter_cfg:
        for key, ours in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                          ("target_modules", "target_modules"), ("num_virtual_tokens", "pre_seq_len")):
            if adapter_cfg.get(key) is not None:
                ident.method_params[ours] = adapter_cfg[key]
    if layout == "freeze":
        arch = cat.base_models[base_name].architecture if base_name in cat.base_models else _architecture(state)
        ident.tensors, params = normalise_freeze(state, arch)
        ident.method_params.update(params)
    elif layout == "prefix":
        ident.tensors, ident.config_overrides = normalise_prefix(state)
        ident.method_params.update(ident.config_overrides)
    return ident


# -- convert --------------------------------------------------------------------------------------------------

def save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    seen, clean = {}, {}
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        clean[name] = t.clone() if key in seen else t  # safetensors refuses tensors sharing memory
        seen[key] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(clean, str(path), metadata={"format": "pt"})


def convert(folder: Path, ident: Identified, out: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Write the model folder's files (all but medzoo.json and README.md) into `out`.
    Returns (files written, [(repo file, why it was not used)])."""
    files = files_of(folder)
    used: set[str] = set()
    ignored: list[tuple[str, str]] = []

    def copy(src: str, dest: str) -> None:
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / src, out / dest)
        used.add(src)

    if ident.layout == "peft":
        cfg_name = _find(files, "adapter_config.json", "adapter/adapter_config.json")
        prefix = cfg_name.rpartition("/")[0]
        prefix = prefix + "/" if prefix else ""
        weights = _find(files, prefix + "adapter_model.safetensors", prefix + "adapter_model.bin")
        if weights is None:
            raise MedzooError(f"{cfg_name} has no adapter_model.safetensors or adapter_model.bin beside it")
        config = json.loads((folder / cfg_name).read_text(encoding="utf-8"))
        stored = config.get("base_model_name_or_path")
        config["base_model_name_or_path"] = ident.base_model_id
        for key in LEGACY_ADAPTER_KEYS:
            config.pop(key, None)
        if stored != ident.base_model_id:
            ident.evidence.append(f"adapter base {stored!r} replaced by {ident.base_model_id!r}")
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        zoo.write_json_atomic(out / "adapter" / "adapter_config.json", config)
        save_tensors(read_state(folder / weights), out / "adapter" / "adapter_model.safetensors")
        used.update({cfg_name, weights})
    elif ident.layout in ("freeze", "prefix"):
        name = "trainable.safetensors" if ident.layout == "freeze" else "prefix.safetensors"
        save_tensors(ident.tensors, out / name)
        used.add(_find(files, "adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin",
                       "model.safetensors"))
    elif ident.layout == "full":
        for f in files:
            if "/" in f:
                continue
            if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                copy(f, f"model/{f}")
            elif re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f):
                save_tensors(read_state(folder / f), out / "model" / f.replace("pytorch_model", "model")
                             .replace(".bin", ".safetensors"))
                used.add(f)
            elif f == "pytorch_model.bin.index.json":
                index = json.loads((folder / f).read_text(encoding="utf-8"))
                index["weight_map"] = {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                       for k, v in index.get("weight_map", {}).items()}
                zoo.write_json_atomic(out / "model" / "model.safetensors.index.json", index)
                used.add(f)
            elif f in ("config.json", "generation_config.json") or f in TOKENIZER_FILES or f.endswith(".py"):
                copy(f, f"model/{f}")  # remote code is copied, never run unless --trust-remote-code
    elif ident.layout == "medzoo":
        for f in files:
            top = f.split("/")[0]
            if f.endswith(PICKLE_SUFFIXES):
                ignored.append((f, "a pickle: medzoo folders hold safetensors only, never unpickled"))
            elif top in PUSH_TOP and top != "medzoo.json":
                copy(f, f)
    if ident.layout in ("peft", "freeze", "prefix"):
        for f in files:
            if f in TOKENIZER_FILES:
                copy(f, f"tokenizer/{f}")
    for f in files:
        if f in used or f == ".gitattributes" or f in ("README.md", "medzoo.json") or any(i[0] == f for i in ignored):
            continue
        name = f.rsplit("/", 1)[-1]
        if name in NEVER_LOADED:
            ignored.append((f, NEVER_LOADED[name]))
        elif name in RUN_LOGS:
            ignored.append((f, "the original run's training log: its figures go into the card"))
        elif f.endswith(PICKLE_SUFFIXES):
            ignored.append((f, "a pickle medzoo does not need: never unpickled"))
        else:
            ignored.append((f, "not part of a medzoo model folder"))
    written = files_of(out)
    return written, ignored


def _figures(folder: Path) -> dict:
    figures = {}
    for name in ("all_results.json", "train_results.json"):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                continue
            for key, value in data.items():
                if isinstance(value, (int, float)) and key not in figures:
                    figures[key] = round(value, 4) if isinstance(value, float) else value
    return figures


def pulled_card(folder: Path, ident: Identified, cat, reg, source: str, ignored) -> str:
    """The repo's own README.md when it has one; otherwise the recipe's card with this checkpoint's facts."""
    readme = folder / "README.md"
    if readme.is_file():
        return readme.read_text(encoding="utf-8", errors="replace")
    r = cat.recipes[ident.recipe]
    card_file = None
    for c in reg.checkpoints_of(ident.recipe):
        if c.card and source.startswith(f"hf://{c.repo_id}@"):
            card_file = c.card
    card_file = card_file or r.card
    meta, body = {"language": ["zh"], "license": "other", "tags": [], "datasets": []}, ""
    if card_file and (registry.cards_dir() / card_file).is_file():
        meta, body = cards.read(registry.cards_dir() / card_file)
    meta = dict(meta)
    if HUB_ID.match(ident.base_model_id or ""):
        meta["base_model"] = ident.base_model_id
    meta["library_name"] = "peft" if ident.layout == "peft" else "transformers"
    tags = list(meta.get("tags") or [])
    for tag in ("medical", "medzoo", ident.recipe, ident.method):
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags
    rows = [("source", source), ("layout", ident.layout), ("method", ident.method),
            ("base model", f"{ident.base_model} ({ident.base_model_id})")]
    rows += [(k, v) for k, v in _figures(folder).items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    skipped = "".join(f"- `{f}`: {why}\n" for f, why in ignored)
    section = (f"\n## This checkpoint\n\nPulled with `medzoo pull` and converted to safetensors; the repository "
               f"has no card of its own, so this one is the recipe's.\n\n| fact | value |\n|---|---|\n{table}\n")
    if skipped:
        section += f"\nNot used:\n{skipped}"
    return cards.dump(meta, body.rstrip() + "\n" + section)


# -- pull -----------------------------------------------------------------------------------------------------

@dataclass
class PullResult:
    name: str
    folder: Path
    manifest: dict
    written: list
    ignored: list
    evidence: list
    already: bool = False


def default_name(repo_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._@-]", "-", repo_id.split("/")[-1]).lstrip(".-_@")
    return name or "model"


def pull(spec: str, *, revision: str | None = None, method: str | None = None, name: str | None = None,
         local_dir: str | None = None, base: str | None = None, recipe: str | None = None,
         force: bool = False) -> PullResult:
    cat = host.catalog()
    reg = registry.load(cat)
    target = parse_target(spec, cat, reg, method=method, revision=revision)
    name = name or default_name(target.repo_id)
    if not zoo.NAME.match(name):
        raise MedzooError(f"zoo name {name!r} may hold only letters, digits, '.', '_', '-', '@'; pass --name")
    existing = zoo.entries().get(name)
    if existing and not existing.get("source", "").startswith(f"hf://{target.repo_id}@"):
        raise MedzooError(f"zoo name {name!r} is taken by {existing['path']} ({existing.get('source') or 'no source'}); "
                          f"pass --name or `medzoo rm {name}` first")
    snapshot, commit = download(target.repo_id, target.revision)
    source = f"hf://{target.repo_id}@{commit}"
    dest = Path(local_dir).expanduser().resolve() if local_dir else zoo.models_dir() / name
    if existing and not force and existing.get("source") == source and Path(existing["path"]) == dest and \
            (dest / zoo.MANIFEST).is_file():
        manifest = zoo.read_manifest(dest)
        return PullResult(name, dest, manifest, files_of(dest), [], [], already=True)
    ident = identify(snapshot, target, cat, base=base, recipe=recipe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not (existing and Path(existing["path"]) == dest) and any(dest.iterdir()):
        raise MedzooError(f"{dest} exists and is not this model's folder; choose another --local-dir or --name")
    try:
        with zoo.atomic_dir(dest) as tmp:
            written, ignored = convert(snapshot, ident, tmp)
            r = cat.recipes[ident.recipe]
            manifest = {
                "format": 1, "recipe": ident.recipe, "method": ident.method, "layout": ident.layout,
                "base_model": ident.base_model, "base_model_id": ident.base_model_id,
                "base_revision": ident.base_revision, "template": ident.template,
                "method_params": ident.method_params, "generation": dict(r.generation),
                "config_overrides": ident.config_overrides, "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "ignored": [{"file": f, "why": why} for f, why in ignored],
            }
            if ident.layout == "medzoo":
                original = ident.manifest
                manifest["layout"] = original.get("layout", "peft")
                manifest["generation"] = original.get("generation") or manifest["generation"]
                manifest["trained_from"] = original.get("source")
                for key in ("created", "format"):
                    manifest[key] = original.get(key, manifest[key])
            (tmp / "README.md").write_text(pulled_card(snapshot, ident, cat, reg, source, ignored), encoding="utf-8")
            _check_complete(tmp, manifest)
            zoo.write_manifest(tmp, manifest)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MedzooError(f"disk full while writing {dest}: free space or set MEDZOO_HOME elsewhere") from None
        raise
    zoo.register(name, dest, replace=True)
    return PullResult(name, dest, manifest, files_of(dest), ignored, ident.evidence)


def _check_complete(folder: Path, manifest: dict) -> None:
    need = {"peft": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
            "freeze": ["trainable.safetensors"], "prefix": ["prefix.safetensors"],
            "full": ["model/config.json"]}.get(manifest["layout"], [])
    missing = [f for f in need if not (folder / f).is_file()]
    if manifest["layout"] == "full" and not list((folder / "model").glob("*.safetensors")):
        missing.append("model/*.safetensors")
    if missing:
        raise MedzooError(f"{manifest['source']}: the converted folder lacks {', '.join(missing)}")


# -- push -----------------------------------------------------------------------------------------------------

@dataclass
class PushPlan:
    folder: Path
    manifest: dict
    uploads: list = field(default_factory=list)   # (path in repo, local Path or bytes, size)
    skipped: list = field(default_factory=list)   # (path, why)

    @property
    def total(self) -> int:
        return sum(size for _, _, size in self.uploads)


def _looks_secret(path: Path, rel: str, token: str | None) -> str | None:
    if SECRET_NAME.match(path.name):
        return "its name is that of a secrets file"
    if path.suffix in (".safetensors", ".png") or path.stat().st_size > 50 * 1024 * 1024:
        if token and path.stat().st_size <= 512 * 1024 * 1024:
            with open(path, "rb") as f:
                if token.encode() in f.read():
                    return "it contains your Hugging Face token"
        return None
    data = path.read_bytes()
    if token and token.encode() in data:
        return "it contains your Hugging Face token"
    patterns = SECRET_TEXT[:1] if rel.startswith("tokenizer/") or rel.startswith("model/") else SECRET_TEXT
    for pattern in patterns:
        if pattern.search(data):
            return "it contains what looks like an access token or password"
    return None


def _run_card(folder: Path, manifest: dict, cat) -> str:
    """The card pushed with a model: a trained run's is rendered from its recipe's card with the run's
    figures; a pulled model keeps the card it came with."""
    trained = str(manifest.get("source", "")).startswith("train:") or (folder / "config.yaml").is_file()
    readme = folder / "README.md"
    if not trained and readme.is_file():
        return readme.read_text(encoding="utf-8")
    recipe = cat.recipes.get(manifest["recipe"])
    config = {}
    if (folder / "config.yaml").is_file():
        import yaml

        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise MedzooError(f"{folder}/config.yaml: not valid YAML ({exc})") from None
        if not isinstance(config, dict):
            config = {}
    datasets = config.get("datasets") or (list(recipe.datasets) if recipe else [])
    hub_datasets = []
    for d in datasets if isinstance(datasets, list) else [datasets]:
        spec = cat.datasets.get(d) if isinstance(d, str) else None
        if spec is not None and spec.source.startswith("hf://"):
            hub_datasets.append(spec.source[len("hf://"):])
        elif isinstance(d, str) and HUB_ID.match(d):
            hub_datasets.append(d)
    run = {"recipe": manifest["recipe"], "method": manifest["method"],
           "base_model_id": manifest.get("base_model_id") or manifest["base_model"],
           "profile": config.get("profile") or manifest.get("profile", "?"), "datasets": hub_datasets}
    figures = {"base model": run["base_model_id"], "layout": manifest.get("layout", "peft")}
    for key, value in (manifest.get("method_params") or {}).items():
        figures[f"{manifest['method']} {key}"] = value
    rows = []
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    losses = [r["loss"] for r in rows if isinstance(r, dict) and isinstance(r.get("loss"), (int, float))]
    if losses:
        figures.update({"logged steps": len(losses), "first loss": round(losses[0], 4),
                        "final loss": round(losses[-1], 4), "lowest loss": round(min(losses), 4)})
    last = next((r for r in reversed(rows) if isinstance(r, dict) and "step" in r), None)
    if last:
        figures["steps"] = last["step"]
        if "epoch" in last:
            figures["epochs"] = last["epoch"]
    card_path = registry.cards_dir() / recipe.card if recipe and recipe.card else None
    text = cards.render_run_card(card_path, run, figures,
                                 "peft" if manifest.get("layout", "peft") == "peft" else "transformers")
    meta, body, _ = cards.split(text, "README.md")
    if not HUB_ID.match(str(meta.get("base_model", ""))):
        meta.pop("base_model", None)  # a local base is no Hub id; the Hub would refuse it
    if (folder / "loss.png").is_file() and "loss.png" not in body:
        body = body.rstrip() + "\n\n![loss](loss.png)\n"
    return cards.dump(meta, body)


def plan_push(folder: Path, manifest: dict, token: str | None = None) -> PushPlan:
    cat = host.catalog()
    plan = PushPlan(folder, manifest)
    root = folder.resolve()
    for entry in sorted(folder.iterdir()):
        rel = entry.name
        if rel == "checkpoints":
            plan.skipped.append((rel + "/", "intermediate training checkpoints are never pushed"))
            continue
        if rel == "README.md":
            continue  # rendered below
        if rel not in PUSH_TOP:
            if SECRET_NAME.match(rel):
                plan.skipped.append((rel, "looks like a secrets file: never pushed"))
            else:
                plan.skipped.append((rel + ("/" if entry.is_dir() else ""), "not part of a medzoo model folder"))
            continue
        paths = [entry] if not entry.is_dir() or entry.is_symlink() else sorted(entry.rglob("*"))
        for path in paths:
            rel_path = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise MedzooError(f"refusing to push {folder}/{rel_path}: it links to {target}, outside the "
                                      "model folder")
            if path.is_dir():
                continue
            if path.name.endswith(PICKLE_SUFFIXES) or path.suffix in (".pickle", ".joblib"):
                raise MedzooError(f"refusing to push {folder}/{rel_path}: a pickle (arbitrary code when loaded); "
                                  "medzoo pushes safetensors only — convert it or remove it")
            why = _looks_secret(path.resolve(), rel_path, token)
            if why:
                raise MedzooError(f"refusing to push {folder}/{rel_path}: {why}; remove it from the folder")
            plan.uploads.append((rel_path, path.resolve(), path.resolve().stat().st_size))
    if not any(p == "medzoo.json" for p, _, _ in plan.uploads):
        raise MedzooError(f"{folder}: no medzoo.json; only model folders of the zoo can be pushed")
    layout = manifest.get("layout", "peft")
    need = {"peft": "adapter/adapter_model.safetensors", "freeze": "trainable.safetensors",
            "prefix": "prefix.safetensors", "full": "model/config.json"}.get(layout)
    if need and not any(p == need for p, _, _ in plan.uploads):
        raise MedzooError(f"{folder}: layout {layout!r} needs {need}, which is missing (a pickle-only folder "
                          "cannot be pushed; medzoo pushes safetensors only)")
    card = _run_card(folder, manifest, cat).encode("utf-8")
    if token and token.encode() in card:
        raise MedzooError(f"refusing to push the model card of {folder}: it contains your Hugging Face token")
    plan.uploads.append(("README.md", card, len(card)))
    plan.uploads.sort(key=lambda u: u[0])
    return plan


def _local_oid(content, lfs: bool) -> str:
    import hashlib

    from huggingface_hub.utils.sha import git_hash

    data = content if isinstance(content, bytes) else None
    if lfs:
        h = hashlib.sha256()
        if data is not None:
            h.update(data)
        else:
            with open(content, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
    return git_hash(data if data is not None else Path(content).read_bytes())


@dataclass
class PushResult:
    repo_id: str
    plan: PushPlan
    changed: list                      # paths uploaded (new or changed)
    deleted: list
    commit: str | None
    url: str | None


def push(model: str, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False,
         commit_message: str | None = None) -> PushResult:
    if not HUB_ID.match(repo_id):
        raise MedzooError(f"{repo_id!r} is not a Hub repo id (owner/name)")
    name, folder, manifest = zoo.get(model)
    token = None
    if not dry_run:
        from huggingface_hub import get_token

        token = get_token()
    plan = plan_push(folder, manifest, token)
    if dry_run:
        return PushResult(repo_id, plan, [u[0] for u in plan.uploads], [], None, None)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = endpoint()
    api = HfApi(endpoint=where)
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote = {}
        for f in api.list_repo_tree(repo_id, revision=branch, recursive=True):
            if hasattr(f, "blob_id"):
                remote[f.path] = f
        changed = []
        for path, content, _ in plan.uploads:
            r = remote.get(path)
            if r is None:
                changed.append(path)
                continue
            lfs = r.lfs is not None
            remote_oid = r.lfs.sha256 if lfs else r.blob_id
            if _local_oid(str(content) if isinstance(content, Path) else content, lfs) != remote_oid:
                changed.append(path)
        ours = {p for p, _, _ in plan.uploads}
        deleted = sorted(p for p in remote if p not in ours and p.split("/")[0] in PUSH_TOP)
        if not changed and not deleted:
            info = api.repo_info(repo_id, revision=branch)
            return PushResult(repo_id, plan, [], [], info.sha, f"{where}/{repo_id}")
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
               for p, c, _ in plan.uploads if p in changed]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deleted]
        info = api.create_commit(repo_id, operations=ops, revision=branch,
                                 commit_message=commit_message or f"medzoo push {name} ({manifest['recipe']}, "
                                                                  f"{manifest['method']})")
    except RevisionNotFoundError:
        raise MedzooError(f"{repo_id}: branch {branch!r} not found and could not be created") from None
    except RepositoryNotFoundError:
        raise MedzooError(f"{repo_id}: repository not found on {where} and not creatable with your credentials; "
                          f"{LOGIN_HINT} with a write token") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise MedzooError(f"{repo_id}: {where} refused the push (HTTP {status}); {LOGIN_HINT} with a token that "
                              "has write access") from None
        raise MedzooError(f"{repo_id}: push to {where} failed (HTTP {status}: "
                          f"{str(exc).strip().splitlines()[0][:200]})") from None
    except Exception as exc:
        if _transport_error(exc):
            raise MedzooError(f"cannot reach {where} to push {repo_id} ({_reason(exc)}); check your network or "
                              "HF_ENDPOINT") from None
        raise
    return PushResult(repo_id, plan, changed, deleted, info.oid, f"{where}/{repo_id}")
