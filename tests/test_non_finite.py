"""No NaN or inf reaches the weights: bad scores are refused at every entry point, normalisation that needs two
episodes refuses one, and any update whose loss or gradient norm is not finite stops the run before the optimizer
step, naming the step and the quantity: the weights stay finite and the last checkpoint as it was."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_classifier import TOY
from tests.test_distributed import run_worker
from tests.test_ppo import PROMPTS
from tests.test_reward_model import _toy_comparisons
from wprlhf.cli import main
from wprlhf.data import write_comparisons
from wprlhf.errors import NonFiniteError, UserError
from wprlhf.methods.ppo import PPOConfig, PPOTrainer, train
from wprlhf.metrics import read_metrics
from wprlhf.models import load_policy


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_batch_score_norm_of_one_episode_is_refused_up_front(tmp_path, capsys):
    """The issue's input: the std of one score is NaN and made every weight of r1/policy NaN."""
    argv = ["ppo", "--policy", "tiny", "--reward", "length", "--steps", "2", "--batch-size", "1",
            "--num-minibatches", "1", "--score-norm", "batch", "--response-length", "8", "--out", str(tmp_path / "r1")]  # fmt: skip
    assert main(argv) == 2
    assert "needs batch_size >= 2" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()


@pytest.mark.parametrize(
    "scores, message",
    [([math.nan, 0.5], "non-finite scores"), ([math.inf, 0.5], "non-finite scores"),
     ([0.5], "returned 1 scores for 2 responses"), ([0.5, 0.5, 0.5], "returned 3 scores for 2 responses"),
     (None, "must return a list of numbers")],
)  # fmt: skip
def test_trl_style_step_validates_scores_as_train_does(tokenizer, scores, message):
    policy, _ = load_policy("tiny")
    trainer = PPOTrainer(PPOConfig(policy="tiny", batch_size=2, num_minibatches=1, lr=1e-3), policy, tokenizer)
    before = _weights(policy)
    queries = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    responses = [torch.tensor([100, 200, 300]), torch.tensor([400, 500])]
    with pytest.raises(UserError, match=message):
        trainer.step(queries, responses, scores)
    assert torch.equal(before, _weights(policy))


def test_trl_style_step_refuses_empty_and_mismatched_token_lists(tokenizer):
    policy, _ = load_policy("tiny")
    trainer = PPOTrainer(PPOConfig(policy="tiny", batch_size=2, num_minibatches=1), policy, tokenizer)
    queries = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    with pytest.raises(UserError, match="2 queries and 1 responses"):
        trainer.step(queries, [torch.tensor([100])], [1.0])
    with pytest.raises(UserError, match="response 1 is not a non-empty 1-D tensor"):
        trainer.step(queries, [torch.tensor([100]), torch.tensor([], dtype=torch.long)], [1.0, 0.0])
    with pytest.raises(UserError, match="outside the policy's vocabulary"):
        trainer.step(queries, [torch.tensor([100]), torch.tensor([10**6])], [1.0, 0.0])


@pytest.mark.learning
def test_a_non_finite_update_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """Finite but huge scores at step 3 overflow the advantages and the policy's loss: the run stops before step
    3's first optimizer step (the policy's), naming it, and the step-2 checkpoint is untouched."""
    calls = []

    def reward_fn(prompts, responses):
        calls.append(1)
        return [3e38 if len(calls) == 3 else float(len(r) % 3) for r in responses]

    config = PPOConfig(policy="tiny", steps=4, batch_size=4, num_minibatches=2, response_length=6, lr=1e-3,
                       checkpoint_every=1, log_samples=0)  # fmt: skip
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"PPO update, step 3: .*policy_loss = nan") as err:
        train(config, PROMPTS, reward_fn, out, progress=False)
    assert "--resume" in str(err.value)
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002" / "policy")
    assert torch.isfinite(_weights(saved)).all()
    assert not (out / "policy").exists()  # no final export of a broken run


def _nan_loss(fn):
    """Wrap a loss function so its loss (first output) is NaN, with the graph intact."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        return (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan
    return wrapped


@pytest.mark.learning
def test_sft_stops_on_a_nan_loss(tmp_path, monkeypatch, tokenizer):
    from tests.test_sft import write_responses
    from wprlhf.methods import sft

    data = write_responses(tmp_path / "responses.csv")
    policy, _ = load_policy("tiny")
    before = _weights(policy)
    monkeypatch.setattr(sft, "sft_loss", _nan_loss(sft.sft_loss))
    config = sft.SFTConfig(policy="tiny", data=str(data), max_length=64, batch_size=2, gradient_accumulation_steps=1, epochs=1, eval_every=100,
                           val_fraction=0.25, n_samples=0, warmup=0.0)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"SFT, step 1: .*= nan"):
        sft.train(config, tmp_path / "run", policy=policy, tokenizer=tokenizer, progress=False)
    assert torch.equal(before, _weights(policy))
    assert not (tmp_path / "run" / "policy").exists()


@pytest.mark.learning
def test_reward_model_training_stops_on_a_nan_loss(tmp_path, monkeypatch):
    from wprlhf.rewards import reward_model

    write_comparisons(tmp_path / "train.jsonl", _toy_comparisons(40))
    monkeypatch.setattr(reward_model.Pairwise, "loss", _nan_loss(reward_model.Pairwise.loss))
    config = reward_model.RewardConfig(data=str(tmp_path / "train.jsonl"), model="tiny", max_length=32, epochs=1,
                                       batch_size=8, val_fraction=0.2, normalize_samples=10)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"reward-model training, step 1: .*loss = nan"):
        reward_model.train(config, tmp_path / "rm", progress=False)
    assert not (tmp_path / "rm" / "model.safetensors").exists()


@pytest.mark.learning
def test_classifier_training_stops_on_a_nan_loss(tmp_path, monkeypatch):
    from tests.test_classifier import save_tiny_encoder, toy_reviews, write_csv
    from wprlhf.rewards import classifier

    write_csv(tmp_path / "train.csv", toy_reviews(16, seed=1))
    encoder = save_tiny_encoder(tmp_path / "enc")
    monkeypatch.setattr(classifier.BinaryRating, "loss", _nan_loss(classifier.BinaryRating.loss))
    config = classifier.ClassifierConfig(data=str(tmp_path / "train.csv"), model=str(encoder), **{**TOY, "epochs": 1})
    with pytest.raises(NonFiniteError, match=r"classifier training, step 1: .*loss = nan"):
        classifier.train(config, tmp_path / "clf", progress=False)
    assert not (tmp_path / "clf" / "model.safetensors").exists()


@pytest.mark.learning
def test_every_process_stops_together_when_one_sees_nan(tmp_path):
    """Rank 1 alone holds a NaN loss: both ranks raise at the same step (none waits in a collective, no hang)."""
    run_worker(2, "nonfinite", tmp_path / "out.txt")
    for rank in (0, 1):
        text = (tmp_path / f"out.txt.rank{rank}").read_text()
        assert text.startswith("raised") and "step 7: loss = nan" in text, text



@pytest.mark.parametrize(
    "flags, message",
    [(["--kl-coef", "nan"], "kl_coef must be a finite number"), (["--lr", "inf"], "lr must be a finite number"),
     (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number"), (["--lr", "-1"], "lr must be >= 0"),
     (["--config", "CONFIG"], "lr must be a finite number")],
)  # fmt: skip
def test_non_finite_or_negative_settings_are_refused_before_any_work(tmp_path, capsys, flags, message):
    """A NaN setting passes every range check: it used to crash writing config.json (and a negative lr ran the
    update backwards). Refused up front, with the flag to fix, and no run directory made."""
    (tmp_path / "nan.yaml").write_text("lr: .nan\n")
    flags = [str(tmp_path / "nan.yaml") if f == "CONFIG" else f for f in flags]
    argv = ["ppo", "--policy", "tiny", "--reward", "length", "--steps", "1", "--batch-size", "2", "--num-minibatches",
            "1", "--response-length", "4", "--out", str(tmp_path / "run"), *flags]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_scores_beyond_float32_are_named_as_such(tokenizer):
    """1e300 is finite for Python but inf in float32: the message says so and names the caller's own entry point."""
    policy, _ = load_policy("tiny")
    trainer = PPOTrainer(PPOConfig(policy="tiny", batch_size=2, num_minibatches=1), policy, tokenizer)
    queries = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    with pytest.raises(UserError, match=r"PPOTrainer.step's scores returned scores beyond float32's range"):
        trainer.step(queries, [torch.tensor([100]), torch.tensor([200])], [1e300, 0.0])


def test_an_empty_comparisons_jsonl_says_it_holds_nothing(tmp_path, capsys):
    """A blank comparisons JSONL said it 'lacks column(s) ... (has: )'; it holds no rows."""
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["rm", "train", "--model", "tiny", "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "rm")]) == 2
    assert "empty.jsonl holds no rows" in capsys.readouterr().err
