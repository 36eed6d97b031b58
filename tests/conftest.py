"""Shared fixtures: tiny random models (seconds each) and paths to the real data when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: tiny models gain nothing from two, and a second process on a 2-core machine would thrash.
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
