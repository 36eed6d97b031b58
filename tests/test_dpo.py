"""DPO: the loss and implicit rewards by hand, pairs from comparisons, response-only log-probs, a learning run on a
toy preference set with `tiny`, resume, bad input. The 2-process equivalence is in test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_same_runs, close, learned, seed, t
from wprlhf.data import Comparison, write_comparisons
from wprlhf.errors import UserError
from wprlhf.methods.dpo import DPOConfig, Pair, dpo_loss, encode_pairs, pair_logprobs, pairs_from, train
from wprlhf.metrics import read_metrics

# Two pairs: summed log-probs of the chosen and rejected responses under the policy and the reference; beta 0.5.
CHOSEN, REJECTED = t([-1.0, -3.0]), t([-2.0, -1.0])
REF_CHOSEN, REF_REJECTED = t([-1.5, -2.5]), t([-1.5, -2.0])


def test_dpo_loss_and_implicit_rewards_by_hand():
    """h = (chosen - ref_chosen) - (rejected - ref_rejected):
    pair 1: (0.5) - (-0.5) = 1 -> -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770;
    pair 2: (-0.5) - (1) = -1.5 -> -log sigmoid(-0.75) = log(1 + e^0.75) = 1.1368710.
    Implicit rewards beta * log-ratio: chosen (0.25, -0.25), rejected (-0.25, 0.5), margins (0.5, -0.75).
    IPO: (h - 1/(2 beta))^2 = (1 - 1)^2 = 0 and (-1.5 - 1)^2 = 6.25.
    """
    losses, stats = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    close(losses, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.75))])
    close(losses, [0.4740770, 1.1368710])
    close(stats["chosen_reward"], [0.25, -0.25])
    close(stats["rejected_reward"], [-0.25, 0.5])
    close(stats["margin"], [0.5, -0.75])
    ipo, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss="ipo")
    close(ipo, [0.0, 6.25])


def test_dpo_gradient_by_hand():
    """d(-log sigmoid(beta h))/d chosen_logp = -beta * sigmoid(-beta h); for pair 1: -0.5 * sigmoid(-0.5) = -0.1887703;
    the rejected response's gradient is its negative."""
    chosen, rejected = CHOSEN.clone().requires_grad_(True), REJECTED.clone().requires_grad_(True)
    losses, _ = dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.5)
    losses[0].backward()
    close(chosen.grad, [-0.1887703, 0.0])
    close(rejected.grad, [0.1887703, 0.0])


def test_pairs_skip_ties_and_expand_k_way():
    comparisons = [
        Comparison("p1", ["a", "b"], 1),
        Comparison("p2", ["c", "d"], 0, tie=True),  # no preference: skipped
        Comparison("p3", ["e", "f", "g"], 2),  # best of 3: g over e, g over f
    ]
    pairs = pairs_from(comparisons)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "b", "a"), ("p3", "g", "e"), ("p3", "g", "f")]


def test_logprobs_count_response_tokens_only_and_padding_changes_nothing(tiny, tokenizer):
    """A pair's log-probs are the sum over its response tokens (+ end-of-turn); the prompt's tokens never count,
    and a batch padded to a longer neighbour gives each pair the numbers it gets alone."""
    config = DPOConfig(policy="tiny", mixed_precision="no")
    pairs = [Pair("A short prompt", "yes", "no no no no no"), Pair("A much longer prompt " * 5, "a b c d e f", "x")]
    batch = encode_pairs(tokenizer, pairs, config, tiny)
    n_tokens = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) + 1 for x in
                ("yes", "a b c d e f", "no no no no no", "x")]  # fmt: skip
    assert batch[3].sum(1).tolist() == n_tokens
    with torch.no_grad():
        chosen, rejected = pair_logprobs(tiny, batch)
        for i, pair in enumerate(pairs):
            alone = pair_logprobs(tiny, encode_pairs(tokenizer, [pair], config, tiny))
            torch.testing.assert_close(chosen[i], alone[0][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(rejected[i], alone[1][0], atol=1e-4, rtol=0)


def test_bf16_reference_holds_bf16_matmul_weights_and_starts_at_zero_margin(tokenizer):
    """Under bf16 the DPO reference stores its linear weights in bf16; before any step it gives the policy's own
    log-probs, so every pair's implicit reward margin is exactly 0."""
    from wprlhf.methods.dpo import DPO
    from wprlhf.models import load_policy

    policy, _ = load_policy("tiny")
    dpo = DPO(DPOConfig(policy="tiny", mixed_precision="bf16", device="cpu"), policy, tokenizer, total_steps=1)
    assert all(m.weight.dtype == torch.bfloat16 for m in dpo.reference.modules() if isinstance(m, torch.nn.Linear))
    _, stats = dpo.batch_loss([Pair("A short prompt", "yes", "no no no"), Pair("Another prompt", "a b c", "x")])
    assert torch.equal(stats["margin"], torch.zeros(2))


def test_reference_logprobs_are_kept_per_pair_and_read_back_in_later_epochs(tokenizer):
    """A pair's reference log-probs are computed the first time its key is seen and read back after: the loss is
    the same as computing them again, and no reference forward runs once every key is known."""
    from wprlhf.methods.dpo import DPO
    from wprlhf.models import load_policy

    policy, _ = load_policy("tiny")
    dpo = DPO(DPOConfig(policy="tiny", mixed_precision="no", device="cpu"), policy, tokenizer, total_steps=1)
    pairs = [Pair("A short prompt", "yes", "no no no"), Pair("Another prompt", "a b c", "x")]
    with torch.no_grad():
        dpo.policy.lm_head.weight.mul_(1.5)  # the policy moves; the reference must not
        fresh, _ = dpo.batch_loss(pairs)
        first, _ = dpo.batch_loss(pairs, [("train", 0), ("train", 1)])
        assert set(dpo.ref_logprobs) == {("train", 0), ("train", 1)}
        calls = []
        dpo.reference.register_forward_hook(lambda *a: calls.append(1))
        again, _ = dpo.batch_loss(pairs[::-1], [("train", 1), ("train", 0)])
    assert not calls
    torch.testing.assert_close(first, fresh)
    torch.testing.assert_close(again, first.flip(0), atol=1e-5, rtol=0)
    assert not torch.allclose(fresh, torch.full_like(fresh, math.log(2)))  # the policy did move off the reference


# A toy preference: vowel-rich answers beat consonant runs, on 24 prompts (4 held out by the split).
TOY = [Comparison(f"Say something about thing number {i}.", ["brr tsk psst grr hmm", "aeiou oui eau aia"], 1,
                  prompt_id=str(i)) for i in range(24)]  # fmt: skip
FAST = dict(policy="tiny", beta=0.5, lr=3e-3, warmup=0.0, batch_size=4, epochs=2, val_fraction=0.2, eval_every=5,
            checkpoint_every=1000, mixed_precision="no")  # fmt: skip


@pytest.mark.learning
def test_learns_a_toy_preference(tmp_path):
    """Held-out accuracy from the untrained 50 %-ish to all pairs, margins from 0 to clearly positive, the loss
    below log 2 (its value at the start, where the policy equals the reference)."""
    write_comparisons(tmp_path / "toy.jsonl", TOY)
    row = train(DPOConfig(**FAST, data=str(tmp_path / "toy.jsonl"), seed=seed(0)), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 10 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 1
    learned("held-out pair error rate (all pairs right)", 1 - row["val_accuracy"], 1e-9, upper=True)
    learned("held-out mean implicit-reward margin", row["val_margin"], 0.5)
    learned("last step's training loss", rows[-1]["loss"], 0.5, upper=True)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")  # Hugging Face format, outside wprlhf


@pytest.mark.learning
def test_resume_reproduces_uninterrupted_run(tmp_path):
    base = dict(FAST, checkpoint_every=3)
    train(DPOConfig(**base), tmp_path / "whole", comparisons=TOY, progress=False)
    # A kill right after the first checkpoint (step 3): a shorter run is not the same run (the learning-rate
    # schedule depends on the total), so the run is stopped where a kill would stop it.
    import wprlhf.methods.dpo as dpo_module

    real = dpo_module.ckpt.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    dpo_module.ckpt.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train(DPOConfig(**base), tmp_path / "split", comparisons=TOY, progress=False)
    finally:
        dpo_module.ckpt.save_checkpoint = real
    train(DPOConfig(**base), tmp_path / "split", comparisons=TOY, resume=True, progress=False)
    assert_same_runs(tmp_path / "whole", tmp_path / "split", steps=10)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(UserError, match="needs --data"):
        train(DPOConfig(policy="tiny"), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="no pair to learn from"):
        train(DPOConfig(policy="tiny"), tmp_path / "b", comparisons=[Comparison("p", ["a", "b"], 0, tie=True)])
    with pytest.raises(UserError, match="beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(UserError, match="loss must be"):
        DPOConfig(loss="hinge")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        train(DPOConfig(policy="tiny"), tmp_path / "c", comparisons=TOY, resume=True, progress=False)
