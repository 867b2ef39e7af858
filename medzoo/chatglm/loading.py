"""Load ChatGLM-6B (v1) checkpoints without their remote code.

``load_chatglm("zai-org/chatglm-6b", revision=...)`` (or a local folder) reads the original files -- ``config.json``,
``pytorch_model-0000X-of-0000N.bin`` + ``pytorch_model.bin.index.json`` (or one ``pytorch_model.bin``),
``ice_text.model``, ``tokenizer_config.json`` -- converts the ``.bin`` shards once to safetensors under
``$MEDZOO_HOME/converted/<name>@<revision>/`` and loads medzoo's own classes from there. ``.bin`` files are read with
``torch.load(weights_only=True)``; nothing is unpickled beyond tensors and nothing runs the checkpoint's code.
A folder already holding safetensors weights is loaded in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from medzoo.objects import MedzooError

CONFIG_FILE = "config.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json", "special_tokens_map.json")
META_PATTERNS = ["*.json", "ice_text.model"]
IGNORED_TENSORS = ("rotary_emb.inv_freq",)

_registered = False


def register() -> None:
    """Make ``AutoConfig``/``AutoModel``/``AutoModelForCausalLM``/``AutoTokenizer`` know model_type ``chatglm``.

    Idempotent. ``AutoModel`` gives the bare ``ChatGLMModel``; ``AutoModelForCausalLM`` the LM with its head.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from medzoo.chatglm.configuration import ChatGLMConfig
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration, ChatGLMModel
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    AutoModel.register(ChatGLMConfig, ChatGLMModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    _registered = True


def read_config(folder: str | os.PathLike, overrides: Mapping[str, Any] | None = None):
    """``ChatGLMConfig`` from ``folder/config.json`` (the original file or medzoo's), with ``overrides`` applied."""
    from medzoo.chatglm.configuration import ChatGLMConfig

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MedzooError(f"{folder}: no {CONFIG_FILE}; not a ChatGLM-6B checkpoint folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedzooError(f"{path}: not valid JSON ({exc})") from None
    if data.get("model_type", "chatglm") != "chatglm":
        raise MedzooError(f"{path}: model_type is {data.get('model_type')!r}, not 'chatglm' (ChatGLM-6B v1)")
    data.pop("model_type", None)
    data.update(dict(overrides or {}))
    return ChatGLMConfig(**data)


def _weights_kind(folder: Path) -> str | None:
    if (folder / ST_INDEX).is_file() or (folder / ST_SINGLE).is_file():
        return "safetensors"
    if (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
        return "bin"
    return None


def _bin_shards(folder: Path) -> list[str]:
    index = folder / BIN_INDEX
    if index.is_file():
        shards = _bin_shards_listed(index)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MedzooError(f"{index}: shard files missing: {', '.join(missing)}")
        return shards
    return [BIN_SINGLE]


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return "local-" + digest.hexdigest()[:10]


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Convert an original ChatGLM-6B folder (``.bin`` shards) into a safetensors folder ``target``.

    Shard by shard, so memory holds one shard at a time. Writes to a temporary folder next to ``target`` and renames
    it at the end: an interrupted conversion leaves no ``target``.
    """
    import torch
    from safetensors.torch import save_file

    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    source, target = Path(source), Path(target)
    config = read_config(source)
    shards = _bin_shards(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for number, shard in enumerate(shards, start=1):
            try:
                state = torch.load(source / shard, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # a pickle with more than tensors, or a truncated download
                raise MedzooError(f"{source / shard}: cannot read as a tensor-only checkpoint ({exc})") from None
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else ST_SINGLE
            tensors = {}
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise MedzooError(f"{source / shard}: entry {key!r} is not a tensor")
                if key.endswith(IGNORED_TENSORS):
                    continue
                tensors[key] = value.detach().contiguous().clone()
                weight_map[key] = name
                total += value.numel() * value.element_size()
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del state, tensors
        if len(shards) > 1:
            (tmp / ST_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True), encoding="utf-8")
        config.architectures = ["ChatGLMForConditionalGeneration"]
        config.save_pretrained(tmp)
        if (source / "ice_text.model").is_file():
            ChatGLMTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp))
        (tmp / "medzoo-source.json").write_text(json.dumps({"source": str(source), "shards": shards}, indent=2),
                                                encoding="utf-8")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hub_settings() -> dict:
    """HF_ENDPOINT and the cache folder, read at call time (not when huggingface_hub was imported)."""
    settings = {"endpoint": os.environ.get("HF_ENDPOINT") or None}
    if os.environ.get("HF_HUB_CACHE"):
        settings["cache_dir"] = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        settings["cache_dir"] = str(Path(os.environ["HF_HOME"]) / "hub")
    return settings


def _download(repo_id: str, revision: str | None) -> Path:
    """The configuration and tokenizer first, then only the weights the index names (never .bin and safetensors)."""
    from huggingface_hub import snapshot_download

    settings = _hub_settings()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=META_PATTERNS, **settings))
        if (folder / ST_INDEX).is_file():
            patterns = ["*.safetensors"]
        elif (folder / BIN_INDEX).is_file():
            patterns = _bin_shards_listed(folder / BIN_INDEX)
        else:
            patterns = [ST_SINGLE, BIN_SINGLE]
        # the first call resolved the revision to a commit: pin it, so both calls read the same snapshot
        folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=patterns, **settings))
    except Exception as exc:
        raise MedzooError(f"{repo_id}: cannot download from the Hub ({type(exc).__name__}: {exc}); "
                          "check the repo id and revision, HF_TOKEN, or HF_ENDPOINT") from None
    return folder


def _bin_shards_listed(index: Path) -> list[str]:
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    return sorted(set(weight_map.values()))


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder with loadable safetensors weights for ``path_or_repo_id``, converting once when needed."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        name, tag = local.resolve().name, _fingerprint(local)  # a changed folder converts again
        folder = local
    else:
        repo_id = str(path_or_repo_id)
        folder = _download(repo_id, revision)
        name, tag = repo_id.replace("/", "--"), folder.name  # the snapshot folder is named by its commit
    if not (folder / CONFIG_FILE).is_file():
        raise MedzooError(f"{path_or_repo_id}: no {CONFIG_FILE}; not a ChatGLM-6B checkpoint folder")
    kind = _weights_kind(folder)
    if kind is None:
        raise MedzooError(f"{path_or_repo_id}: no weights ({BIN_INDEX}, {BIN_SINGLE}, {ST_INDEX} or {ST_SINGLE})")
    if kind == "safetensors":
        return folder
    from medzoo.zoo import home

    target = home() / "converted" / f"{name}@{tag}"
    if not (target / CONFIG_FILE).is_file():
        convert_checkpoint(folder, target)
    return target


def load_tokenizer(folder: str | os.PathLike):
    from medzoo.chatglm.tokenization import ChatGLMTokenizer

    if not (Path(folder) / "ice_text.model").is_file():
        raise MedzooError(f"{folder}: no ice_text.model (the ChatGLM-6B tokenizer)")
    return ChatGLMTokenizer.from_pretrained(str(folder))


def load_chatglm(path_or_repo_id: str | os.PathLike, revision: str | None = None, dtype=None, device=None,
                 config_overrides: Mapping[str, Any] | None = None):
    """Load a ChatGLM-6B (v1) checkpoint: returns ``(model, tokenizer)``.

    ``config_overrides`` are set on the config before the weights load, e.g. ``{"pre_seq_len": 16,
    "prefix_projection": False}`` for MedQA-ChatGLM's P-Tuning v2 (the prefix encoder then starts random and the
    caller loads its state dict). ``dtype``: a torch dtype or "auto" (the checkpoint's, fp16 for ChatGLM-6B); None
    keeps transformers' default. The tokenizer is None when the folder has no ``ice_text.model``.
    """
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration

    register()
    folder = resolve_checkpoint(path_or_repo_id, revision)
    config = read_config(folder, config_overrides)
    kwargs = {"config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = ChatGLMForConditionalGeneration.from_pretrained(str(folder), **kwargs)
    except MedzooError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise MedzooError(f"{path_or_repo_id}: cannot load the ChatGLM-6B weights ({exc})") from None
    model.freeze_for_prefix_tuning()
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(folder) if (folder / "ice_text.model").is_file() else None
    return model, tokenizer
