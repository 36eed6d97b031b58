"""Shared fixtures: tiny random models (seconds each) and paths to the real data when it is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One thread by default: tiny models gain nothing from two, and a second process on a 2-core machine would thrash.
# WPRLHF_TEST_THREADS=N overrides it: kernels split work differently across threads (and round differently), so
# the learning tests are checked under 1 and 2 threads as well as under each kernel set (ATEN_CPU_CAPABILITY).
TEST_THREADS = os.environ.get("WPRLHF_TEST_THREADS", "1")
if not TEST_THREADS.isdigit() or int(TEST_THREADS) < 1:
    raise pytest.UsageError(f"WPRLHF_TEST_THREADS must be a positive integer, got {TEST_THREADS!r}")
torch.set_num_threads(int(TEST_THREADS))
# --mixed-precision defaults to 'auto', bf16 on CPUs with AVX-512 BF16: the suite pins fp32 (its numbers were worked
# out in fp32, and must not depend on the CPU); a test that wants bf16 asks for it. Subprocesses inherit the pin.
os.environ.setdefault("WPRLHF_MIXED_PRECISION", "no")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _malloc_as_the_suite_found_it(monkeypatch):
    """`cli.main` sets the whole process's malloc (allocator.py): tests that call it in this process must not change
    how the rest of the suite allocates, or its memory would depend on test order. Child processes still set it."""
    monkeypatch.setattr("wprlhf.cli.keep_freed_memory", lambda: False)


def pytest_report_header(config):
    """The kernel set and thread count in every run's header: a learning test's trajectory depends on both."""
    from tests.helpers import SEED_OFFSET

    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} thread(s), WPRLHF_TEST_SEED={SEED_OFFSET}")


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (left padding, pad = <empty_output>), as `tiny` uses it."""
    from wprlhf.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny(tokenizer):
    """A fresh random-init TINY_ARCH Llama (seed 0) in eval mode; each test gets its own copy."""
    from wprlhf.models import load_policy

    model, _ = load_policy("tiny", seed=0)
    return model


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is absent (a fresh clone): this test needs the real data set beside the repo")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter):
    """One line per learned bar checked (tests.helpers.learned): measured, bar and margin, so a near miss shows
    before it becomes a failure on another CPU."""
    from tests.helpers import LEARNED, SEED_OFFSET

    if not LEARNED:
        return
    terminalreporter.section(f"learned bars (WPRLHF_TEST_SEED={SEED_OFFSET}; margin = measured / bar, >= 1.5 wanted)")
    for row in LEARNED:
        sign = "<" if row["upper"] else ">"
        flag = "" if row["margin"] >= 1.5 else "   <-- margin under 1.5"
        terminalreporter.write_line(f"{row['margin']:6.2f}  {row['test']}  {row['what']}: {row['measured']:.4g} "
                                    f"{sign} {row['bar']:.4g}{flag}")
