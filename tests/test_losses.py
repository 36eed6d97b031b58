"""Unit tests for the PPO phases in wprlhf.methods.ppo (rewards, advantages, losses, KL controllers), by hand.

Tiny hand-made tensors only; each expected number is a literal with the arithmetic that produced it.
"""

from __future__ import annotations

import math

import torch

from tests.helpers import close, mask_of, t
from wprlhf.core import token_kl
from wprlhf.methods.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    compute_rewards,
    normalize_scores,
    policy_loss,
    value_loss,
)

# ----------------------------------------------------------------------------------------------------------
# normalize_scores


def test_normalize_scores_by_hand():
    """scores 1, 2, 3: mean 2, sample std 1 -> -1, 0, 1; clip 0.5 -> -0.5, 0, 0.5; 'none' leaves them as given."""
    close(normalize_scores(t([1.0, 2.0, 3.0]), "batch"), [-1.0, 0.0, 1.0], atol=1e-6)
    close(normalize_scores(t([1.0, 2.0, 3.0]), "batch", clip=0.5), [-0.5, 0.0, 0.5], atol=1e-6)
    close(normalize_scores(t([1.0, 2.0, 3.0]), "none", clip=2.5), [1.0, 2.0, 2.5])
    close(normalize_scores(t([7.0, 7.0]), "batch"), [0.0, 0.0])  # equal scores: std 0, the 1e-8 keeps it finite


# ----------------------------------------------------------------------------------------------------------
# compute_rewards

SCORES = t([10.0, 20.0])
LOGPROBS = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
REF_LOGPROBS = t([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])  # row 2's last entry is a pad with a junk value
RESPONSE_MASK = mask_of([[True, True, True], [True, True, False]])


def test_compute_rewards_k1():
    """reward = -beta * (logp - ref) on each real token, + score on the last real token, exactly 0 on pads.

    beta 0.1. Row 1: k1 = [0.5, -1, 0] -> [-0.05, 0.1, 0 + 10]. Row 2 ends at t=1: k1 = [1, 0, (6 masked)]
    -> [-0.1, 0 + 20, 0].
    """
    kl = token_kl(LOGPROBS, REF_LOGPROBS, RESPONSE_MASK)
    rewards = compute_rewards(SCORES, kl, RESPONSE_MASK, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 10.0], [-0.1, 20.0, 0.0]])
    assert rewards[1, 2] == 0 and kl[1, 2] == 0  # exactly zero on the pad, not just small
    # the score is added once per row: total reward = score - beta * sum(kl)
    close(rewards.sum(1), [10.0 - 0.1 * (-0.5), 20.0 - 0.1 * 1.0])


def test_compute_rewards_k3():
    """k3 = e^d - 1 - d with d = ref - logp. Row 1: d = [-0.5, 1, 0] -> [e^-0.5 - 0.5, e - 2, 0]
    = [0.1065307, 0.7182818, 0]; row 2: d = [-1, 0] -> [e^-1 = 0.3678794, 0], pad 0."""
    kl = token_kl(LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, "k3")
    rewards = compute_rewards(SCORES, kl, RESPONSE_MASK, kl_coef=0.1)
    close(kl, [[0.1065307, 0.7182818, 0.0], [0.3678794, 0.0, 0.0]])
    close(rewards, [[-0.01065307, -0.07182818, 10.0], [-0.03678794, 20.0, 0.0]])
    assert rewards[1, 2] == 0


def test_compute_rewards_does_not_modify_inputs():
    """The score is added in place into `rewards`; that must be a new tensor, never the caller's KL."""
    kl = token_kl(LOGPROBS, REF_LOGPROBS, RESPONSE_MASK)
    before = kl.clone()
    for kl_coef in (0.0, 1.0):  # kl_coef 1: -1 * kl is still a new tensor
        compute_rewards(SCORES, kl, RESPONSE_MASK, kl_coef=kl_coef)
        assert torch.equal(kl, before)


# ----------------------------------------------------------------------------------------------------------
# compute_advantages


def test_compute_advantages_whitens_gae_and_keeps_raw_returns():
    """GAE of the core example (gamma 0.9, lam 0.5), then whitened over the 5 real tokens; returns not whitened.

    Raw advantages [1.65875, 0.575, 0.5 | 1.85, 1.0]: mean 5.58375 / 5 = 1.11675, biased variance
    1.51892375 / 5 = 0.30378475, std 0.5511667; (A - mean) / std =
    [0.9833685, -0.9829149, -1.1189899 | 1.3303597, -0.2118234]. Returns [2.15875, 1.575, 2.0 | 2.35, 2.0, 0].
    """
    rewards = t([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = t([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = mask_of([[True, True, True], [True, True, False]])
    adv, ret = compute_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[0.9833685, -0.9829149, -1.1189899], [1.3303597, -0.2118234, 0.0]])
    close(ret, [[2.15875, 1.575, 2.0], [2.35, 2.0, 0.0]])
    assert adv[1, 2] == 0 and ret[1, 2] == 0


# ----------------------------------------------------------------------------------------------------------
# policy_loss

# Ratios r = [0.5, 1.0, 1.5] in both rows; row 1 has A = +1, row 2 A = -1; the 4th column is a masked pad
# with junk (ratio e^5, advantage 1000) that would dominate the loss if it leaked in. cliprange 0.2.
RATIOS = [0.5, 1.0, 1.5, math.exp(5.0)]
OLD_LOGPROBS = t([[-1.0, -2.0, -0.3, -4.0], [-0.7, -1.1, -2.5, -4.0]])
PL_MASK = mask_of([[True, True, True, False], [True, True, True, False]])
ADVANTAGES = t([[1.0, 1.0, 1.0, 1000.0], [-1.0, -1.0, -1.0, -1000.0]])


def new_logprobs(old=OLD_LOGPROBS, ratios=RATIOS):
    """logprobs = old + ln r, so that exp(logprobs - old) = r."""
    return (old + torch.log(t(ratios))).requires_grad_(True)


def test_policy_loss_hand_values():
    """Per token loss = max(-A r, -A clip(r, 0.8, 1.2)).

    A = +1: r 0.5 -> max(-0.5, -0.8) = -0.5; r 1 -> -1; r 1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    A = -1: r 0.5 -> max(0.5, 0.8) = 0.8 (clipped); r 1 -> 1; r 1.5 -> max(1.5, 1.2) = 1.5
    sum = -2.7 + 3.3 = 0.6 over 6 real tokens -> loss 0.1; clipfrac 2/6.
    approxkl = mean of r - 1 - ln r: (2 * (ln2 - 0.5) + 0 + 2 * (0.5 - ln 1.5)) / 6 = 0.0958940.
    """
    lp = new_logprobs()
    loss, stats = policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, PL_MASK, cliprange=0.2)
    close(loss.detach(), 0.1)
    close(stats["clipfrac"], 1.0 / 3.0)
    close(stats["approxkl"], 0.0958940)


def test_policy_loss_gradient_by_hand():
    """d loss / d logprob = -A r / n where the unclipped term is chosen, 0 where the clipped one is (n = 6).

    Row 1 (A=+1): [-0.5/6, -1/6, 0 (clipped), 0 (pad)]; row 2 (A=-1): [0 (clipped), 1/6, 1.5/6, 0 (pad)].
    """
    lp = new_logprobs()
    loss, _ = policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, PL_MASK, cliprange=0.2)
    loss.backward()
    close(lp.grad, [[-0.5 / 6, -1.0 / 6, 0.0, 0.0], [0.0, 1.0 / 6, 0.25, 0.0]])


def test_policy_loss_ignores_masked_positions():
    """Changing ratio or advantage at the pad changes neither the loss nor the stats."""
    loss, stats = policy_loss(new_logprobs(), OLD_LOGPROBS, ADVANTAGES, PL_MASK, cliprange=0.2)
    other_adv = ADVANTAGES.clone()
    other_adv[:, 3] = t([-5e3, 7e3])
    other_lp = new_logprobs(ratios=[0.5, 1.0, 1.5, 1e-4])
    loss2, stats2 = policy_loss(other_lp, OLD_LOGPROBS, other_adv, PL_MASK, cliprange=0.2)
    close(loss2.detach(), float(loss.detach()))
    close(stats2["clipfrac"], float(stats["clipfrac"]))
    close(stats2["approxkl"], float(stats["approxkl"]))


def test_policy_loss_n_tokens_makes_micro_batches_add_up():
    """Micro-batches with unequal token counts, each divided by the total (5), sum to the full-batch loss.

    Row 1 real r [0.5, 1, 1.5], A=+1: losses [-0.5, -1, -1.2], sum -2.7. Row 2 only r [0.5, 1] real, A=-1:
    [0.8, 1.0], sum 1.8. Full batch: (-2.7 + 1.8) / 5 = -0.18 = -2.7/5 + 1.8/5. (A plain mean of the
    micro-batch means, -0.9 and 0.9, would give 0: the n_tokens argument is what makes them agree.)
    """
    mask = mask_of([[True, True, True, False], [True, True, False, False]])
    lp = new_logprobs()
    full, _ = policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, mask, cliprange=0.2)
    close(full.detach(), -0.18)
    full.backward()
    full_grad = lp.grad.clone()

    lp2 = new_logprobs()
    parts = [
        policy_loss(lp2[i : i + 1], OLD_LOGPROBS[i : i + 1], ADVANTAGES[i : i + 1], mask[i : i + 1], 0.2, n_tokens=5)[0]
        for i in range(2)
    ]
    close(parts[0].detach(), -2.7 / 5)
    close(parts[1].detach(), 1.8 / 5)
    close((parts[0] + parts[1]).detach(), -0.18)
    for part in parts:  # gradient accumulation: one backward per micro-batch
        part.backward()
    close(lp2.grad, full_grad.tolist())
    # without n_tokens each micro-batch is its own mean: -0.9 and 0.9
    alone = [
        policy_loss(lp2[i : i + 1], OLD_LOGPROBS[i : i + 1], ADVANTAGES[i : i + 1], mask[i : i + 1], 0.2)[0]
        for i in range(2)
    ]
    close(alone[0].detach(), -0.9)
    close(alone[1].detach(), 0.9)


# ----------------------------------------------------------------------------------------------------------
# value_loss


def test_value_loss_single_clipped_case():
    """Old value 0, new 1, return 2, cliprange 0.2: clip(1) = 0.2; 0.5 * max((1-2)^2, (0.2-2)^2) = 0.5 * 3.24."""
    v = t([[1.0]]).requires_grad_(True)
    loss, stats = value_loss(v, t([[0.0]]), t([[2.0]]), mask_of([[True]]), cliprange_value=0.2)
    close(loss.detach(), 1.62)
    close(stats["value_clipfrac"], 1.0)  # the clipped term was the larger one
    loss.backward()
    close(v.grad, [[0.0]])  # the chosen term is constant in V (clipped): no gradient


def test_value_loss_batch_hand_values():
    """Three real tokens (old 0, cliprange 0.2) and a junk pad.

    new 1, R 2:    clip 0.2, max(1, 3.24) = 3.24        (clipped term chosen)
    new 0.1, R 2:  clip 0.1, max(3.61, 3.61) = 3.61     (inside the range: equal, not counted as clipped)
    new 1, R -1:   clip 0.2, max(4, 1.44) = 4           (unclipped chosen)
    loss = 0.5 * (3.24 + 3.61 + 4) / 3 = 1.8083333; value_clipfrac 1/3.
    Gradient 0.5 * 2 (V - R) / 3 where the unclipped term is chosen: [0, -1.9/3, 2/3, 0 (pad)].
    """
    v = t([[1.0, 0.1, 1.0, 50.0]]).requires_grad_(True)
    old = t([[0.0, 0.0, 0.0, -50.0]])
    ret = t([[2.0, 2.0, -1.0, 0.0]])
    mask = mask_of([[True, True, True, False]])
    loss, stats = value_loss(v, old, ret, mask, cliprange_value=0.2)
    close(loss.detach(), 1.8083333)
    close(stats["value_clipfrac"], 1.0 / 3.0)
    loss.backward()
    close(v.grad, [[0.0, -1.9 / 3, 2.0 / 3, 0.0]])
    # n_tokens: the same sum divided by 10 instead of 3
    loss10, _ = value_loss(v, old, ret, mask, cliprange_value=0.2, n_tokens=10)
    close(loss10.detach(), 0.5425)  # 0.5 * 10.85 / 10


# ----------------------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_one_update():
    """beta 0.1, target 6, horizon 10000, 256 episodes: KL 6.6 -> e = 6.6/6 - 1 = 0.1;
    beta = 0.1 * (1 + 0.1 * 256 / 10000) = 0.1 * 1.00256 = 0.100256."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_episodes=256)
    assert math.isclose(ctl.value, 0.100256, rel_tol=0, abs_tol=1e-12)


def test_adaptive_kl_controller_error_clipped():
    """e is clipped to +-0.2: KL 12 (e = 1) -> 0.1 * (1 + 0.2 * 0.0256) = 0.100512; KL 0 or 3 (e = -1, -0.5)
    -> 0.1 * (1 - 0.2 * 0.0256) = 0.099488; KL on target -> unchanged."""
    for kl, expected in [(12.0, 0.100512), (1e9, 0.100512), (0.0, 0.099488), (3.0, 0.099488), (6.0, 0.1)]:
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, n_episodes=256)
        assert math.isclose(ctl.value, expected, rel_tol=0, abs_tol=1e-12), (kl, ctl.value)


def test_adaptive_kl_controller_updates_compound_and_state_round_trips():
    """Two updates multiply: 0.1 * 1.00512 * 1.00256 = 0.1007693...; state_dict restores the value."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    ctl.update(6.6, 256)
    assert math.isclose(ctl.value, 0.1 * 1.00512 * 1.00256, rel_tol=1e-12)  # = 0.10076907...
    other = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_fixed_kl_controller_never_changes():
    """A fixed beta ignores updates."""
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    ctl.update(0.0, 256)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
