"""`medzoo chat -p` time-to-first-token on the CPU demo model, against `python -c "import transformers"`.

    python bench/chat_ttft.py [--runs 5]

Trains the cpu-demo model once if the zoo has none (`bentsao-demo`, what `make demo` makes), then times, from
process start: the first byte of the streamed answer on stdout, and the whole command. The floor is a bare
`import transformers` in a new interpreter. Appends a table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = "bentsao-demo"
PROMPT = "偏头痛有哪些常见症状？"


def first_token(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)  # the first byte the chat streams
    ttft = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return ttft, time.perf_counter() - start


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    medzoo = [sys.executable, "-m", "medzoo"]
    listed = subprocess.run(medzoo + ["list", "--local", "--json"], capture_output=True, text=True, check=True)
    if f'"{DEMO}"' not in listed.stdout:
        subprocess.run(medzoo + ["train", "bentsao", "--profile", "cpu-demo", "--output-dir", str(ROOT / "runs" / DEMO),
                                 "--name", DEMO, "--quiet"], check=True)
    chat = medzoo + ["chat", DEMO, "-p", PROMPT, "--greedy", "--max-new-tokens", "32"]
    first_token(chat)  # warm the page cache
    ttfts, totals = zip(*(first_token(chat) for _ in range(args.runs)))
    floor = [wall([sys.executable, "-c", "import transformers"]) for _ in range(args.runs)]
    torch_floor = [wall([sys.executable, "-c", "import torch"]) for _ in range(args.runs)]
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = "\n".join([
        f"\n### `medzoo chat -p` time to first token, cpu-demo model — {date}\n",
        f"Machine: {machine}. Command: `python bench/chat_ttft.py --runs {args.runs}` "
        f"(`{' '.join(['medzoo'] + chat[3:])}`, greedy so tokens stream).\n",
        "| what | median s | min s | max s |", "|---|---|---|---|",
        *(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |" for name, v in (
            ("chat: first token", ttfts), ("chat: whole command", totals),
            ('floor: python -c "import transformers"', floor), ('floor: python -c "import torch"', torch_floor))),
        "",
    ])
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
