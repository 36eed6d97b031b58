"""`--mixed-precision bf16` reaches the training matmuls of every trainer (SFT, reward model, classifier; PPO's are
in test_memory_savers.py): a global forward hook records the dtype of every linear layer's output while gradients
are on, and it must be bf16 when bf16 was asked for and fp32 otherwise."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.test_classifier import TOY, save_tiny_encoder, toy_reviews, write_csv
from tests.test_reward_model import _toy_comparisons
from tests.test_sft import write_responses
from wprlhf import classifier, reward_model, sft
from wprlhf.data import write_comparisons
from wprlhf.errors import UserError

pytestmark = pytest.mark.learning  # every test here takes optimizer steps


@contextlib.contextmanager
def training_linear_dtypes():
    """The set of output dtypes of every nn.Linear forward run with gradients on, inside the block."""
    seen: set[torch.dtype] = set()

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _sft(tmp_path, precision):
    data = write_responses(tmp_path / "responses.csv")
    config = sft.SFTConfig(policy="tiny", data=str(data), max_length=48, batch_size=2, gradient_accumulation_steps=1,
                           epochs=1, max_examples=4, eval_every=100, val_fraction=0.25, n_samples=0, warmup=0.0,
                           mixed_precision=precision, device="cpu")  # fmt: skip
    sft.train(config, tmp_path / precision, progress=False)


def _rm(tmp_path, precision):
    write_comparisons(tmp_path / "c.jsonl", _toy_comparisons(24))
    config = reward_model.RewardConfig(data=str(tmp_path / "c.jsonl"), model="tiny", max_length=32, epochs=1, batch_size=8,
                                       val_fraction=0.2, normalize_samples=8, mixed_precision=precision, device="cpu")  # fmt: skip
    reward_model.train(config, tmp_path / precision, progress=False)


def _classifier(tmp_path, precision):
    write_csv(tmp_path / "train.csv", toy_reviews(16, seed=1))
    encoder = save_tiny_encoder(tmp_path / "enc")
    config = classifier.ClassifierConfig(data=str(tmp_path / "train.csv"), model=str(encoder),
                                         **{**TOY, "epochs": 1, "mixed_precision": precision, "device": "cpu"})  # fmt: skip
    classifier.train(config, tmp_path / precision, progress=False)


@pytest.mark.parametrize("trainer", [_sft, _rm, _classifier], ids=["sft", "reward_model", "classifier"])
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_training_matmuls_run_in_the_precision_asked_for(tmp_path, trainer, precision, dtype):
    with training_linear_dtypes() as seen:
        trainer(tmp_path, precision)
    assert seen == {dtype}


@pytest.mark.parametrize("make", [lambda: sft.SFTConfig(mixed_precision="fp8"),
                                  lambda: reward_model.RewardConfig(mixed_precision="half"),
                                  lambda: classifier.ClassifierConfig(mixed_precision="bf17")])  # fmt: skip
def test_an_unknown_precision_is_refused_up_front(make):
    with pytest.raises(UserError, match="mixed_precision must be one of"):
        make()
