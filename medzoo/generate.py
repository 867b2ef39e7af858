"""Generation: the one path from a question (plus history) to an answer, shared by chat, web and serve.

The prompt is the recipe's own template turned into ids by the data layer's ``encode_prompt`` — the same
function training uses — so a model answers in the format it was trained on. Defaults come from the
recipe (``LoadedModel.generation``: BenTsao's infer.py uses temperature 0.1, top_p 0.75, top_k 40, 4 beams,
256 new tokens) and every one can be overridden. An answer ends at EOS or at one of the template's stop
strings, which is trimmed off, so a model never runs on into a made-up next question.

One model answers one question at a time: every generation holds the model's lock, so concurrent callers
(the API server, the web page) queue instead of interleaving on shared weights and adapter state.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from medzoo.objects import MedzooError

SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")
FALLBACK = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "num_beams": 1,
            "repetition_penalty": 1.0}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")

_locks: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


@dataclass
class Answer:
    text: str
    tokens: int                       # new tokens generated (including a trimmed stop string)
    prompt_tokens: int
    finish_reason: str                # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def model_lock(model) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


def settings(lm, **overrides) -> dict:
    """The generation settings: medzoo's fallbacks < the recipe's and model's defaults < ``overrides``
    (``None`` means "not given"). ``do_sample`` defaults to the recipe's choice; where the recipe does not
    say, to sampling for a single beam and to plain beam search for several (BenTsao's infer.py)."""
    merged = dict(FALLBACK)
    merged.update({k: v for k, v in (lm.generation or {}).items() if k in SETTINGS})
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(SETTINGS)
    if unknown:
        raise MedzooError(f"unknown generation setting(s) {sorted(unknown)}; expected {', '.join(SETTINGS)}")
    merged.update(given)
    if "do_sample" not in merged:
        merged["do_sample"] = merged["num_beams"] == 1 and merged["temperature"] > 0
    if merged.get("temperature") == 0:
        merged["do_sample"] = False  # temperature 0 is the usual way API clients ask for greedy decoding
    _check(merged)
    return merged


def _check(s: dict) -> None:
    def bad(key, expect):
        raise MedzooError(f"{key}={s[key]!r}: expected {expect}")

    if not isinstance(s["max_new_tokens"], int) or s["max_new_tokens"] < 1:
        bad("max_new_tokens", "an integer >= 1")
    if not isinstance(s["num_beams"], int) or s["num_beams"] < 1:
        bad("num_beams", "an integer >= 1")
    if not isinstance(s["top_k"], int) or s["top_k"] < 0:
        bad("top_k", "an integer >= 0")
    if not 0 < float(s["top_p"]) <= 1:
        bad("top_p", "a number in (0, 1]")
    if float(s["temperature"]) < 0:
        bad("temperature", "a number >= 0")
    if float(s["repetition_penalty"]) <= 0:
        bad("repetition_penalty", "a number > 0")


def context_length(model) -> int | None:
    """The longest sequence the model takes (prompt + answer), from its config; None when unknown."""
    config = getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _peft_prefix(model) -> int:
    """Virtual tokens a peft prompt-learning adapter (P-Tuning v2 / prefix tuning) puts before the prompt."""
    config = getattr(model, "active_peft_config", None)
    return int(getattr(config, "num_virtual_tokens", 0) or 0) if getattr(config, "is_prompt_learning", False) else 0


def encode(lm, query: str, history=()) -> list[int]:
    """Prompt ids for ``query`` after ``history`` (pairs of question, answer), in the model's template."""
    if not isinstance(query, str) or not query.strip():
        raise MedzooError("empty prompt: ask a question")
    history = [(str(q), str(a)) for q, a in (history or ())]
    from medzoo.data.tokenize import encode_prompt  # the function training uses: one prompt format

    return list(encode_prompt(lm.template, lm.tokenizer, query, history))


class _StopOnText:
    """A StoppingCriteria on the decoded answer: stops a sequence (each beam on its own) once the answer holds
    one of the template's stop strings, and stops everything when ``cancel`` is set (a client went away)."""

    def __init__(self, tokenizer, prompt_len: int, stops: tuple[str, ...], cancel: threading.Event):
        self.tokenizer, self.prompt_len, self.stops, self.cancel = tokenizer, prompt_len, stops, cancel
        self.longest = max((len(s) for s in stops), default=0)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = []
        for row in input_ids[:, self.prompt_len:]:
            # a stop string ends within the last few tokens; decoding a tail keeps every step cheap
            tail = self.tokenizer.decode(row[-(self.longest + 8):], skip_special_tokens=True)
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _trim(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.index(s) for s in stops if s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (not shown until we know)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


class _Streamer:
    """Receives tokens from ``generate`` (in its thread) and hands out new text as it becomes printable.

    transformers' TextIteratorStreamer holds text back until a space, a newline or a CJK ideograph, so an
    answer of Chinese punctuation or Latin words arrives in lumps; this one releases every token's text at
    once, except while a multi-byte character is still incomplete (decoded as U+FFFD)."""

    def __init__(self, tokenizer):
        import queue

        self.tokenizer, self.queue, self.ids, self.shown, self.prompt_seen = tokenizer, queue.Queue(), [], 0, False

    def put(self, value):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._release(final=False)

    def _release(self, final: bool):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.queue.put(text[self.shown:])
            self.shown = len(text)

    def end(self):
        self._release(final=True)
        self.queue.put(None)

    def __iter__(self):
        while (piece := self.queue.get()) is not None:
            yield piece


class Generation:
    """One answer being generated. Iterate it for text pieces as they come (``stream``), or call
    :meth:`result`. The model's lock is held from the start of generation until it ends."""

    def __init__(self, lm, query: str, history=(), *, use_base: bool = False, stop=(), **overrides):
        self.lm = lm
        self.settings = settings(lm, **overrides)
        self.ids = encode(lm, query, history)
        self.stops = tuple(s for s in (*lm.template.stop, *stop) if s)  # the template's, then the caller's
        self.use_base = use_base
        limit = context_length(lm.model)
        prefix = _peft_prefix(lm.model)
        if limit is not None:
            room = limit - prefix - len(self.ids)
            if room < 1:
                extra = f" plus {prefix} prefix tokens" if prefix else ""
                raise MedzooError(f"prompt too long: {len(self.ids)} tokens{extra}, the model's context is "
                                  f"{limit} tokens; shorten the question or the history (/reset)")
            self.settings["max_new_tokens"] = min(self.settings["max_new_tokens"], room)
        if use_base and not hasattr(lm.model, "disable_adapter"):
            raise MedzooError(f"{lm.name} has no adapter to switch off; load its base model separately")
        self.cancel = threading.Event()
        self.text = ""
        self.answer: Answer | None = None

    @property
    def streams(self) -> bool:
        """Beam search picks its answer only at the end, so it cannot stream."""
        return self.settings["num_beams"] == 1

    def _kwargs(self):
        import torch
        from transformers import StoppingCriteriaList

        s = self.settings
        input_ids = torch.tensor([self.ids], device=_device(self.lm.model))
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      max_new_tokens=s["max_new_tokens"], num_beams=s["num_beams"], do_sample=s["do_sample"],
                      repetition_penalty=float(s["repetition_penalty"]),
                      pad_token_id=self.lm.tokenizer.pad_token_id,
                      stopping_criteria=StoppingCriteriaList(
                          [_StopOnText(self.lm.tokenizer, len(self.ids), self.stops, self.cancel)]))
        eos = self.lm.tokenizer.eos_token_id
        if eos is not None:
            kwargs["eos_token_id"] = eos
        if s["do_sample"]:
            kwargs.update(temperature=float(s["temperature"]), top_p=float(s["top_p"]), top_k=int(s["top_k"]))
        else:  # the recipe's sampling settings do not apply, and transformers warns when they are passed
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _run(self, streamer=None) -> list[int]:
        import contextlib

        import torch

        kwargs = self._kwargs()
        if streamer is not None:
            kwargs["streamer"] = streamer
        switch = self.lm.model.disable_adapter() if self.use_base else contextlib.nullcontext()
        with torch.inference_mode(), switch:
            out = self.lm.model.generate(**kwargs)
        return out[0, len(self.ids):].tolist()

    def __iter__(self) -> Iterator[str]:
        """Text pieces of the answer as they are generated (all at once for beam search)."""
        if not self.streams:
            yield self.result().text
            return
        streamer = _Streamer(self.lm.tokenizer)
        box: dict = {}

        def work():
            try:
                box["new"] = self._run(streamer)
            except BaseException as exc:  # surfaced to the reader below; the streamer must still end
                box["error"] = exc
                streamer.end()

        lock = model_lock(self.lm.model)
        with lock:
            thread = threading.Thread(target=work, name="medzoo-generate", daemon=True)
            thread.start()
            shown, stopped = 0, False
            try:
                for piece in streamer:
                    if stopped:
                        continue
                    self.text += piece
                    visible, stopped = _trim(self.text, self.stops)
                    end = len(visible) if stopped else len(visible) - _held_back(visible, self.stops)
                    if end > shown:
                        yield visible[shown:end]
                        shown = end
                if not stopped:
                    visible = self.text
                    if len(visible) > shown:
                        yield visible[shown:]
            finally:
                self.cancel.set()  # a reader that went away stops the model at its next token
                thread.join()
        if "error" in box:
            raise _generation_error(box["error"])
        self.answer = self._answer(box["new"])

    def result(self) -> Answer:
        if self.answer is None:
            if self.streams:
                for _ in self:
                    pass
            else:
                with model_lock(self.lm.model):
                    try:
                        new = self._run()
                    except MedzooError:
                        raise
                    except (RuntimeError, ValueError, IndexError) as exc:
                        raise _generation_error(exc) from None
                self.answer = self._answer(new)
        return self.answer

    def _answer(self, new: list[int]) -> Answer:
        text = self.lm.tokenizer.decode(new, skip_special_tokens=True)
        answer, hit_stop = _trim(text, self.stops)
        eos = self.lm.tokenizer.eos_token_id
        ended = hit_stop or (eos is not None and eos in new) or len(new) < self.settings["max_new_tokens"]
        self.text = text
        return Answer(answer.strip(), len(new), len(self.ids), "stop" if ended else "length", dict(self.settings))


def _generation_error(exc: BaseException) -> BaseException:
    if isinstance(exc, MedzooError) or not isinstance(exc, (RuntimeError, ValueError, IndexError)):
        return exc
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MedzooError(f"generation failed: {first}")


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return "cpu"


def generate(lm, query: str, history=(), **overrides) -> Answer:
    """The whole answer to ``query`` (after ``history``) with the model's defaults and ``overrides``."""
    return Generation(lm, query, history, **overrides).result()


def stream(lm, query: str, history=(), **overrides) -> Generation:
    """A :class:`Generation` to iterate for text pieces; its ``answer`` is set once the iteration ends."""
    return Generation(lm, query, history, **overrides)
