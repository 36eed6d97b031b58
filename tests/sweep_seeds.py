"""The seed sweep: every learned bar (tests.helpers.learned) under several seed offsets and kernel sets.

A sampled training trajectory is a chaotic function of every rounding, so another CPU's kernels act like another
seed. A test that asserts a learned quantity must clear its bar by a margin (measured / bar, or bar / measured for
an upper bound) of at least 1.5 under every offset of WPRLHF_TEST_SEED, natively and under ATEN_CPU_CAPABILITY=default
(the plain kernels). This runs the tests that hold such bars once per (kernel set, offset), each in a fresh pytest
process, and writes the worst margin of each bar per kernel set:

    .venv/bin/python -m tests.sweep_seeds --offsets 0 1 2 3 4 --out sweep.md

Exit 1 when any bar's worst margin is under --min-margin (or a run failed for another reason), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"native": {}, "default": {"ATEN_CPU_CAPABILITY": "default"}}


def tests_with_bars() -> list[str]:
    """Node ids (file::function) of every test function whose body calls `learned(`."""
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^def (test_\w+)\(.*?(?=^def |^@|\Z)", source, re.S | re.M):
            if "learned(" in match.group(0):
                found.append(f"tests/{path.name}::{match.group(1)}")
    return found


def run_one(tests: list[str], kernel: str, offset: int, log: Path, threads: int) -> int:
    env = {**os.environ, **KERNELS[kernel], "WPRLHF_TEST_SEED": str(offset), "WPRLHF_MARGIN_LOG": str(log),
           "WPRLHF_TEST_THREADS": str(threads)}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib", *tests]
    print(f"== {kernel} kernels, WPRLHF_TEST_SEED={offset}: {len(tests)} tests", flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def table(rows: list[dict], kernels: list[str], offsets: list[int], min_margin: float) -> tuple[str, bool]:
    """Markdown: one line per (test, bar), its worst margin per kernel set and the offset where it was worst."""
    bars: dict[tuple[str, str], dict] = {}
    for row in rows:
        row["margin"] = math.inf if row["margin"] is None else row["margin"]  # null: a bar of 0 cleared
        key = (row["test"], row["what"])
        entry = bars.setdefault(key, {"bar": row["bar"], "upper": row["upper"], "worst": {}})
        worst = entry["worst"].get(row["kernel"])
        if worst is None or row["margin"] < worst[0]:
            entry["worst"][row["kernel"]] = (row["margin"], row["seed_offset"], row["measured"])
    ok = True
    lines = [f"Offsets {offsets}; margin = measured / bar (bar / measured for an upper bound); wanted >= {min_margin}.", "",
             "| test | bar | " + " | ".join(f"worst margin, {k} (offset, measured)" for k in kernels) + " |",
             "|---|---|" + "---|" * len(kernels)]  # fmt: skip
    for (test, what), entry in sorted(bars.items()):
        cells = []
        for kernel in kernels:
            if kernel not in entry["worst"]:
                cells.append("not measured")
                ok = False
                continue
            margin, offset, measured = entry["worst"][kernel]
            ok &= margin >= min_margin
            cells.append(f"{'**' if margin < min_margin else ''}{margin:.2f}{'**' if margin < min_margin else ''} "
                         f"({offset}, {measured:.4g})")  # fmt: skip
        sign = "<" if entry["upper"] else ">"
        lines.append(f"| `{test.split('::')[-1]}`: {what} | {sign} {entry['bar']:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="WPRLHF_TEST_SEED values")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--tests", nargs="*", help="node ids (default: every test that calls learned())")
    parser.add_argument("--threads", type=int, default=1, help="WPRLHF_TEST_THREADS of each run")
    parser.add_argument("--min-margin", type=float, default=1.5)
    parser.add_argument("--log", help="JSONL of every bar measured (default: a temporary file)")
    parser.add_argument("--out", help="write the Markdown table here as well as to stdout")
    args = parser.parse_args(argv)
    tests = args.tests or tests_with_bars()
    log = Path(args.log) if args.log else Path(tempfile.mkstemp(suffix=".jsonl")[1])
    failed_runs = []
    for kernel in args.kernels:
        for offset in args.offsets:
            before = log.read_text().count("\n") if log.exists() else 0
            code = run_one(tests, kernel, offset, log, args.threads)
            new = log.read_text().splitlines()[before:] if log.exists() else []
            rows = [json.loads(line) | {"kernel": kernel} for line in new]
            log.write_text("\n".join(log.read_text().splitlines()[:before] + [json.dumps(r) for r in rows]) + "\n")
            if code not in (0, 1):  # 1: a test failed, which the table shows; anything else: the run broke
                failed_runs.append(f"{kernel} offset {offset}: pytest exit {code}")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    text, ok = table(rows, args.kernels, args.offsets, args.min_margin)
    if failed_runs:
        text += "\nRuns that broke: " + "; ".join(failed_runs) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0 if ok and not failed_runs else 1


if __name__ == "__main__":
    sys.exit(main())
