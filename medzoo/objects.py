"""The object model: plain frozen dataclasses that plugins register.

Nothing here imports torch or transformers. Heavy components (loaders, trainers, normalisers) are named by
dotted path (``"package.module:function"``) and resolved with :func:`resolve` only when used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZATIONS = (None, "nf4", "int8")


class MedzooError(Exception):
    """An error a user can act on; the CLI prints it as one line and exits non-zero."""


class RecipeError(MedzooError):
    pass


def resolve(dotted: str) -> Any:
    """Import ``"package.module:attr"`` (or ``package.module.attr``) and return the attribute."""
    module_name, _, attr = dotted.partition(":")
    if not attr:
        module_name, _, attr = dotted.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise MedzooError(f"cannot import {module_name!r} (from {dotted!r}): {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise MedzooError(f"{module_name!r} has no attribute {part!r} (from {dotted!r})") from None
    return obj


@dataclass(frozen=True)
class BaseModel:
    """A base model a recipe fine-tunes, with the shape facts the memory planner needs."""
    name: str
    hub_id: str
    architecture: str                 # "chatglm" | "llama" | "glm" | "qwen2" | ...
    params_b: float                   # parameters, billions
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    revision: str | None = None       # pinned Hub revision; None = the repo's main
    native: bool = True               # runs on today's transformers without remote code
    mlp_matrices: int = 2             # 2 for GELU MLPs (ChatGLM, Bloom), 3 for gated ones (Llama, Qwen2)
    note: str = ""


@dataclass(frozen=True)
class DataFormat:
    """A row format: the fields a row must have and the function that turns a row into a conversation."""
    name: str
    required: tuple[str, ...]
    normalize: str                    # dotted path: (row: dict) -> {"query", "response", "history"}
    description: str = ""
    example: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str                       # a registered DataFormat name
    source: str                       # a local file (relative to the plugin package) or "hf://owner/name"
    description: str = ""
    license: str = ""
    rows: int | None = None           # size of the full original data set, when known
    columns: Mapping[str, str] = field(default_factory=dict)  # dataset_info.json-style renames
    sha1: str | None = None           # checksum of a downloaded file (MedQA-ChatGLM's file_sha1)
    sample: str | None = None         # bundled sample in the same format, relative to the plugin package
    package: str = ""                 # the plugin package that owns `source`/`sample` paths


@dataclass(frozen=True)
class TuningMethod:
    """A way to tune: its default hyper-parameters and the dotted path of the code that applies it."""
    name: str
    apply: str                        # dotted path: (model, params) -> model ready to train
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_cuda: bool = False
    mergeable: bool = True            # can be folded into the base weights


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    devices: int
    memory_gb: float                  # per device
    precision: str                    # "bf16" | "fp16" | "fp32"
    quantization: str | None = None   # "nf4" | "int8"
    micro_batch: int = 1              # per device; gradient accumulation keeps the recipe's global batch
    gradient_checkpointing: bool = False
    placement: str = "single"         # "single" | "model-parallel" (device_map over GPUs) | "ddp" | "fsdp"
    device: str = "cuda"              # "cuda" | "cpu"
    base_model: str | None = None     # replaces the recipe's base (cpu-demo trains a tiny local model)
    training: Mapping[str, Any] = field(default_factory=dict)  # settings it imposes over the recipe's
    description: str = ""


@dataclass(frozen=True)
class PromptTemplate:
    """How a conversation becomes model text. Training and inference use the same object.

    ``render(query, history)`` writes ``system`` + every past turn with ``history_turn`` + the current
    query with ``query`` (or ``history_query`` once there is history). Format keys: ``{query}``,
    ``{response}``, ``{index}`` (0-based turn number).
    """
    name: str
    query: str = "{query}"
    system: str = ""
    history_turn: str | None = None   # None: the template keeps no history
    history_query: str | None = None  # the current query when history exists; default `query`
    response_split: str | None = None  # marker between prompt and answer in decoded text
    stop: tuple[str, ...] = ()        # strings that end an answer besides EOS
    description: str = ""

    def render(self, query: str, history: tuple[tuple[str, str], ...] | list = ()) -> str:
        history = list(history) if self.history_turn is not None else []
        parts = [self.system]
        for index, (past_query, past_response) in enumerate(history):
            parts.append(self.history_turn.format(index=index, query=past_query, response=past_response))
        current = self.history_query if (history and self.history_query) else self.query
        parts.append(current.format(index=len(history), query=query))
        return "".join(parts)

    def answer_of(self, text: str) -> str:
        """The answer part of a decoded prompt+answer text, cut at the first stop string."""
        if self.response_split and self.response_split in text:
            text = text.split(self.response_split)[-1]
        for stop in self.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()


@dataclass(frozen=True)
class PublishedCheckpoint:
    """An entry of registry.yaml: a checkpoint on the Hub and what it is."""
    repo_id: str
    recipe: str
    method: str
    base_model: str
    revision: str = "main"
    card: str | None = None
    layout: str = "peft"              # "peft" | "freeze-state-dict" | "prefix-state-dict" | "full" | "medzoo"
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    base_model: str                   # a registered BaseModel name: the seed's own base
    modern_base: str                  # a registered BaseModel that today's transformers runs natively
    template: str                     # a registered PromptTemplate name
    datasets: tuple[str, ...]
    methods: Mapping[str, Mapping[str, Any]]  # method name -> the recipe's hyper-parameters for it
    default_method: str
    training: Mapping[str, Any]       # epochs, lr, batch, cutoff_len, ... (see medzoo.recipes.TRAINING_KEYS)
    profiles: tuple[str, ...]
    default_profile: str
    generation: Mapping[str, Any] = field(default_factory=dict)
    card: str | None = None           # file under cards/
    upstream: str = ""                # the original project's repository
    variant_of: str | None = None     # parent recipe for variants (e.g. bentsao-literature)
    fixes: tuple[str, ...] = ()       # defects of the original fixed here, named in the card
    description: str = ""
    package: str = ""                 # the plugin package that registered it (sample data paths)
