"""Tensor maths for RLHF: log-probs, entropy, KL estimators, masked statistics, GAE, padding.

Imports torch and nothing from wprlhf. Every function that reduces takes an explicit mask; masks are bool
tensors, True on real tokens. Shapes: B = batch, T = time (response tokens), V = vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# ----------------------------------------------------------------------------------------------------------
# log-probabilities and entropy


def _scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def _entropy(scaled_logits: torch.Tensor, logz: torch.Tensor) -> torch.Tensor:
    # H = log Z - sum_i p_i * logit_i
    probs = torch.exp(scaled_logits - logz.unsqueeze(-1))
    return logz - (probs * scaled_logits).sum(-1)


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    stop_token_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the chosen tokens under softmax(logits / temperature), and that distribution's entropy.

    logits (B, T, V) or (B, V); tokens (B, T) or (B,) int64. Returns logprobs and entropy (nats, no grad; None
    unless with_entropy), each (B, T) or (B,), float32. Both share one log-normaliser pass over the vocabulary.

    stop_token_ids, min_new_tokens (with (B, T, V) logits): the sampler's floor on response length, which masks the
    stop tokens while t < min_new_tokens (`generation.sample`). The log-probs of those positions are then those of
    the distribution it drew from, softmax over the other tokens: log p(y) - log(1 - p(stops)). Log-ratios and KL
    estimates then compare what was sampled (a KL of full-vocabulary log-probs on such samples can be negative).
    The entropy stays that of the full distribution. Without a floor (the default) nothing changes.
    """
    scaled = _scale(logits, temperature)
    logz = torch.logsumexp(scaled, dim=-1)
    # gather - logsumexp avoids materialising a second (B, T, V) tensor as log_softmax would.
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logz
    if min_new_tokens > 0 and len(stop_token_ids) and scaled.dim() == 3:
        m = min(min_new_tokens, scaled.shape[1])
        stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=scaled.device)
        # log of the mass the sampler kept, log(1 - p(stops)) = logsumexp over the other tokens - log Z: (B, m).
        kept = scaled[:, :m].index_fill(-1, stops, -torch.inf).logsumexp(-1) - logz[:, :m]
        logprobs = torch.cat([logprobs[:, :m] - kept, logprobs[:, m:]], dim=1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = _entropy(scaled.detach(), logz.detach())
    return logprobs, entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each chosen token under softmax(logits / temperature). Shapes as logprobs_and_entropy."""
    return logprobs_and_entropy(logits, tokens, temperature, with_entropy=False)[0]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at each position. logits (..., V) -> (...)."""
    scaled = _scale(logits, temperature)
    return _entropy(scaled, torch.logsumexp(scaled, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020), per token, for samples from the policy


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x): unbiased for KL(p || q), can be negative per sample. (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q(x) / p(x): unbiased, always >= 0, lower variance. (B, T) -> (B, T)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


# ----------------------------------------------------------------------------------------------------------
# masked statistics: every loss and metric reduces through these


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is True. x, mask broadcastable; dim None reduces everything."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is True (0 where a row has no True entry)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all positions where mask is True (a scalar)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values for an unbiased estimate, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale x to unit variance over the masked positions; also centre it if shift_mean.

    x (B, T); mask (B, T) bool. Returns (B, T), exactly 0 where mask is False. With shift_mean=False the mean
    is kept: whitening rewards must not add a constant per token, which would reward or punish length.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def clip_around(x: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Clip x to [center - radius, center + radius], elementwise (PPO's value clipping)."""
    return torch.clamp(x, center - radius, center + radius)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[targets - predictions] / Var[targets] over masked positions; 1 is perfect, <= 0 is useless."""
    var_targets = masked_var(targets, mask, unbiased=False)
    return 1 - masked_var(targets - predictions, mask, unbiased=False) / var_targets.clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------------------
# policy-gradient pieces shared by PPO, RLOO and GRPO


def normalize_scores(scores: torch.Tensor, mode: str = "none", clip: float | None = None) -> torch.Tensor:
    """Scores as they enter the rewards: standardised over the batch ('batch') or as given ('none'), then clipped.

    scores (B,) -> (B,). 'batch' needs B >= 2 (PPOConfig refuses less): the std of one score is undefined.
    """
    if mode == "batch":
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
             estimator: str = "k1") -> torch.Tensor:  # fmt: skip
    """The per-token KL of sampled responses to the reference, exactly 0 on padding: 'k1' (Ziegler et al.'s) or 'k3'.

    logprobs, ref_logprobs (B, Tr); response_mask (B, Tr) bool, True on real tokens. Returns (B, Tr); summed over
    a response's tokens it is the KL per response, in nats."""
    kl = kl_k1(logprobs, ref_logprobs) if estimator == "k1" else kl_k3(logprobs, ref_logprobs)
    return torch.where(response_mask, kl, torch.zeros_like(kl))


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                    kl_coef: float) -> torch.Tensor:  # fmt: skip
    """Per-token reward (Ziegler et al. 2019, eq. 2): a KL penalty on each response token, plus the scalar score on
    the last one.

    scores (B,); kl (B, Tr) per-token KL, 0 on padding (`token_kl`; k1 for a reward: PPOConfig refuses k3, see its
    kl_estimator field); response_mask (B, Tr) bool, True on real tokens.
    Returns rewards (B, Tr), exactly zero where response_mask is False.
    """
    rewards = -kl_coef * kl
    last = last_true_index(response_mask)  # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def policy_loss(
    new_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    n_tokens: int | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    new_logprobs (B, T) with grad, the policy being trained; logprobs (B, T), the rollout policy's; advantages
    (B, T); mask (B, T) bool. The loss is summed over the masked tokens and divided by n_tokens (default:
    mask.sum()); passing the whole minibatch's token count makes micro-batches add up to one large batch.
    weights (B, T), when given, multiply each token's term first (GRPO's 1/|o_i|, with n_tokens the number of
    responses, makes the loss a mean over responses of each response's token mean).
    Returns loss and stats: clipfrac (share of tokens whose clipped term was chosen), approxkl (k3 of the
    rollout policy to the current one).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    log_ratio = new_logprobs - logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    losses = torch.maximum(unclipped, clipped)
    loss = masked_sum(losses if weights is None else losses * weights, mask) / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# generalised advantage estimation: the only implementation in wprlhf


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 11-16) and returns.

    rewards, values (B, T); mask (B, T) bool, True on each response's real tokens, which must be a prefix of
    the row (tokens up to and including EOS), so that a row's episode ends at its last True position.
    Returns advantages, returns (B, T), both 0 where mask is False; returns = advantages + values.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards, values = torch.where(mask, rewards, zero), torch.where(mask, values, zero)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    # Backwards in time: A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t.
    # Past a row's end the values are 0, so V_{T_end+1} = 0 (episode over) and A there stays 0.
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else zero
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = torch.where(mask, advantages, zero)
    return advantages, torch.where(mask, advantages + values, zero)


# ----------------------------------------------------------------------------------------------------------
# padding and statistics plumbing


def pad_sequences(
    sequences: Sequence[torch.Tensor], pad_value: int | float, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors of different lengths into (B, T_max), padding on `side` ('left' or 'right').

    Returns (padded, mask) with mask (B, T_max) bool, True on the original entries.

    >>> padded, mask = pad_sequences([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_value=0, side="left")
    >>> padded.tolist(), mask.tolist()
    ([[1, 2, 3], [0, 0, 4]], [[True, True, True], [False, False, True]])
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(sequences) == 0:
        raise ValueError("pad_sequences got no sequences")
    longest = max(len(s) for s in sequences)
    first = sequences[0]
    padded = torch.full((len(sequences), longest), pad_value, dtype=first.dtype, device=first.device)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool, device=first.device)
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(longest - n, longest) if side == "left" else slice(0, n)
        padded[i, cols] = seq
        mask[i, cols] = True
    return padded, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as unpadded.

    attention_mask (B, T) bool/int -> (B, T) int64; pad positions get 0 (their value is never used).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position in each row. mask (B, T) bool with >= 1 True per row -> (B,) int64."""
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(-1).values


def stack_stats(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average a list of {name: number} dicts (e.g. one per minibatch) into one dict."""
    if not stats:
        return {}
    return {key: float(sum(s[key] for s in stats) / len(stats)) for key in stats[0]}


def flatten_dict(nested: dict, sep: str = "/", prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_dict(value, sep, name))
        else:
            flat[name] = value
    return flat


def linear_schedule(step: int, total: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimizer step `step` (from 0): linear warm-up to 1, then linear decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def bootstrap_ci(values, groups, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% CI of the mean of `values` (floats or bools), resampling whole groups (prompts) with replacement:
    the stories of one prompt are not independent, so resampling single values would make the CI too narrow."""
    import numpy as np

    by_group: dict = {}
    for v, g in zip(values, groups):
        by_group.setdefault(g, []).append(float(v))
    if not by_group:
        return float("nan"), float("nan")
    sums = np.array([sum(v) for v in by_group.values()])
    counts = np.array([len(v) for v in by_group.values()], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def choice_credit(scores: torch.Tensor, best: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """How right a scorer is about each labeler's choice: 1 when the best response alone has the top score, 1/(m+1)
    when it shares the top score with m others, 0 otherwise. The mean is the accuracy.

    This is the one tie rule of every accuracy in wprlhf (reward-model training, validation, eval, baselines, the
    classifier, judge win rates): it is the expected accuracy of breaking the tie at random, so a scorer that
    cannot tell the responses apart (identical texts, a constant score) gets chance, 1/k, and not the 1 or 0
    that argmax's first-index rule gives depending on where the best response happens to sit.

    scores (N, K) float; best (N,) int64; valid (N, K) bool or None (all valid), False on padding slots.
    Returns (N,) float32 in [0, 1], on the scores' device, without grad. A NaN score is never the top one.
    """
    scores = scores.detach()
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    top = scores.masked_fill(~valid | scores.isnan(), -math.inf).max(-1, keepdim=True).values  # (N, 1)
    at_top = (scores == top) & valid  # (N, K)
    best_at_top = at_top.gather(1, best[:, None].to(scores.device)).squeeze(1)
    return best_at_top.float() / at_top.sum(-1).clamp(min=1).float()
