"""The training data of a run: conversations from the data layer (medzoo.data.load: --data specs, ratios,
validation split), encoded with the recipe's template by medzoo.data.tokenize (the one source of truth shared
with inference)."""
from __future__ import annotations

from dataclasses import dataclass, field

from medzoo.data import load as data_load
from medzoo.data import tokenize as data_tokenize

SAMPLE_VAL_SHARE = 10      # a bundled sample holds back at most 1/10 of its rows for validation


@dataclass
class RunData:
    train: list                    # encoded examples {"input_ids", "labels"}
    val: list
    skipped: int = 0               # bad rows skipped (--skip-bad-rows), loading and tokenizing together
    problems: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _val_size(run: dict, cat, specs: str, skip_bad_rows: bool, notes: list):
    """The recipe's held-out rows; a bundled sample of a few hundred rows cannot give BenTsao's 500, so a
    sample run holds back a tenth instead (and says so)."""
    val = run["training"].get("val_size") or 0
    if not run.get("sample") or not val or (isinstance(val, float) and val < 1):
        return val
    rows = len(data_load.load_data(specs, use_sample=True, skip_bad_rows=skip_bad_rows, catalog=cat).train)
    if int(val) * SAMPLE_VAL_SHARE > rows:
        notes.append(f"val_size {val} is more than the bundled samples allow ({rows} rows); holding out "
                     f"{max(1, rows // SAMPLE_VAL_SHARE)} rows")
        return max(1, rows // SAMPLE_VAL_SHARE)
    return int(val)


def load(cat, run: dict, tokenizer, template, *, skip_bad_rows: bool = False) -> RunData:
    t = run["training"]
    specs = run.get("data") or ",".join(run["datasets"])
    notes: list = []
    val_size = _val_size(run, cat, specs, skip_bad_rows, notes)
    data = data_load.load_data(specs, use_sample=bool(run.get("sample")), skip_bad_rows=skip_bad_rows,
                               val_size=val_size, seed=int(t["seed"]), catalog=cat)
    kwargs = dict(train_on_inputs=bool(t["train_on_inputs"]), max_source_length=t.get("max_source_length"),
                  max_target_length=t.get("max_target_length"), skip_bad_rows=skip_bad_rows)
    skipped, problems = data.skipped, list(data.problems)

    def encode(dataset) -> list:
        nonlocal skipped
        if dataset is None or len(dataset) == 0:
            return []
        tok = data_tokenize.tokenize_dataset(dataset, template, tokenizer, int(t["cutoff_len"]), **kwargs)
        skipped += tok.skipped
        problems.extend(tok.problems)
        return [{"input_ids": ids, "labels": labels}
                for ids, labels in zip(tok.dataset["input_ids"], tok.dataset["labels"])]

    return RunData(encode(data.train), encode(data.val), skipped, problems, dict(data.counts), notes)
