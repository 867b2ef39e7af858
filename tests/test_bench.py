"""bench/train_speed.py runs for real on a tiny shape: the seed way and `medzoo train` per method, the
figures it records and the table it appends. (Speed is never asserted: tests don't time things.)"""
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def bench_record(tmp_path_factory):
    import train_speed

    out = tmp_path_factory.mktemp("bench")
    results = out / "RESULTS.md"
    results.write_text("# results\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDZOO_HOME", str(out / "home"))
        record = train_speed.main(["--shape", "tiny", "--steps", "3", "--rows", "48", "--micro", "2", "--accum", "2",
                                   "--methods", "lora,qlora,freeze,full", "--out", str(out), "--results", str(results)])
    return record, out, results


def test_every_method_runs_both_ways_with_sane_figures(bench_record):
    record, _, _ = bench_record
    assert list(record["methods"]) == ["lora", "qlora", "freeze", "full"]
    for method in ("lora", "freeze", "full"):
        entry = record["methods"][method]
        seed, ours = entry["runs"]["seed way"], entry["runs"]["medzoo train"]
        for run in (seed, ours):
            assert run["tokens_per_s"] > 0 and run["samples_per_s"] > 0 and math.isfinite(run["final_loss"])
            assert 0 <= run["padding_fraction"] < 1
        # the same optimizer steps of the same global batch: the same number of rows trained on
        assert seed["samples_per_s"] * seed["seconds"] == pytest.approx(3 * 4)
        assert ours["samples_per_s"] * ours["seconds"] == pytest.approx(3 * 4)
        # padding every row to the 256-token cut-off wastes more than medzoo's packing
        assert seed["padding_fraction"] > ours["padding_fraction"]
        assert entry["ratios"]["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / seed["tokens_per_s"])
        assert entry["estimate_gb"]["total_gb"] > 0
    qlora = record["methods"]["qlora"]["runs"]
    assert "CUDA" in qlora["seed way"]["skipped"] and "CUDA" in qlora["medzoo train"]["skipped"]
    assert "not installed" in qlora["LLaMA-Factory"]["skipped"] or "CUDA" in qlora["LLaMA-Factory"]["skipped"]


def test_freeze_trains_the_recipes_last_layers_only(bench_record):
    record, _, _ = bench_record
    assert record["freeze_layers"] == 1  # the tiny shape has 2 layers
    # both ways start from the same weights and data: their first losses agree closely
    entry = record["methods"]["freeze"]["runs"]
    assert abs(entry["seed way"]["final_loss"] - entry["medzoo train"]["final_loss"]) < 0.5


def test_json_and_markdown_are_written(bench_record):
    record, out, results = bench_record
    saved = json.loads(next(out.glob("train_speed-*-tiny.json")).read_text())
    assert saved["methods"]["lora"]["ratios"] == record["methods"]["lora"]["ratios"]
    text = results.read_text()
    assert text.startswith("# results\n") and "Command: `python bench/train_speed.py --shape tiny" in text
    assert "| lora | medzoo train |" in text and "| qlora | seed way | skipped: QLoRA needs CUDA" in text
    assert "- full: medzoo / seed real tokens/s ×" in text


def test_unknown_method_is_refused():
    import train_speed

    with pytest.raises(SystemExit, match="--methods: 'dora' is not one of lora, qlora, freeze, full"):
        train_speed.main(["--shape", "tiny", "--methods", "lora,dora", "--results", "-"])


def test_a_missing_llamafactory_python_is_one_clear_error(tmp_path):
    import train_speed

    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(SystemExit, match=f"--llamafactory-python: LLaMA-Factory python {missing}: no such file"):
        train_speed.main(["--shape", "tiny", "--llamafactory-python", str(missing), "--results", "-"])
