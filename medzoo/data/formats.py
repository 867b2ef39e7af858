"""Row normalisers: each turns one row of a seed format into a conversation
``{"query": str, "response": str, "history": [[query, response], ...]}``.

They raise ``RowError(field, problem)``; the loader adds the file and line.
"""
from __future__ import annotations

import re


class RowError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


def text(row: dict, field: str, required: bool = True, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        if required:
            raise RowError(field, "missing")
        return ""
    value = row[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(field, f"expected text, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise RowError(field, "is empty")
    return value


def pairs(row: dict, field: str) -> list[list[str]]:
    value = row.get(field) or []
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of [query, response] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError(f"{field}[{i}]", "expected a [query, response] pair of texts")
        out.append([pair[0], pair[1]])
    return out


def join(*parts: str) -> str:
    return "\n".join(p for p in parts if p and p.strip())


def alpaca(row: dict) -> dict:
    return {"query": join(text(row, "instruction"), text(row, "input", required=False)),
            "response": text(row, "output"), "history": pairs(row, "history")}


def cmedqa2(row: dict) -> dict:
    return {"query": text(row, "question"), "response": text(row, "answer"), "history": []}


def prompt_query_response(row: dict) -> dict:
    return {"query": join(text(row, "prompt"), text(row, "query", required=False)),
            "response": text(row, "response"), "history": pairs(row, "history")}


def input_output(row: dict) -> dict:
    return {"query": text(row, "input"), "response": text(row, "output"), "history": []}


# Med-ChatGLM's train.txt may hold the context already wrapped in its training template; the template is
# applied again at tokenization, so a wrapped context is unwrapped here rather than wrapped twice.
_WRAPPED = re.compile(r"\s*问题[：:](.*?)\n(?:回答|答案)[：:]\s*", re.S)


def context_target(row: dict) -> dict:
    query = text(row, "context")
    wrapped = _WRAPPED.fullmatch(query)
    if wrapped:
        query = wrapped.group(1).strip()
        if not query:
            raise RowError("context", "holds the template but no question")
    return {"query": query, "response": text(row, "target"), "history": []}


def dialogue(row: dict) -> dict:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise RowError("turns", "expected a non-empty list of {user, bot} turns")
    conv = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turns[{i}]", "expected an object with 'user' and 'bot'")
        try:
            conv.append([text(turn, "user"), text(turn, "bot")])
        except RowError as exc:
            raise RowError(f"turns[{i}].{exc.field}", exc.problem) from None
    *history, (query, response) = conv
    return {"query": query, "response": response, "history": history}
