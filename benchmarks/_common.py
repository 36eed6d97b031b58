"""Shared pieces of the benchmarks: 32-token query batches, the CPU probe, run metadata, JSON lines.

Imported by the bench_*.py scripts in this folder (run them as `python benchmarks/bench_X.py` from the repo root).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAN_PROMPTS = REPO.parent / "shared" / "data" / "writing_prompts" / "fan_prompts.csv"


def prompt_texts(source: str = "auto") -> tuple[list[str], str]:
    """Prompt texts and the name of their source: `fan` (../shared/data, when present) or `builtin`."""
    if source in ("auto", "fan") and FAN_PROMPTS.exists():
        with open(FAN_PROMPTS, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return [r["prompt"].strip() for r in rows if r.get("prompt", "").strip()], "fan_prompts.csv"
    if source == "fan":
        raise SystemExit(f"--prompts fan: {FAN_PROMPTS.relative_to(REPO.parent)} is absent")
    from wprlhf.data import builtin_prompts

    return builtin_prompts(), "builtin"


def fixed_queries(tokenizer, batch_size: int, length: int = 32, source: str = "auto", seed: int = 42):
    """(queries (B, length) int64, query_mask (B, length) bool all True, source).

    Prompts are tokenised without special tokens; those shorter than `length` are dropped, the rest cut to their
    first `length` tokens (as the trl peer does), then shuffled with `seed`. The built-in prompts are mostly
    shorter than 32 tokens, so with them consecutive prompts are joined into one text first.
    """
    texts, name = prompt_texts(source)
    if name == "builtin":
        texts = [" ".join(texts[i : i + 4]) for i in range(0, len(texts), 2)]
    ids = [row[:length] for row in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(row) >= length]
    if len(ids) < batch_size:
        raise SystemExit(f"only {len(ids)} prompts of >= {length} tokens in {name}; need {batch_size}")
    random.Random(seed).shuffle(ids)
    queries = torch.tensor(ids[:batch_size], dtype=torch.long)
    return queries, torch.ones_like(queries, dtype=torch.bool), name


def cpu_probe(n: int = 1024, repeats: int = 7) -> float:
    """Median fp32 n^3 matmul GFLOP/s with the current torch thread count (the host's speed right now)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return round(statistics.median(rates), 1)


def peak_rss_mib() -> float:
    """ru_maxrss of this process (KiB on Linux) in MiB: everything, imports and model loading included."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return float("nan")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def versions() -> dict:
    import transformers

    import wprlhf

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "wprlhf": getattr(wprlhf, "__version__", "?")}  # fmt: skip


def append_jsonl(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def shown(path: str | Path) -> str:
    """A path for messages: relative to the current directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def med(xs):
    return statistics.median(xs) if xs else float("nan")
