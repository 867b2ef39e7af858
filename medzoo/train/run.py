"""One training run, from a recipe name and the user's changes to a complete, registered model folder.

``plan(...)`` resolves the settings (recipe < --config file < flags < --set) without importing torch, so
``--dry-run`` is instant; ``execute(run, ...)`` loads the base, the data and the method, trains (loop.py) and
writes the folder of docs/model-folder.md, registering it in the local zoo only once it is complete.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from medzoo import host, memory, recipes, zoo
from medzoo.objects import BaseModel, MedzooError, resolve

CONFIG = "config.yaml"
# keys of a resolved run that a --config file may carry but that follow from the others (a run's own
# config.yaml can be passed back as --config to repeat it)
DERIVED_KEYS = ("recipe", "template", "precision", "quantization", "gradient_checkpointing", "placement",
                "generation", "max_steps", "sample")


# --- settings --------------------------------------------------------------------------------------------

def read_config(path: str) -> tuple[dict, dict]:
    """(top-level choices, {key: (value, line)}) of a --config YAML file. Nested ``training:`` and
    ``method_params:`` mappings are flattened, as in a run's own config.yaml."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise MedzooError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise MedzooError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise MedzooError(f"{path}:1: expected a mapping of recipe settings")
    lines = {}
    for key_node, value_node in node.value:
        lines[key_node.value] = key_node.start_mark.line + 1
        if key_node.value in ("training", "method_params") and isinstance(value_node, yaml.MappingNode):
            for k, _ in value_node.value:
                lines[f"{key_node.value}.{k.value}"] = k.start_mark.line + 1
    top, flat = {}, {}
    for key, value in data.items():
        if key in ("method", "profile", "base_model", "datasets", "data"):
            top[key] = value
        elif key in ("training", "method_params"):
            if not isinstance(value, dict):
                raise MedzooError(f"{path}:{lines[key]}: {key!r} must be a mapping")
            for k, v in value.items():
                flat[str(k)] = (v, lines.get(f"{key}.{k}", lines[key]))
        elif key in DERIVED_KEYS:
            continue
        else:
            flat[str(key)] = (value, lines.get(key, 1))
    return top, flat


def pick_profile(cat, recipe, method: str) -> str:
    """--profile auto: cpu-demo on a CPU; on CUDA the largest of the recipe's profiles that fits the cards."""
    import torch

    if not torch.cuda.is_available():
        if "cpu-demo" in recipe.profiles:
            return "cpu-demo"
        raise MedzooError(f"--profile auto: no CUDA GPU here and recipe {recipe.name!r} has no CPU profile")
    count = torch.cuda.device_count()
    card_gb = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    best, best_key = None, None
    for name in recipe.profiles:
        prof = cat.profiles[name]
        if prof.device != "cuda" or prof.devices > count or prof.memory_gb > card_gb * 1.02:
            continue
        if prof.quantization and method != "qlora":
            continue
        run = recipes.resolve(cat, recipe, method, name)
        base = cat.base_models.get(recipe.base_model)
        if base is not None and not memory.estimate(base, prof, method, run["method_params"], run["training"]).fits:
            continue
        key = (prof.memory_gb * prof.devices, prof.precision == "bf16" and torch.cuda.is_bf16_supported())
        if best_key is None or key > best_key:
            best, best_key = name, key
    if best is None:
        raise MedzooError(f"--profile auto: none of {recipe.name!r}'s profiles ({', '.join(recipe.profiles)}) fits "
                          f"{count} × {card_gb:.0f} GB; try --method qlora or lower micro_batch with --set")
    return best


def plan(recipe_name: str, *, method: str | None = None, profile: str | None = None, overrides: dict | None = None,
         config_file: str | None = None, base: str | None = None, data: str | None = None, sample: bool = False,
         epochs=None, lr=None, seed=None, val_size=None, max_steps: int | None = None) -> dict:
    """The resolved run (what --dry-run prints and config.yaml stores)."""
    cat = host.catalog()
    recipe = host.require(cat, recipe_name)
    top, flat = read_config(config_file) if config_file else ({}, {})
    method = method or top.get("method") or recipe.default_method
    profile = profile or top.get("profile") or None
    if method not in recipe.methods:
        recipes.method_params(cat, recipe, method)  # raises, naming the offered methods
    if profile == "auto":
        profile = pick_profile(cat, recipe, method)
    if profile is not None and profile not in recipe.profiles and profile in cat.profiles:
        pass  # any registered profile may be used; the recipe's list is what `auto` chooses from
    # the --config file first, each key checked against this recipe and method, naming file and line
    known = recipes.training_defaults(recipe)
    params = recipes.method_params(cat, recipe, method)
    for key, (value, line) in flat.items():
        if key not in known and key not in params:
            raise MedzooError(f"{config_file}:{line}: {host.unknown('setting', key, list(known) + list(params))}")
    merged = {k: v for k, (v, _) in flat.items()}
    for key, value in (("epochs", epochs), ("lr", lr), ("seed", seed), ("val_size", val_size)):
        if value is not None:
            merged[key] = value
    run = recipes.resolve(cat, recipe, method, profile, {**merged, **(overrides or {})})
    if overrides:  # resolve checked the union; name --set for an unknown key given there
        recipes.apply_overrides(dict(run["training"]), dict(run["method_params"]), overrides, "--set")
    prof = cat.profiles[run["profile"]]
    run["base_model"] = base or top.get("base_model") or prof.base_model or recipe.base_model
    if base and Path(base).is_dir():
        run["base_model"] = str(Path(base).resolve())
    data = data or top.get("data")
    if top.get("datasets") and not data:
        data = ",".join(top["datasets"]) if isinstance(top["datasets"], list) else str(top["datasets"])
    if data:
        run["data"] = data
    run["sample"] = bool(sample or prof.device == "cpu" and prof.base_model is not None)
    run["max_steps"] = int(max_steps) if max_steps else None
    if cat.methods[method].needs_cuda and not run["quantization"]:
        run["quantization"] = "nf4"  # QLoRA means a 4-bit base whatever the profile
    return run


def base_shape(run: dict) -> BaseModel | None:
    """The BaseModel facts for the memory estimate: registered, or read from a local folder's config.json."""
    cat = host.catalog()
    if run["base_model"] in cat.base_models:
        return cat.base_models[run["base_model"]]
    config = Path(run["base_model"]) / "config.json"
    if not config.is_file():
        return None
    return base_from_config(json.loads(config.read_text()), config.parent.name, str(config.parent))


def base_from_config(c: dict, name: str, source: str) -> BaseModel:
    """The BaseModel facts of a transformers config (Llama-style and ChatGLM keys)."""
    h, L = c.get("hidden_size", 0), c.get("num_hidden_layers") or c.get("num_layers", 0)
    inter = c.get("intermediate_size") or c.get("ffn_hidden_size") or c.get("inner_hidden_size") or 4 * h
    v = c.get("vocab_size") or c.get("padded_vocab_size", 0)
    mlp = 2 if c.get("model_type") == "chatglm" else 3  # ChatGLM-6B's GELU MLP has two matrices
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads") or c.get("multi_query_group_num") or heads
    head_dim = c.get("head_dim") or h // heads
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h  # q, k, v, o
    embeddings = v * h * (1 if c.get("tie_word_embeddings") else 2)
    params = L * (attention + mlp * h * inter) + embeddings
    return BaseModel(name, source, c.get("model_type", "?"), params / 1e9, L, h, inter, heads, kv, v,
                     mlp_matrices=mlp)


def estimate(run: dict):
    cat = host.catalog()
    base = base_shape(run)
    if base is None:
        return None
    return memory.estimate(base, cat.profiles[run["profile"]], run["method"], run["method_params"], run["training"])


def dry_run_text(run: dict) -> str:
    est = estimate(run)
    text = yaml.safe_dump(run, allow_unicode=True, sort_keys=False)
    if est is None:
        return text + f"memory: unknown (base {run['base_model']!r} is neither registered nor a local folder)\n"
    return text + yaml.safe_dump({"memory_estimate_gb": est.as_dict()}, sort_keys=False)


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(recipe: str, root: Path = Path("runs")) -> Path:
    candidates = sorted((p for p in root.glob(f"{recipe}-*") if (p / CONFIG).is_file()),
                        key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    candidates = [p for p in candidates if not (p / zoo.MANIFEST).is_file()] or candidates
    if not candidates:
        raise MedzooError(f"--resume: no run of {recipe!r} under {root}/; name it with --output-dir")
    return candidates[-1]


def load_run_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise MedzooError(f"--resume: {folder} is not a medzoo run folder (no {CONFIG})")
    try:
        run = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MedzooError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(run, dict) or "training" not in run:
        raise MedzooError(f"{path}: not a resolved run configuration")
    return run


# --- execution -------------------------------------------------------------------------------------------

@dataclass
class Result:
    folder: Path
    name: str | None
    summary: Any
    model: Any
    tokenizer: Any
    layout: str
    skipped: int = 0


class Reporter:
    def __init__(self, kind: str, folder: Path, run: dict):
        self.kind = kind
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MedzooError("--report-to tensorboard: tensorboard is not installed (pip install tensorboard)") \
                    from None
            self.writer = SummaryWriter(str(folder / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise MedzooError("--report-to wandb: wandb is not installed (pip install wandb)") from None
            self.writer = wandb.init(project="medzoo", name=folder.name, config=run)
        else:
            raise MedzooError(f"--report-to {kind!r}: expected tensorboard, wandb or none")

    def log(self, record: dict) -> None:
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        else:
            self.writer.log(values, step=step)

    def close(self):
        getattr(self.writer, "close", getattr(self.writer, "finish", lambda: None))()


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _precision(run: dict, device: str):
    """(load dtype name, autocast dtype) for the profile's precision on this device."""
    import torch

    if not device.startswith("cuda") or run["precision"] == "fp32":
        return "fp32", None
    half = torch.bfloat16 if run["precision"] == "bf16" and torch.cuda.is_bf16_supported() else torch.float16
    name = "bf16" if half == torch.bfloat16 else "fp16"
    return ("fp32" if run["method"] == "full" else name), half  # full FT keeps fp32 master weights


def _check_hardware(cat, run: dict, device: str) -> None:
    import torch

    method = cat.methods[run["method"]]
    if method.needs_cuda and not torch.cuda.is_available():
        raise MedzooError(f"method {run['method']!r} needs a CUDA GPU (4-bit NF4 through bitsandbytes); this "
                          "machine has none. Use --method lora, or --profile cpu-demo")
    prof = cat.profiles[run["profile"]]
    if prof.device == "cuda" and not torch.cuda.is_available():
        raise MedzooError(f"profile {prof.name!r} needs a CUDA GPU and this machine has none; use "
                          "--profile cpu-demo (or --profile auto)")
    if run["training"].get("load_in_8bit") and not run["quantization"]:
        run["quantization"] = "int8"


def execute(run: dict, folder: Path, *, name: str | None = None, resume: bool = False, skip_bad_rows: bool = False,
            trust_remote_code: bool = False, report_to: str | None = None, progress: bool = True,
            strategy: str | None = None, register: bool = True, echo: Callable[[str], None] = print) -> Result:
    import torch

    from medzoo import modeling
    from medzoo.train import data as run_data
    from medzoo.train import loop as train_loop
    from medzoo.train import methods

    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars of tiny files are noise next to ours
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    cat = host.catalog()
    folder = Path(folder)
    rank, world, local_rank = distributed()
    device = "cpu"
    if cat.profiles[run["profile"]].device == "cuda":
        device = f"cuda:{local_rank}" if world > 1 else "cuda"
    _check_hardware(cat, run, device)
    resume_from = None
    if resume and (folder / zoo.MANIFEST).is_file():
        raise MedzooError(f"--resume: {folder} is a finished run (it has {zoo.MANIFEST}); nothing to resume")
    if resume:
        checkpoints = train_loop.list_checkpoints(folder)
        if not checkpoints:
            raise MedzooError(f"--resume: {folder} has no checkpoint to resume from")
        resume_from = checkpoints[-1]
    name = name or folder.name
    if register and rank == 0:
        taken = zoo.entries().get(name)
        if taken and Path(taken["path"]) != folder.resolve():
            raise MedzooError(f"--name {name!r} is taken in the zoo by {taken['path']}; pick another --name")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            if (folder / "metrics.jsonl").exists() or train_loop.list_checkpoints(folder):
                raise MedzooError(f"--output-dir {folder} already holds a run; use --resume or another folder")
            (folder / CONFIG).write_text(f"# medzoo train {run['recipe']} --config {folder / CONFIG}\n"
                                         + yaml.safe_dump(run, allow_unicode=True, sort_keys=False), encoding="utf-8")

    reporters = [Reporter(k, folder, run) for k in (report_to or "").split(",") if k and k != "none"] \
        if rank == 0 else []
    load_dtype, amp = _precision(run, device)
    registered, src, _ = modeling.base_source(run["base_model"])
    chatglm = modeling._is_chatglm(registered, src)
    overrides = {}
    if run["method"] == "ptuning-v2" and chatglm:  # ChatGLM-6B's own prefix encoder, as the seed trained it
        overrides = {"pre_seq_len": int(run["method_params"]["pre_seq_len"]),
                     "prefix_projection": bool(run["method_params"]["prefix_projection"])}
    placement = run["placement"]
    model, tokenizer = modeling.load_base(
        run["base_model"], device=device, dtype=load_dtype, trust_remote_code=trust_remote_code,
        config_overrides=overrides, quantization=run["quantization"],
        device_map="auto" if placement == "model-parallel" and torch.cuda.device_count() > 1 else None)
    template = cat.templates[run["template"]]
    loaded = run_data.load(cat, run, tokenizer, template, skip_bad_rows=skip_bad_rows)
    if rank == 0:
        for note in loaded.notes:
            echo(f"note: {note}")

    torch.manual_seed(int(run["training"]["seed"]))  # adapter initialisation
    apply = resolve(cat.methods[run["method"]].apply)
    model = apply(model, dict(run["method_params"]), run)
    note = methods.prepare(model, run)
    if note and rank == 0:
        echo(f"note: {note}")
    inner = methods._unwrap(model)
    attention = getattr(inner.config, "_attn_implementation", None) or "eager"
    if device.startswith("cuda") and attention == "sdpa" and not chatglm:
        try:
            import flash_attn  # noqa: F401

            inner.set_attn_implementation("flash_attention_2")
            attention = "flash_attention_2"
        except Exception:
            pass
    packing = methods.packable(model, run, prefix_lm=chatglm)
    train_model = model
    if world > 1:
        strategy = strategy or (placement if placement in ("ddp", "fsdp") else "ddp")
        train_model = wrap_distributed(model, strategy, device, local_rank)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lp = train_loop.Loop(model=train_model, train=loaded.train, val=loaded.val, training=run["training"],
                         folder=folder, pad_id=pad_id, device=device if placement != "model-parallel" else
                         next(model.parameters()).device, attention=attention, packing=packing, amp_dtype=amp,
                         max_steps=run.get("max_steps"), rank=rank, world=world, progress=progress,
                         reporters=reporters, echo=echo)
    if rank == 0:
        echo(f"training {run['recipe']} ({run['method']}, profile {run['profile']}, base {run['base_model']}): "
             f"{len(loaded.train)} examples, {len(loaded.val)} held out, {train_loop.total_steps(lp)} steps, "
             f"packing {'on' if packing else 'off'}, attention {attention}"
             + (f", resuming from {resume_from.name}" if resume_from else ""))
    try:
        summary = train_loop.run(lp, resume_from)
    finally:
        for r in reporters:
            r.close()
    layout = methods.layout_of(model, run["method"])
    full_state = None
    if train_loop.is_sharded(model):  # FSDP: gather the full weights (every rank takes part) for rank 0 to save
        full_state = train_loop.gather_state(model, trainable_only=False)
    if rank == 0:
        layout = finish(run, folder, model, tokenizer, summary, name if register else None, loaded, full_state)
        if loaded.skipped:
            echo(f"skipped {loaded.skipped} bad rows (--skip-bad-rows)")
        echo(f"first loss {summary.first_loss:.4f}, last loss {summary.final_loss:.4f}"
             + (f", eval loss {summary.initial_eval_loss:.4f} -> {summary.eval_loss:.4f}"
                if summary.eval_loss is not None and summary.initial_eval_loss is not None else "")
             + f"; {summary.steps} steps in {summary.seconds:.1f}s, {summary.tokens_per_s:.0f} tokens/s, "
               f"padding {summary.padding:.1%}, peak memory {summary.peak_memory_gb:.2f} GB")
    if world > 1:
        torch.distributed.barrier()
    return Result(folder, name if register and rank == 0 else None, summary, model, tokenizer, layout, loaded.skipped)


def wrap_distributed(model, strategy: str, device: str, local_rank: int):
    import torch

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from medzoo.train.methods import decoder_layers

        for layer in decoder_layers(model)[1]:
            fully_shard(layer)
        fully_shard(model)
        return model
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise MedzooError("--strategy deepspeed: DeepSpeed is not installed (pip install deepspeed); "
                              "use --strategy ddp or fsdp") from None
        raise MedzooError("--strategy deepspeed: ZeRO through DeepSpeed is not wired into medzoo's loop yet; "
                          "use --strategy fsdp (sharded) or ddp")
    raise MedzooError(f"--strategy {strategy!r}: expected ddp, fsdp or deepspeed")


def plot_loss(folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(folder.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)


def finish(run: dict, folder: Path, model, tokenizer, summary, name: str | None, loaded, state=None) -> str:
    """Weights, card, loss curve, manifest last, then the zoo entry: a folder is a model only once complete."""
    from medzoo import cards, modeling, registry
    from medzoo.train import methods

    layout = methods.save_weights(model, tokenizer, run["method"], folder, state)
    if layout == "full":
        tokenizer.save_pretrained(str(folder / "model"))
    plot_loss(folder)
    cat = host.catalog()
    recipe = cat.recipes[run["recipe"]]
    registered, src, revision = modeling.base_source(run["base_model"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    figures = {"final train loss": _fmt(summary.final_loss), "first train loss": _fmt(summary.first_loss),
               "eval loss": _fmt(summary.eval_loss), "eval loss before training": _fmt(summary.initial_eval_loss),
               "steps": summary.steps,
               "training examples": len(loaded.train), "held-out examples": len(loaded.val),
               "tokens/s": f"{summary.tokens_per_s:.0f}", "padding": f"{summary.padding:.1%}",
               "peak memory (GB)": f"{summary.peak_memory_gb:.2f}", "time (s)": f"{summary.seconds:.1f}",
               "trainable parameters": f"{trainable:,}"}
    card_run = dict(run, base_model_id=registered.hub_id if registered and not registered.hub_id.startswith("local:")
                    else run["base_model"])
    card_path = registry.cards_dir() / recipe.card if recipe.card else None
    (folder / "README.md").write_text(cards.render_run_card(card_path, card_run, figures,
                                                            "peft" if layout == "peft" else "transformers"),
                                      encoding="utf-8")
    overrides = {}
    if layout == "prefix":
        overrides = {"pre_seq_len": int(run["method_params"]["pre_seq_len"]),
                     "prefix_projection": bool(run["method_params"]["prefix_projection"])}
    manifest = {
        "format": 1, "recipe": run["recipe"], "method": run["method"], "layout": layout,
        "base_model": run["base_model"], "base_model_id": src, "base_revision": revision,
        "template": run["template"], "method_params": run["method_params"], "generation": run["generation"],
        "config_overrides": overrides, "source": f"train:{folder}", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "metrics": {"final_loss": summary.final_loss, "last_step_loss": summary.last_step_loss,
                    "eval_loss": summary.eval_loss, "steps": summary.steps,
                    "tokens": summary.tokens, "tokens_per_s": summary.tokens_per_s, "padding": summary.padding,
                    "seconds": summary.seconds},
    }
    zoo.write_manifest(folder, manifest)
    if name:
        zoo.register(name, folder)
    return layout


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
