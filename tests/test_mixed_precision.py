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
from wprlhf.data import write_comparisons
from wprlhf.errors import UserError
from wprlhf.methods import sft
from wprlhf.rewards import classifier, reward_model

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


def test_auto_picks_bf16_only_where_it_is_faster(monkeypatch):
    from wprlhf import distributed

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("WPRLHF_MIXED_PRECISION")
    for fast, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(distributed, "cpu_runs_bf16_fast", lambda fast=fast: fast)
        assert distributed.resolve_mixed_precision("auto", cpu) == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert distributed.resolve_mixed_precision("auto", gpu) == "no"
    for explicit in ("no", "bf16", "fp16"):  # an explicit setting is never second-guessed
        assert distributed.resolve_mixed_precision(explicit, cpu) == explicit
    monkeypatch.setenv("WPRLHF_MIXED_PRECISION", "no")  # the suite's pin (conftest) replaces 'auto' only
    assert distributed.resolve_mixed_precision("auto", cpu) == "no"
    assert distributed.resolve_mixed_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("WPRLHF_MIXED_PRECISION", "auto")
    with pytest.raises(UserError, match="WPRLHF_MIXED_PRECISION must be one of"):
        distributed.resolve_mixed_precision("auto", cpu)


def test_auto_is_printed_saved_and_kept_on_resume(tmp_path, monkeypatch, capsys):
    """A run started where 'auto' meant bf16 resumes in bf16 on a machine where it would mean fp32."""
    import json

    from tests.test_ppo import PROMPTS
    from wprlhf import distributed
    from wprlhf.methods.ppo import PPOConfig, train
    from wprlhf.metrics import read_metrics
    from wprlhf.rewards.spec import vowels

    monkeypatch.delenv("WPRLHF_MIXED_PRECISION")
    monkeypatch.setattr(distributed, "cpu_runs_bf16_fast", lambda: True)
    base = dict(policy="tiny", batch_size=2, num_minibatches=1, response_length=4, checkpoint_every=1, log_samples=0,
                device="cpu")  # fmt: skip
    assert PPOConfig(**base).mixed_precision == "auto"  # the default
    train(PPOConfig(**base, steps=1), PROMPTS, vowels, tmp_path / "run")
    assert "mixed precision bf16" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "bf16"
    monkeypatch.setattr(distributed, "cpu_runs_bf16_fast", lambda: False)
    trainer = train(PPOConfig(**base, steps=2), PROMPTS, vowels, tmp_path / "run", resume=True, progress=False)
    assert trainer.config.mixed_precision == "bf16" and len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2
