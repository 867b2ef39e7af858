"""Memory planning: how much device memory a recipe needs on a hardware profile, part by part.

The estimate counts, per device: base weights at the profile's precision or quantization, the trainable
parameters (kept in fp32 for mixed precision) with their gradients and optimizer state, and activations at
the recipe's sequence length and micro-batch (Korthikanti et al. 2022: s·b·h·(34 + 5·a·s/h) bytes per
layer in half precision without recomputation; with gradient checkpointing only each layer's input is
kept, plus one layer's full activations during recomputation), plus a fixed CUDA context/workspace.
"""
from __future__ import annotations

from dataclasses import dataclass

from medzoo.objects import BaseModel, HardwareProfile

GB = 1024 ** 3
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "nf4": 0.5 + 0.0625, "int8": 1.0 + 0.03}  # nf4/int8 incl. scales
OPTIMIZER_STATES = {"adamw": 2, "lion": 1, "sgd": 0}  # fp32 tensors per trainable parameter
CONTEXT_GB = 1.0  # CUDA context, cuBLAS workspace, allocator slack


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    trainable_params: int
    trainable_gb: float               # fp32 trainable weights + their gradients
    optimizer_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float                   # per device
    budget_gb: float
    fits: bool

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def trainable_parameters(base: BaseModel, method: str, params: dict) -> int:
    h, layers, head_dim = base.hidden, base.layers, base.hidden // base.heads
    kv = base.kv_heads * head_dim
    # decided by the method's hyper-parameters, so a plugin's own adapter method is estimated too
    if "r" in params:
        r = int(params.get("r", 8))
        shapes = {  # module -> (in, out)
            "query_key_value": (h, h + 2 * kv), "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv),
            "o_proj": (h, h), "dense": (h, h), "gate_proj": (h, base.intermediate),
            "up_proj": (h, base.intermediate), "down_proj": (base.intermediate, h),
            "dense_h_to_4h": (h, base.intermediate), "dense_4h_to_h": (base.intermediate, h),
        }
        targets = params.get("target_modules", ["q_proj", "v_proj"])
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",")]
        return layers * sum(r * sum(shapes.get(t, (h, h))) for t in targets)
    if "num_layer_trainable" in params:
        n = int(params.get("num_layer_trainable", 3))
        return n * base.mlp_matrices * h * base.intermediate
    if "pre_seq_len" in params:
        pre = int(params.get("pre_seq_len", 16))
        prefix = pre * layers * 2 * kv
        if params.get("prefix_projection"):
            ph = int(params.get("prefix_hidden_size", h))
            prefix = pre * h + h * ph + ph * layers * 2 * kv
        return prefix
    return int(base.params_b * 1e9)  # full


def _freezes(params: dict) -> bool:
    """Freeze's hyper-parameters: only the last layers' named modules train."""
    return "num_layer_trainable" in params and "r" not in params


def _peft_prefix(base: BaseModel, params: dict) -> bool:
    """P-Tuning v2 through peft (ChatGLM-6B has its own prefix encoder)."""
    return "pre_seq_len" in params and "r" not in params and base.architecture != "chatglm"


def layer_activation_bytes(base: BaseModel, method: str, params: dict, s: int) -> float:
    """Bytes one decoder layer keeps for backward per token, in half precision.

    A frozen layer under SDPA (LoRA, QLoRA, P-Tuning v2 on a native model) keeps what its norms (fp32 copies),
    attention kernel (q, k, v, output) and gated MLP (gate, activation, up) need: 12h + 4kv + 6i bytes, plus
    6 bytes per input feature of each LoRA target (dropout mask and output, the adapter's input); a layer
    whose MLP Freeze trains also keeps the MLP's inputs (2h + 2i). Measured on fake tensors at the real
    shapes (medzoo.memtrace, bench/memory_check.py). ChatGLM-6B's eager attention (which keeps the s²
    scores) and layers whose every weight trains (full) take Korthikanti et al.'s 34·h + 5·a·s per token."""
    h, kv = base.hidden, base.kv_heads * (base.hidden // base.heads)
    korthikanti = h * (34 + 5 * base.heads * s / h)
    if base.architecture == "chatglm":
        return korthikanti
    if _freezes(params):
        return 14 * h + 4 * kv + 8 * base.intermediate
    if "r" not in params and not _peft_prefix(base, params):
        return korthikanti
    inputs = {"down_proj": base.intermediate, "dense_4h_to_h": base.intermediate}
    targets = params.get("target_modules", ["q_proj", "v_proj"]) if "r" in params else []
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    lora = sum(6 * inputs.get(t, h) for t in targets)
    return 12 * h + 4 * kv + 6 * base.intermediate + lora


def active_layers(base: BaseModel, method: str, params: dict) -> int:
    """Layers whose activations are kept for backward: Freeze needs none below its first trained layer."""
    if _freezes(params):
        return min(base.layers, int(params.get("num_layer_trainable", 3)))
    return base.layers


def estimate(base: BaseModel, profile: HardwareProfile, method: str, params: dict, training: dict) -> MemoryEstimate:
    """The peak of a training step is the larger of two moments: the end of forward/backward (activations
    kept for backward) and the optimizer step (every gradient, plus AdamW's foreach temporaries, one fp32
    tensor per trainable parameter). medzoo.memtrace measures both at the real shape (bench/memory_check.py)."""
    n = base.params_b * 1e9
    half = profile.precision != "fp32"
    split = profile.devices if profile.placement in ("model-parallel", "fsdp") else 1
    trainable = trainable_parameters(base, method, params)
    if trainable >= n:  # full tuning: fp32 master weights (bf16 autocast computes from them) + fp32 gradients
        weights = n * 4
        trainable_bytes = trainable * 4  # the gradients; the weights are counted above
    else:  # frozen base at the profile's precision or quantization; fp32 trainable weights + grads
        weights = n * (BYTES[profile.quantization] if profile.quantization else BYTES[profile.precision])
        trainable_bytes = trainable * 8
    weights /= split
    trainable_bytes /= split
    states = OPTIMIZER_STATES.get(str(training.get("optimizer", "adamw")).lower(), 2)
    optimizer = trainable * 4 * states / split
    step_temporaries = trainable * 4 / split if states else 0  # foreach AdamW/Lion: one fp32 tensor a parameter

    s = int(training.get("cutoff_len") or 512)
    b = int(training.get("micro_batch") or profile.micro_batch)
    layers = active_layers(base, method, params)
    act_bytes = 2 if half else 4
    checkpointing = profile.gradient_checkpointing and not _peft_prefix(base, params)  # medzoo.train.methods
    per_layer = s * b * layer_activation_bytes(base, method, params, s) * act_bytes / 2
    if checkpointing:
        acts = layers * s * b * base.hidden * act_bytes + per_layer
    else:
        acts = layers * per_layer
    acts += s * b * base.vocab * 12  # logits (half), their fp32 copy for the loss and its gradient (measured)
    acts /= split
    overhead = CONTEXT_GB if profile.device == "cuda" else 0.25
    backward = weights + trainable_bytes + optimizer + acts
    step = weights + trainable_bytes + optimizer + step_temporaries
    total = max(backward, step) / GB + overhead
    return MemoryEstimate(weights / GB, trainable, trainable_bytes / GB, optimizer / GB, acts / GB, overhead,
                          total, profile.memory_gb, total <= profile.memory_gb)
