"""Unit tests for wprlhf.core against values worked out by hand on tiny tensors (no models, a second or two).

Every expected number is a literal with the arithmetic that produced it; where a reference is computed in the
test it is a slow, obvious formulation that differs from the one in the library.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import close, mask_of, t
from wprlhf.core import (
    clip_around,
    entropy_from_logits,
    explained_variance,
    flatten_dict,
    gae,
    kl_k1,
    kl_k3,
    last_true_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pad_sequences,
    position_ids_from_mask,
    stack_stats,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------
# log-probabilities and entropy


def test_logprobs_from_logits_hand_values_with_temperature():
    """With T=2, logits [2 ln 3, 0, 0] become [ln 3, 0, 0]: softmax = [3/5, 1/5, 1/5]."""
    logits = t([[2 * math.log(3.0), 0.0, 0.0]])  # (B=1, V=3)
    lp0 = logprobs_from_logits(logits, torch.tensor([0]), temperature=2.0)
    lp1 = logprobs_from_logits(logits, torch.tensor([1]), temperature=2.0)
    close(lp0, [-0.5108256])  # ln 0.6
    close(lp1, [-1.6094379])  # ln 0.2
    # At T=1 the same logits give softmax [9/11, 1/11, 1/11]: ln(9/11) = -0.2006707
    close(logprobs_from_logits(logits, torch.tensor([0])), [-0.2006707])
    assert lp0.dtype == torch.float32  # documented: float32 out whatever the input dtype


def test_logprobs_from_logits_matches_log_softmax_gather():
    """(B, T, V) path equals log_softmax(logits / T) gathered at the tokens, for T = 0.7."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g) * 3
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    expected = torch.empty(2, 3)
    for b in range(2):  # slow reference: one position at a time
        for i in range(3):
            expected[b, i] = torch.log_softmax(logits[b, i] / 0.7, dim=-1)[tokens[b, i]]
    got = logprobs_from_logits(logits, tokens, temperature=0.7)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_entropy_uniform_is_log_v_and_peaked_is_zero():
    """Uniform logits give H = ln V at any temperature; a near one-hot distribution gives H ~ 0."""
    uniform = torch.full((2, 5), 3.7)
    # float32 maths (log Z ~ 5.3 minus sum p*logit ~ 3.7): allow float32 rounding
    close(entropy_from_logits(uniform), [1.6094379] * 2, atol=1e-5)  # ln 5
    close(entropy_from_logits(uniform, temperature=0.3), [1.6094379] * 2, atol=1e-5)
    peaked = t([[100.0, 0.0, 0.0, 0.0]])
    # H = 3 * e^-100 * 100 + (tiny) ~ 1e-41
    close(entropy_from_logits(peaked), [0.0], atol=1e-6)


def test_entropy_hand_value_and_temperature():
    """p = [0.6, 0.2, 0.2]: H = -(0.6 ln 0.6 + 0.4 ln 0.2) = 0.9502705 (logits [ln 3, 0, 0] or [2 ln 3, 0, 0] at T=2)."""
    close(entropy_from_logits(t([math.log(3.0), 0.0, 0.0])), 0.9502705)
    close(entropy_from_logits(t([2 * math.log(3.0), 0.0, 0.0]), temperature=2.0), 0.9502705)


# ----------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_expectations_equal_exact_kl():
    """p = [1/2, 1/4, 1/4], q = [1/4, 1/2, 1/4]: KL(p||q) = 1/2 ln2 + 1/4 ln(1/2) + 0 = ln2 / 4.

    Both estimators, averaged under p (sum_x p(x) k(x)), give exactly that.
    """
    p, q = t([0.5, 0.25, 0.25]), t([0.25, 0.5, 0.25])
    k1 = kl_k1(p.log(), q.log())
    k3 = kl_k3(p.log(), q.log())
    close(k1, [LN2, -LN2, 0.0])  # log p - log q
    # r = q/p = [1/2, 2, 1]; k3 = (r - 1) - ln r = [-1/2 + ln2, 1 - ln2, 0]
    close(k3, [0.1931472, 0.3068528, 0.0])
    exact = 0.1732868  # ln2 / 4
    close((p * k1).sum(), exact)
    close((p * k3).sum(), exact)  # 1/2 (ln2 - 1/2) + 1/4 (1 - ln2) = ln2/4


def test_kl_k3_nonnegative_and_zero_when_equal():
    """k3 >= 0 for any pair of log-probs (x - 1 - ln x >= 0), and 0 iff they are equal; k1 can be negative."""
    lp = torch.linspace(-8, 0, 41, dtype=torch.float64)
    ref_lp, pol_lp = torch.meshgrid(lp, lp, indexing="ij")
    k3 = kl_k3(pol_lp, ref_lp)
    assert (k3 >= 0).all()
    assert (k3[~torch.eye(41, dtype=torch.bool)] > 0).all()
    close(torch.diagonal(k3), [0.0] * 41)
    assert (kl_k1(pol_lp, ref_lp) < 0).any()


# ----------------------------------------------------------------------------------------------------------
# masked statistics


X = t([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])  # last column is padding with junk values
M = mask_of([[True, True, False], [True, True, False]])


def test_masked_sum_and_mean():
    """Real values 1, 2, 3, 4: sum 10, mean 2.5; per row: sums [3, 7], means [1.5, 3.5]; empty row -> 0."""
    close(masked_sum(X, M), 10.0)
    close(masked_mean(X, M), 2.5)
    close(masked_sum(X, M, dim=1), [3.0, 7.0])
    close(masked_mean(X, M, dim=1), [1.5, 3.5])
    close(masked_mean(X, M, dim=0), [2.0, 3.0, 0.0])  # column 2 has no real entry: 0, not nan
    close(masked_mean(X, torch.zeros_like(M)), 0.0)


def test_masked_var_hand_values():
    """Deviations from 2.5 are +-1.5, +-0.5: sum of squares 5; biased var 5/4, unbiased 5/3."""
    close(masked_var(X, M, unbiased=False), 1.25)
    close(masked_var(X, M), 5.0 / 3.0)
    with pytest.raises(ValueError):
        masked_var(X, mask_of([[True, False, False], [False, False, False]]))  # one value: no unbiased var


def test_masked_whiten_hand_values_and_pads_ignored():
    """(x - 2.5) / sqrt(1.25) on real tokens: [-1.3416408, -0.4472136, 0.4472136, 1.3416408]; 0 at pads."""
    expected = [[-1.3416408, -0.4472136, 0.0], [0.4472136, 1.3416408, 0.0]]
    close(masked_whiten(X, M), expected)
    # Changing what sits at the pads changes nothing.
    other = X.clone()
    other[:, 2] = t([-1e6, 7e5])
    close(masked_whiten(other, M), expected)
    # The whitened real values have mean 0 and (biased) variance 1.
    w = masked_whiten(X, M)
    close(masked_mean(w, M), 0.0)
    close(masked_var(w, M, unbiased=False), 1.0, atol=1e-6)


def test_masked_whiten_shift_mean_false_keeps_mean():
    """shift_mean=False: (x - 2.5)/sqrt(1.25) + 2.5, so the masked mean stays 2.5 and the spread becomes 1."""
    w = masked_whiten(X, M, shift_mean=False)
    close(w, [[1.1583592, 2.0527864, 0.0], [2.9472136, 3.8416408, 0.0]])
    close(masked_mean(w, M), 2.5)
    close(masked_var(w, M, unbiased=False), 1.0, atol=1e-6)


def test_clip_around():
    """Clip to [c - 0.2, c + 0.2] elementwise: centres differ per element."""
    x = t([0.5, 1.0, -1.0, 0.1])
    c = t([0.0, 1.1, 0.0, 0.0])
    close(clip_around(x, c, 0.2), [0.2, 1.0, -0.2, 0.1])


def test_explained_variance_hand_values():
    """targets [1, 2, 3, 4] (var 1.25): perfect -> 1; constant mean -> 0; [1, 2, 3, 5] -> 1 - 0.1875/1.25 = 0.85."""
    targets = t([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = mask_of([[True, True, True, True, False]])
    close(explained_variance(targets, targets, mask), 1.0)
    close(explained_variance(torch.full_like(targets, 2.5), targets, mask), 0.0)
    # residuals [0, 0, 0, -1]: mean -1/4, var = (3 * 1/16 + 9/16) / 4 = 0.1875; the pad (-99 vs 50) is ignored
    close(explained_variance(t([[1.0, 2.0, 3.0, 5.0, -99.0]]), targets, mask), 0.85)


# ----------------------------------------------------------------------------------------------------------
# GAE


def test_gae_three_steps_by_hand():
    """gamma 0.9, lam 0.5 (gamma*lam = 0.45), r = [1, 0, 2], V = [0.5, 1.0, 1.5], episode ends after t=2.

    delta_2 = 2 + 0.9*0 - 1.5 = 0.5; delta_1 = 0 + 0.9*1.5 - 1 = 0.35; delta_0 = 1 + 0.9*1 - 0.5 = 1.4
    A_2 = 0.5; A_1 = 0.35 + 0.45*0.5 = 0.575; A_0 = 1.4 + 0.45*0.575 = 1.65875
    returns = A + V = [2.15875, 1.575, 2.0]
    """
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), mask_of([[True] * 3]), gamma=0.9, lam=0.5)
    close(adv, [[1.65875, 0.575, 0.5]])
    close(ret, [[2.15875, 1.575, 2.0]])


def test_gae_batch_with_early_end():
    """Row 2 ends after t=1: its t=1 bootstraps from 0 (not the junk value 7 at the pad) and pads give 0.

    Row 2, r = [1, 2, (99)], V = [0.5, 1.0, (7.0)]:
    delta_1 = 2 + 0.9*0 - 1 = 1.0; delta_0 = 1 + 0.9*1 - 0.5 = 1.4; A_1 = 1.0; A_0 = 1.4 + 0.45*1 = 1.85
    returns = [1.85 + 0.5, 1.0 + 1.0, 0] = [2.35, 2.0, 0]. Row 1 is the 3-step example above.
    """
    rewards = t([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = t([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = mask_of([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[1.65875, 0.575, 0.5], [1.85, 1.0, 0.0]])
    close(ret, [[2.15875, 1.575, 2.0], [2.35, 2.0, 0.0]])
    assert adv[1, 2] == 0 and ret[1, 2] == 0  # exactly zero on the pad
    # returns = advantages + values on real tokens
    close(torch.where(mask, adv + values, torch.zeros(())), ret)


def test_gae_limits_lambda_one_and_zero():
    """lam=1, gamma=1: A_t = (sum of rewards from t) - V_t = [3-0.5, 2-1, 2-1.5]; lam=0: A_t = delta_t."""
    r, v, m = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), mask_of([[True] * 3])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[2.5, 1.0, 0.5]])
    close(ret, [[3.0, 2.0, 2.0]])  # Monte Carlo returns
    adv0, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    close(adv0, [[1.4, 0.35, 0.5]])  # the deltas worked out in test_gae_three_steps_by_hand


def test_gae_matches_explicit_sum_formula():
    """A_t = sum_l (gamma lam)^l delta_{t+l} (eq. 16, a double loop), on random rows of different lengths."""
    g = torch.Generator().manual_seed(1)
    B, T, gamma, lam = 3, 6, 0.95, 0.8
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.arange(T).expand(B, T) < torch.tensor(lengths)[:, None]
    expected = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        v = [float(values[b, i]) for i in range(n)] + [0.0]  # V after the episode's end is 0
        deltas = [float(rewards[b, i]) + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            expected[b, i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, 0.0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# padding and plumbing


def test_pad_sequences_left_and_right():
    """[1, 2, 3] and [4] padded with 0 on either side, with masks True on the original entries."""
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    padded, mask = pad_sequences(seqs, pad_value=0, side="left")
    assert padded.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    padded, mask = pad_sequences(seqs, pad_value=0, side="right")
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert padded.dtype == torch.int64 and mask.dtype == torch.bool
    # float values and a non-zero pad value
    padded, mask = pad_sequences([t([0.5]), t([1.5, 2.5])], pad_value=-1.0)
    assert padded.tolist() == [[0.5, -1.0], [1.5, 2.5]]
    assert mask.tolist() == [[True, False], [True, True]]


def test_pad_sequences_errors():
    """A bad side or an empty list is refused."""
    with pytest.raises(ValueError):
        pad_sequences([torch.tensor([1])], pad_value=0, side="middle")
    with pytest.raises(ValueError):
        pad_sequences([], pad_value=0)


def test_position_ids_from_mask():
    """A left-padded row's real tokens get 0, 1, 2, the same as the unpadded row; bool and int masks agree."""
    mask = mask_of([[False, False, True, True, True], [True, True, True, True, True]])
    pos = position_ids_from_mask(mask)
    assert pos.dtype == torch.int64
    assert pos[0, 2:].tolist() == [0, 1, 2]
    assert pos[1].tolist() == [0, 1, 2, 3, 4]
    assert position_ids_from_mask(mask.long()).tolist() == pos.tolist()
    assert pos[0, :2].tolist() == [0, 0]  # pads: clamped to 0 (documented)


def test_last_true_index():
    """Right-padded, full, single-token and left-padded rows."""
    mask = mask_of(
        [[True, True, False, False], [True, True, True, True], [True, False, False, False], [False, False, True, True]]
    )
    assert last_true_index(mask).tolist() == [1, 3, 0, 3]


def test_stack_stats():
    """Key-wise average: a = (1+3)/2 = 2, b = (2+6)/2 = 4; empty list -> {}."""
    assert stack_stats([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 6.0}]) == {"a": 2.0, "b": 4.0}
    assert stack_stats([]) == {}


def test_flatten_dict():
    """Nested keys joined with the separator, at any depth."""
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten_dict(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert flatten_dict(nested, sep=".") == {"a.b": 1, "a.c.d": 2, "e": 3}
