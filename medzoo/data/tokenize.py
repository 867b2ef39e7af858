"""The one place where a conversation becomes token ids, for training and for inference alike.

The prompt is ``tokenizer(template.render(query, history), add_special_tokens=True)``: a Llama-like tokenizer
puts BOS in front, ChatGLM-6B's appends ``[gMASK] <sop>`` (the answer follows ``<sop>``, as in the original).
The answer is ``tokenizer(response, add_special_tokens=False) + [eos]``. Inference calls
:func:`encode_prompt`, training :func:`encode_example`, which starts from the very same ids, so a model is
asked exactly the way it was taught.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medzoo.data.formats import RowError
from medzoo.objects import MedzooError, PromptTemplate

IGNORE_INDEX = -100
PARALLEL_ROWS = 20_000     # tokenize in several processes from this many rows on
PROBLEMS_KEPT = 5


def encode_prompt(template: PromptTemplate, tokenizer, query: str, history=()) -> list[int]:
    """Token ids of the prompt the model answers: the template's text with the tokenizer's special tokens."""
    return list(tokenizer(template.render(query, [tuple(p) for p in history]), add_special_tokens=True).input_ids)


def _truncate_prompt(template, tokenizer, query, history, max_source_length):
    """Prompt ids with at most ``max_source_length`` text tokens (special tokens not counted, as in
    ChatGLM-Efficient-Tuning): the oldest history turns go first, then the start of the text, so that the
    current question's end and the template's answer marker survive."""
    history = list(history)
    while True:
        text = template.render(query, history)
        bare = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(bare) <= max_source_length or not history:
            break
        history = history[1:]
    ids = encode_prompt(template, tokenizer, query, history)
    if len(bare) <= max_source_length:
        return ids
    for start in range(len(ids) - len(bare) + 1):  # where the text sits between the special tokens
        if ids[start:start + len(bare)] == bare:
            return ids[:start] + bare[-max_source_length:] + ids[start + len(bare):]
    return ids[-(max_source_length + len(ids) - len(bare)):]


def encode_example(template: PromptTemplate, tokenizer, conv: dict, cutoff_len: int, train_on_inputs: bool = False,
                   max_source_length: int | None = None, max_target_length: int | None = None) -> dict:
    """``{"input_ids", "labels"}`` of one conversation; the prompt (with any history) is masked with -100
    unless ``train_on_inputs``; earlier answers are part of the prompt, never of the loss.

    ``max_source_length`` / ``max_target_length`` truncate the prompt / answer (counted without special
    tokens); an example still longer than ``cutoff_len`` raises ``RowError`` for field ``output``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MedzooError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token; set eos_token")
    history = conv.get("history") or ()
    if max_source_length:
        prompt = _truncate_prompt(template, tokenizer, conv["query"], history, max_source_length)
    else:
        prompt = encode_prompt(template, tokenizer, conv["query"], history)
    answer = list(tokenizer(conv["response"], add_special_tokens=False).input_ids)
    if max_target_length:
        answer = answer[:max_target_length]
    answer.append(eos)
    total = len(prompt) + len(answer)
    if total > cutoff_len:
        raise RowError("output", f"{total} tokens with the prompt exceed cutoff_len {cutoff_len}")
    labels = (prompt if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + answer
    return {"input_ids": prompt + answer, "labels": list(labels)}


@dataclass
class Tokenized:
    dataset: Any                      # datasets.Dataset: input_ids, labels, length, _file, _line
    skipped: int = 0                  # rows over cutoff_len left out (skip_bad_rows=True)
    problems: list[str] = field(default_factory=list)


def _encode_batch(batch, template, tokenizer, cutoff_len, train_on_inputs, max_source_length, max_target_length):
    out = {"input_ids": [], "labels": [], "length": [], "_error": []}
    for i in range(len(batch["query"])):
        conv = {"query": batch["query"][i], "response": batch["response"][i], "history": batch["history"][i]}
        try:
            ex = encode_example(template, tokenizer, conv, cutoff_len, train_on_inputs, max_source_length,
                                max_target_length)
            error = ""
        except RowError as exc:
            ex, error = {"input_ids": [], "labels": []}, f"{batch['_file'][i]}:{batch['_line'][i]}: {exc}"
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["length"].append(len(ex["input_ids"]))
        out["_error"].append(error)
    return out


def tokenize_dataset(dataset, template: PromptTemplate, tokenizer, cutoff_len: int, *, train_on_inputs: bool = False,
                     max_source_length: int | None = None, max_target_length: int | None = None,
                     skip_bad_rows: bool = False, num_proc: int | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Tokenized:
    """Tokenize a Dataset of conversations (from :func:`medzoo.data.load.load_data`) with a batched map.

    A row over ``cutoff_len`` raises ``MedzooError("file:line: field 'output': ...")``, or is counted and
    left out with ``skip_bad_rows``. ``num_proc`` None uses several processes from PARALLEL_ROWS rows on.
    With ``cache_dir`` the result is cached there, keyed by the data, template, tokenizer and settings.
    """
    if num_proc is None and len(dataset) >= PARALLEL_ROWS:
        num_proc = min(8, os.cpu_count() or 1)
    kwargs = {}
    if cache_dir is not None:
        key = json.dumps([dataset._fingerprint, repr(template), getattr(tokenizer, "name_or_path", ""),
                          len(tokenizer), tokenizer.eos_token_id, cutoff_len, train_on_inputs, max_source_length,
                          max_target_length])
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"tokenized-{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow"),
                  "load_from_cache_file": True}
    keep = {"_file", "_line"}
    encoded = dataset.map(
        _encode_batch, batched=True, num_proc=num_proc, desc="tokenizing",
        remove_columns=[c for c in dataset.column_names if c not in keep],
        fn_kwargs=dict(template=template, tokenizer=tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                       max_source_length=max_source_length, max_target_length=max_target_length), **kwargs)
    errors = [e for e in encoded["_error"] if e]
    if errors and not skip_bad_rows:
        more = f" (and {len(errors) - 1} more rows; skip them with skip_bad_rows)" if len(errors) > 1 else ""
        raise MedzooError(errors[0] + more)
    if errors:
        encoded = encoded.filter(lambda e: not e, input_columns="_error", num_proc=num_proc)
    return Tokenized(encoded.remove_columns("_error"), len(errors), errors[:PROBLEMS_KEPT])
