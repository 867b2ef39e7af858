"""Batching: which examples make each optimizer step, how they are packed into rows, and the tensors a row
batch becomes.

Every optimizer step takes the recipe's global batch of examples in a seeded order (so a resumed run sees
exactly the data an uninterrupted one would). Those examples are then laid out to waste as little compute
as possible: sorted by length (length-grouped micro-batches) and, with packing, several per row without
padding between them. Packed examples never see each other: position ids restart at 0 for each example, and
attention is confined to the example by a block-diagonal causal 4-D mask (transformers 5's masking_utils
returns a 4-D mask as given); with flash-attention 2 the mask is left out and the restarting position ids
alone select its variable-length path. The loss of a step is the sum of token losses over the step's target
tokens divided by their count, so packing changes the arithmetic layout and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE = -100


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(int(seed) * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch: int) -> int:
    return max(1, math.ceil(n / batch))


def step_examples(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The example indices of global optimizer step `step` (0-based)."""
    per = steps_per_epoch(n, batch)
    epoch, k = divmod(step, per)
    order = epoch_order(n, seed, epoch)
    return order[k * batch:(k + 1) * batch]


def pack(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of example indices whose lengths sum to at most `capacity`."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def plan(indices: list[int], lengths: list[int], micro_batch: int, packing: bool, capacity: int,
         world: int = 1, rank: int = 0) -> list[list[list[int]]]:
    """This rank's micro-batches (lists of rows of example indices) for one optimizer step. Every rank gets
    the same number of micro-batches (DDP needs the same number of backward passes); a rank with fewer rows
    gets empty micro-batches, which run as a zero-loss dummy row."""
    if packing:
        rows = pack(indices, lengths, max([capacity] + [lengths[i] for i in indices]))
    else:
        rows = [[i] for i in indices]
    rows.sort(key=lambda row: (-sum(lengths[i] for i in row), row[0]))  # length-grouped micro-batches
    n_micro = max(1, math.ceil(len(rows) / (micro_batch * world)))
    mine = rows[rank::world]
    return [mine[m * micro_batch:(m + 1) * micro_batch] for m in range(n_micro)]


@dataclass
class Batch:
    tensors: dict          # model inputs: input_ids, attention_mask, position_ids
    labels: object         # [B, T] with IGNORE where no loss
    real_tokens: int       # non-padding tokens
    slots: int             # B * T
    examples: list         # per row: [(example index, start, end), ...]


def collate(rows: list[list[int]], examples: list[dict], pad_id: int, attention: str, packing: bool,
            device="cpu", dtype=None) -> Batch:
    """Tensors for a micro-batch. `attention` is the model's attn implementation: "sdpa" gets a boolean
    block-diagonal causal mask, "eager" (and others) the additive float form, "flash_attention_2" none."""
    import torch

    if not rows:  # an empty micro-batch of this rank: one pad token, no loss
        rows, examples = [[-1]], {-1: {"input_ids": [pad_id], "labels": [IGNORE]}}
    lengths = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
    B, T = len(rows), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    spans = []
    for b, row in enumerate(rows):
        start, row_spans = 0, []
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex["input_ids"])
            ids[b, start:start + n] = torch.tensor(ex["input_ids"])
            labels[b, start:start + n] = torch.tensor(ex["labels"])
            labels[b, start] = IGNORE  # never predicted from the previous example's last token
            pos[b, start:start + n] = torch.arange(n)
            seg[b, start:start + n] = s
            row_spans.append((i, start, start + n))
            start += n
        if start < T:  # padding is a segment of its own, so no real token attends to it and no row is empty
            pos[b, start:] = torch.arange(T - start)
            seg[b, start:] = len(row)
        spans.append(row_spans)
    real = sum(lengths)
    tensors = {"input_ids": ids}
    if packing:  # unpacked rows leave positions to the model (ChatGLM-6B computes its own 2-D positions)
        tensors["position_ids"] = pos
    if attention == "flash_attention_2" and packing:
        pass  # restarting position_ids select the varlen kernel; padding positions restart too
    elif packing:
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T, T]
        mask = mask[:, None]
        if attention != "sdpa":
            dtype = dtype or torch.float32
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        tensors["attention_mask"] = mask
    else:
        tensors["attention_mask"] = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    tensors = {k: v.to(device) for k, v in tensors.items()}
    return Batch(tensors, labels.to(device), real, B * T, spans)


def token_losses(logits, labels):
    """Per-token cross-entropy (fp32) of next-token prediction; 0 where the label is ignored."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(target.shape)
