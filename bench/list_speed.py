"""Benchmark: `medzoo list` wall time with the built-in plugins plus ten installed third-party plugins.

    python bench/list_speed.py [--runs 21] [--plugins 10] [--keep]

Scaffolds N plugins with `medzoo new-recipe`, pip-installs them (editable, no deps), times `medzoo list`
(the installed console script, and the `medzoo` found on PATH when that is a different file, e.g. a pyenv
shim), then uninstalls them. Appends a Markdown row to bench/RESULTS.md. A benchmark, not a test: it never
fails on a slow figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], runs: int, env: dict) -> list[float]:
    subprocess.run(cmd, check=True, capture_output=True, env=env)  # warm the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--plugins", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="leave the plugins installed")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medzoo-bench-"))
    env = dict(os.environ, MEDZOO_HOME=str(work / "home"))
    script = Path(sys.executable).parent / "medzoo"
    names = [f"bench-plugin-{i:02d}" for i in range(args.plugins)]
    dists = [f"medzoo-{n}" for n in names]
    try:
        for name in names:
            subprocess.run([str(script), "new-recipe", name, "--dir", str(work)], check=True, capture_output=True,
                           env=env)
        if names:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
            for name in names:
                cmd += ["-e", str(work / f"medzoo-{name}")]
            subprocess.run(cmd, check=True)
        listing = subprocess.run([str(script), "list", "--json"], check=True, capture_output=True, text=True,
                                 env=env)
        listed = {r["name"] for r in json.loads(listing.stdout)}
        missing = set(names) - listed
        if missing:
            raise SystemExit(f"plugins not listed: {sorted(missing)}")
        results = {"console script": timed([str(script), "list"], args.runs, env)}
        on_path = shutil.which("medzoo")
        if on_path and Path(on_path).resolve() != script.resolve():
            results[f"`medzoo` on PATH ({on_path})"] = timed(["medzoo", "list"], args.runs, env)
        results["floor: python -c pass"] = timed([sys.executable, "-c", "pass"], args.runs, env)
    finally:
        if names and not args.keep:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *dists], check=False)
        shutil.rmtree(work, ignore_errors=True)
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = f"python bench/list_speed.py --runs {args.runs} --plugins {args.plugins}"
    lines = [f"\n### `medzoo list` wall time, {len(listed)} recipes ({args.plugins} third-party plugins) — {date}\n",
             f"Machine: {machine}. Command: `{command}`.\n", "| what | median s | min s | max s |",
             "|---|---|---|---|"]
    for what, times in results.items():
        lines.append(f"| {what} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
