"""Reading training data: files and registered datasets become conversations, mixed and split.

A conversation is ``{"query", "response", "history", "_file", "_line"}``: what the row format's normaliser
returns, plus where the row came from, so that an error found later (in tokenization) still names the file
and line. ``datasets`` is imported only when a ``Dataset`` is built.
"""
from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medzoo.data.formats import RowError
from medzoo.objects import DataFormat, DatasetSpec, MedzooError, resolve

PROBLEMS_KEPT = 5          # messages of skipped rows kept for the report
LIST_FIELDS = ("history", "turns")  # fields holding JSON lists; a CSV cell holds them as JSON text


@dataclass
class Loaded:
    """Conversations of one source, and the bad rows skipped on the way."""
    conversations: list[dict]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first PROBLEMS_KEPT "file:line: ..." messages

    def absorb(self, other: "Loaded") -> None:
        self.conversations += other.conversations
        self.skipped += other.skipped
        self.problems += other.problems[: max(0, PROBLEMS_KEPT - len(self.problems))]


@dataclass(frozen=True)
class Source:
    """One item of a ``--data`` list: a registered dataset or a file, with its mixing ratio."""
    text: str                          # as written
    dataset: DatasetSpec | None = None
    path: str | None = None
    format: str | None = None          # None: inferred from the file's fields
    ratio: float = 1.0


@dataclass
class Data:
    """What ``load_data`` returns to the trainer."""
    train: Any                         # datasets.Dataset of conversations
    val: Any                           # datasets.Dataset, or None when val_size is 0
    skipped: int                       # bad rows skipped (skip_bad_rows=True); print it at the end
    problems: list[str]                # the first few skipped rows' messages
    counts: dict[str, int]             # source text -> training rows taken from it after mixing


# ---------------------------------------------------------------- reading rows with their line numbers
def read_rows(path: str | Path, label: str | None = None) -> Iterator[tuple[int, dict | RowError]]:
    """Yield ``(line, row)`` for every row of a JSON list, JSON-lines or CSV file.

    A row that cannot be parsed comes as ``(line, RowError)`` so the caller decides to skip or stop. The
    kind is read from the content (``[`` opens a JSON list) and the extension (``.csv``), not trusted to
    the name alone: BenTsao's ``llama_data.json`` is JSON lines.
    """
    path = Path(path)
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MedzooError(f"{label}: no such file") from None
    except UnicodeDecodeError as exc:
        raise MedzooError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _csv_rows(text, "\t" if path.suffix.lower() == ".tsv" else ",")
    elif text.lstrip().startswith("["):
        yield from _json_list_rows(text, label)
    else:
        yield from _json_lines_rows(text)


def _json_lines_rows(text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, RowError("(json)", f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        yield number, row if isinstance(row, dict) else RowError("(row)", f"expected an object, got {type(row).__name__}")


_NEXT_OBJECT = re.compile(r"\n\s*\{")


def _json_list_rows(text: str, label: str):
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    line, counted = 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        idx = skip_ws(idx)
        if idx >= len(text):
            raise MedzooError(f"{label}:{text.count(chr(10)) + 1}: not valid JSON: the list is not closed with ']'")
        if text[idx] == "]":
            return
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            row, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            yield line, RowError("(json)", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
            # resynchronise on the next line that opens an object: lists written one object a line recover
            found = _NEXT_OBJECT.search(text, idx + 1)
            if not found:
                return
            idx = found.end() - 1
            continue
        yield line, row if isinstance(row, dict) else RowError("(row)", f"expected an object, got {type(row).__name__}")
        idx = skip_ws(end)
        if idx < len(text) and text[idx] == ",":
            idx += 1
        elif idx < len(text) and text[idx] != "]":
            bad_line = text.count("\n", 0, idx) + 1
            yield bad_line, RowError("(json)", f"not valid JSON: expected ',' or ']' after the object")
            found = _NEXT_OBJECT.search(text, idx)
            if not found:
                return
            idx = found.end() - 1


def _csv_rows(text: str, delimiter: str):
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    reader.fieldnames  # reads the header, so line_num counts it before the first row
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, RowError("(csv)", f"not valid CSV: {exc}")
            continue
        if None in row:
            yield start, RowError("(csv)", f"{len(row[None])} more cells than the header has columns")
            continue
        # a short row leaves None for the missing cells: the normaliser reports those fields as missing
        yield start, {k: v for k, v in row.items() if v is not None}


# ---------------------------------------------------------------- rows -> conversations
def _rename(row: dict, columns: dict[str, str]) -> dict:
    """dataset_info.json-style mapping ``{medzoo field: file column}``; a row that already uses the medzoo
    names (a bundled sample of Hub data with other column names) passes unchanged."""
    if not columns:
        return row
    out = dict(row)
    for medzoo_field, column in columns.items():
        if column in row:
            out[medzoo_field] = row[column]
    return out


def _decode_list_cells(row: dict) -> dict:
    for name in LIST_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            if not value.strip():
                row[name] = None
                continue
            try:
                row[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowError(name, f"not valid JSON: {exc.msg}") from None
    return row


def normalize_rows(rows: Iterable[tuple[int, dict | RowError]], fmt: DataFormat, label: str,
                   columns: dict[str, str] | None = None, skip_bad_rows: bool = False,
                   cells_are_text: bool = False) -> Loaded:
    """Run each row through the format's normaliser; a bad row raises ``MedzooError("file:line: ...")``
    or, with ``skip_bad_rows``, is counted and left out."""
    normalize = resolve(fmt.normalize)
    columns = dict(columns or {})
    out = Loaded([])
    for line, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            row = _rename(row, columns)
            if cells_are_text:
                row = _decode_list_cells(row)
            conv = normalize(row)
            if not conv.get("response", "").strip():
                raise RowError("response", "is empty")
        except RowError as exc:
            root = exc.field.split("[")[0].split(".")[0]
            name = exc.field.replace(root, columns[root], 1) if root in columns else exc.field
            where = f"field {name!r}: " if not name.startswith("(") else ""
            message = f"{label}:{line}: {where}{exc.problem}"
            if not skip_bad_rows:
                raise MedzooError(message) from None
            out.skipped += 1
            if len(out.problems) < PROBLEMS_KEPT:
                out.problems.append(message)
            continue
        conv["history"] = [list(pair) for pair in conv.get("history") or []]
        conv["_file"], conv["_line"] = label, line
        out.conversations.append(conv)
    return out


def infer_format(row: dict, formats: dict[str, DataFormat], label: str, line: int = 1) -> DataFormat:
    """The registered format whose required fields the row has. When several fit, the one that accounts for
    most of the row's fields (required ones and those of its example row) wins: ``{instruction, input,
    output}`` is alpaca, not input-output. A tie is an error asking for ``path:FORMAT``."""
    keys = set(row)
    fits = [f for f in formats.values() if set(f.required) <= keys]
    if not fits:
        known = "; ".join(f"{f.name} ({', '.join(f.required)})" for f in formats.values())
        raise MedzooError(f"{label}:{line}: fields {sorted(keys)} match no registered data format; known: {known}; "
                          f"or name one as {label}:FORMAT")

    def score(f: DataFormat) -> tuple[int, int]:
        return len(keys & (set(f.required) | set(f.example))), len(f.required)

    best = max(score(f) for f in fits)
    fits = [f for f in fits if score(f) == best]
    if len(fits) > 1:
        raise MedzooError(f"{label}:{line}: fields {sorted(keys)} fit formats {', '.join(f.name for f in fits)}; "
                          f"name one as {label}:FORMAT")
    return fits[0]


def load_file(path: str | Path, format: str | None = None, columns: dict[str, str] | None = None,
              skip_bad_rows: bool = False, label: str | None = None, catalog=None) -> Loaded:
    """Conversations of a JSON list, JSON-lines or CSV file.

    ``format`` names a registered DataFormat; None infers it from the first row's fields (after the
    ``columns`` renames). ``label`` is the name errors use for the file (default: the path).
    """
    cat = catalog or _catalog()
    label = label or str(path)
    rows = list(read_rows(path, label))
    if format is not None:
        fmt = cat.get("formats", format)
    else:
        first = next(((line, row) for line, row in rows if isinstance(row, dict)), None)
        if first is None:
            if rows and not skip_bad_rows:
                line, err = rows[0]
                raise MedzooError(f"{label}:{line}: {err.problem}")
            raise MedzooError(f"{label}: no rows")
        fmt = infer_format(_rename(first[1], dict(columns or {})), cat.formats, label, first[0])
    loaded = normalize_rows(rows, fmt, label, columns, skip_bad_rows,
                            cells_are_text=Path(path).suffix.lower() in (".csv", ".tsv"))
    if not loaded.conversations:
        raise MedzooError(f"{label}: no usable rows" + (f" ({loaded.skipped} bad, first: {loaded.problems[0]})"
                                                         if loaded.skipped else ""))
    return loaded


def package_file(spec: DatasetSpec, relative: str):
    """A file shipped inside the plugin package that registered ``spec``."""
    from importlib.resources import files

    if not spec.package:
        raise MedzooError(f"dataset {spec.name!r} names no plugin package, so {relative!r} cannot be found")
    return files(spec.package).joinpath(relative)


def load_registered(spec: DatasetSpec, use_sample: bool = False, skip_bad_rows: bool = False,
                    catalog=None) -> Loaded:
    """Conversations of a registered dataset: its bundled sample, or the full data from its source."""
    from importlib.resources import as_file

    cat = catalog or _catalog()
    if use_sample or spec.source.startswith("local:"):
        if not use_sample:
            raise MedzooError(f"dataset {spec.name!r}: the full data is not available ({spec.source}); "
                              f"train on its bundled sample or on your own file")
        if not spec.sample:
            raise MedzooError(f"dataset {spec.name!r} ships no sample; use the full data")
        ref = package_file(spec, spec.sample)
        with as_file(ref) as path:
            return load_file(path, spec.format, spec.columns, skip_bad_rows, catalog=cat)
    if spec.source.startswith("hf://"):
        return _load_hub(spec, skip_bad_rows, cat)
    with as_file(package_file(spec, spec.source)) as path:
        return load_file(path, spec.format, spec.columns, skip_bad_rows, catalog=cat)


def _load_hub(spec: DatasetSpec, skip_bad_rows: bool, cat) -> Loaded:
    import datasets

    repo = spec.source[len("hf://"):]
    try:
        ds = datasets.load_dataset(repo, split="train")
    except Exception as exc:  # network, auth, missing repo: one line the user can act on
        raise MedzooError(f"dataset {spec.name!r}: cannot load {spec.source} from the Hub: "
                          f"{type(exc).__name__}: {exc}; train on its bundled sample instead") from None
    # for Hub data the "line" is the 1-based row number
    return normalize_rows(((i, dict(row)) for i, row in enumerate(ds, 1)), cat.get("formats", spec.format),
                          spec.source, spec.columns, skip_bad_rows)


# ---------------------------------------------------------------- --data specs, mixing, splitting
def parse_data(text: str | Iterable[str], catalog=None) -> list[Source]:
    """Parse a ``--data`` value: comma-separated items, each a registered dataset name or a file path.

    ``path:FORMAT`` names the row format of a file (else it is inferred from the fields); ``ITEM*R``
    mixes that source at R times its rows: ``R < 1`` takes a seeded random subset, ``R > 1`` repeats the
    rows (``*2`` twice; ``*1.5`` once plus a random half). Examples::

        huatuo-kg
        huatuo-kg*0.5,my.jsonl
        merged-cMedQA,notes.csv:input-output*2
    """
    cat = catalog or _catalog()
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    sources = []
    for item in filter(None, items):
        body, ratio = item, 1.0
        if "*" in item:
            body, _, r = item.rpartition("*")
            try:
                ratio = float(r)
            except ValueError:
                raise MedzooError(f"--data {item!r}: {r!r} after '*' is not a number (ITEM*RATIO, e.g. {body}*0.5)") from None
            if ratio <= 0:
                raise MedzooError(f"--data {item!r}: the ratio must be above 0")
        if body in cat.datasets:
            sources.append(Source(item, dataset=cat.datasets[body], ratio=ratio))
            continue
        path, fmt = body, None
        head, sep, tail = body.rpartition(":")
        if sep and tail in cat.formats:
            path, fmt = head, tail
        elif sep and head and not Path(body).exists() and not re.fullmatch(r"[A-Za-z]", head):
            raise MedzooError(f"--data {item!r}: {tail!r} is not a registered data format; "
                              f"known: {', '.join(sorted(cat.formats))}")
        if not Path(path).is_file():
            from medzoo.host import unknown
            raise MedzooError(f"--data {item!r}: no such file, and " + unknown("dataset", path, cat.datasets))
        sources.append(Source(item, path=path, format=fmt, ratio=ratio))
    if not sources:
        raise MedzooError("--data is empty: name a registered dataset or a file")
    return sources


def load_source(source: Source, use_sample: bool = False, skip_bad_rows: bool = False, catalog=None) -> Loaded:
    if source.dataset is not None:
        return load_registered(source.dataset, use_sample, skip_bad_rows, catalog)
    return load_file(source.path, source.format, None, skip_bad_rows, catalog=catalog)


def subsample(conversations: list[dict], ratio: float, seed: int) -> list[dict]:
    """The part of a source a ratio below 1 keeps: a seeded random subset, in file order."""
    if ratio >= 1:
        return conversations
    keep = max(1, round(len(conversations) * ratio))
    chosen = sorted(random.Random(seed).sample(range(len(conversations)), keep))
    return [conversations[i] for i in chosen]


def repeats(n: int, ratio: float, seed: int) -> list[int]:
    """Indices (into n rows) that a ratio above 1 adds: whole copies, then a seeded random part."""
    if ratio <= 1:
        return []
    whole, part = int(ratio), ratio - int(ratio)
    extra = list(range(n)) * (whole - 1)
    extra += sorted(random.Random(seed).sample(range(n), round(n * part)))
    return extra


def to_dataset(conversations: list[dict]):
    """A ``datasets.Dataset`` of conversations (history as a list of [query, response] lists)."""
    import datasets

    features = datasets.Features({
        "query": datasets.Value("string"), "response": datasets.Value("string"),
        "history": datasets.List(datasets.List(datasets.Value("string"))),
        "_file": datasets.Value("string"), "_line": datasets.Value("int64"), "_source": datasets.Value("int64")})
    columns = {name: [c.get(name, 0 if name == "_source" else None) for c in conversations] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def split(dataset, val_size: int | float, seed: int):
    """``(train, val)``: ``val_size`` rows (int) or that fraction (float < 1) held out, seeded; val is None
    when val_size is 0."""
    if not val_size:
        return dataset, None
    n = len(dataset)
    if isinstance(val_size, float) and not val_size.is_integer():
        if not 0 < val_size < 1:
            raise MedzooError(f"val_size {val_size}: a fraction must be between 0 and 1")
        if round(n * val_size) < 1 or round(n * val_size) >= n:
            raise MedzooError(f"val_size {val_size} of {n} rows leaves no validation or no training rows")
    else:
        val_size = int(val_size)
        if not 0 < val_size < n:
            raise MedzooError(f"val_size {val_size} is not less than the {n} rows loaded; set val_size lower "
                              f"(e.g. val_size=0.1) or 0 for no validation")
    parts = dataset.train_test_split(test_size=val_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_data(data: str | Iterable[str], *, use_sample: bool = False, skip_bad_rows: bool = False,
              val_size: int | float = 0, seed: int = 42, catalog=None) -> Data:
    """Load, mix and split the training data named by a ``--data`` value (see :func:`parse_data`).

    ``use_sample`` reads registered datasets from their bundled samples instead of their full sources.
    The validation rows are drawn before ratios above 1 repeat rows, so no repeated row is in both.
    """
    cat = catalog or _catalog()
    sources = parse_data(data, cat)
    total = Loaded([])
    for index, source in enumerate(sources):
        loaded = load_source(source, use_sample, skip_bad_rows, cat)
        kept = subsample(loaded.conversations, source.ratio, seed + index)
        for conv in kept:
            conv["_source"] = index
        total.absorb(Loaded(kept, loaded.skipped, loaded.problems))
    train, val = split(to_dataset(total.conversations), val_size, seed)
    by_source: dict[int, list[int]] = {}
    for row, index in enumerate(train["_source"]):
        by_source.setdefault(index, []).append(row)
    extra, counts = [], {}
    for index, source in enumerate(sources):
        rows = by_source.get(index, [])
        added = [rows[i] for i in repeats(len(rows), source.ratio, seed + index)]
        extra += added
        counts[source.text] = len(rows) + len(added)
    if extra:
        train = train.select(list(range(len(train))) + extra)
    return Data(train, val, total.skipped, total.problems, counts)


def _catalog():
    from medzoo.host import catalog

    return catalog()
