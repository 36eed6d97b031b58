"""PPO with a per-token KL penalty to a frozen reference (Ziegler et al. 2019) and a value model (Stiennon et al. 2020).

The algorithm, top to bottom: the KL controllers; the phases of a step (normalize_scores -> compute_rewards ->
compute_advantages -> policy_loss / value_loss -> update); `step`, one PPO step, one call per phase; `PPOTrainer`,
the trl-style API (`step(queries, responses, scores)`); and `train()`. Scores come from one callable,
`reward_fn(prompts: list[str], responses: list[str]) -> list[float]`: this module never knows who gives them.

The settings are `PPOConfig` (`ppo_config.py`); devices, processes, micro-batches, the LoRA reference, checkpoints
and the run loop are plumbing, in `ppo_trainer.py`; the forward passes are in `forwards.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .core import (clip_around, explained_variance, gae, kl_k1, kl_k3, last_true_index, masked_mean, masked_sum,
                   masked_whiten, pad_sequences)  # fmt: skip
from .errors import UserError
from .models import load_policy, position_limit
from .ppo_config import PPOConfig  # noqa: F401  (also imported from here: `from wprlhf.ppo import PPOConfig, train`)
from .ppo_trainer import Rollout, Samples, Trainer, check_scores, keep_saved_precision, run
from .signatures import RewardFn

# ==========================================================================================================
# KL controllers: an object with `value` and `update(kl, n_episodes)`


class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, eq. 2 (their beta is our kl_coef): e = clip(KL / target - 1, -0.2, 0.2);
    kl_coef <- kl_coef (1 + e * n / horizon)."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_episodes / self.horizon


# ==========================================================================================================
# The phases of a step. Each is a function of tensors that a test can call alone.


def normalize_scores(scores: torch.Tensor, mode: str = "none", clip: float | None = None) -> torch.Tensor:
    """Scores as they enter the rewards: standardised over the batch ('batch') or as given ('none'), then clipped.

    scores (B,) -> (B,). 'batch' needs B >= 2 (PPOConfig refuses less): the std of one score is undefined.
    """
    if mode == "batch":
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: a KL penalty on each response token, plus the scalar score on the last one.

    scores (B,); logprobs, ref_logprobs (B, Tr); response_mask (B, Tr) bool, True on real tokens.
    Returns rewards (B, Tr), exactly zero where response_mask is False, and the per-token KL (B, Tr).
    """
    kl = kl_k1(logprobs, ref_logprobs) if kl_estimator == "k1" else kl_k3(logprobs, ref_logprobs)
    kl = torch.where(response_mask, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    last = last_true_index(response_mask)  # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages, whitened over the batch's real tokens, and returns (targets of the value model).

    rewards, values (B, Tr); response_mask (B, Tr) bool. Returns advantages, returns (B, Tr), 0 on pads.
    """
    advantages, returns = gae(rewards, values, response_mask, gamma, lam)
    return masked_whiten(advantages, response_mask), returns


def policy_loss(
    new_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    n_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    new_logprobs (B, T) with grad, the policy being trained; logprobs (B, T), the rollout policy's; advantages
    (B, T); mask (B, T) bool. The loss is summed over the masked tokens and divided by n_tokens (default:
    mask.sum()); passing the whole minibatch's token count makes micro-batches add up to one large batch.
    Returns loss and stats: clipfrac (share of tokens whose clipped term was chosen), approxkl (k3 of the
    rollout policy to the current one).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    log_ratio = new_logprobs - logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_sum(torch.maximum(unclipped, clipped), mask) / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    new_values: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    n_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_rollout +- c) - R)^2), summed / n_tokens.

    new_values (B, T) with grad; values (the rollout's estimates), returns (B, T); mask (B, T) bool.
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    clipped = clip_around(new_values, values, cliprange_value)
    losses = torch.maximum((new_values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * masked_sum(losses, mask) / n_tokens
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean(((new_values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)}
    return loss, stats


def update(trainer: Trainer, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
    """ppo_epochs passes over the rollout, each num_minibatches optimizer steps on policy_loss + vf_coef *
    value_loss (PPO, eq. 9); stops early once a minibatch's approx-KL exceeds target_approxkl. Mean stats."""
    c = trainer.config

    def policy_objective(new_logprobs, rows, n_tokens):
        mask = rollout.response_mask[rows]
        return policy_loss(new_logprobs, rollout.logprobs[rows], advantages[rows], mask, c.cliprange, n_tokens)

    def value_objective(new_values, rows, n_tokens):
        mask = rollout.response_mask[rows]
        return value_loss(new_values, rollout.values[rows], returns[rows], mask, c.cliprange_value, n_tokens)

    stats = []
    for epoch in range(c.ppo_epochs):
        for rows in trainer.minibatches():
            # Entropy is read on the first epoch only: it is a statistic, and costly over the vocabulary.
            stats.append(trainer.optimize(rollout, rows, policy_objective, value_objective, c.vf_coef, epoch == 0))
            if c.target_approxkl is not None and stats[-1]["approxkl"] > c.target_approxkl:
                return mean_stats(stats)  # the policy moved too far from the rollout policy: the samples are stale
    return mean_stats(stats)


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the minibatches that measured it (entropy: the first epoch's), and their count."""
    keys = dict.fromkeys(k for row in rows for k in row)  # in the order the minibatches logged them
    out = {k: sum(row[k] for row in rows if k in row) / sum(k in row for row in rows) for k in keys}
    return {**out, "ppo_minibatches": len(rows)}


def learn(trainer: Trainer, rollout: Rollout) -> dict[str, float]:
    """Phases 3-6 of a step on a scored rollout: rewards, advantages, update, stats (and kl_coef adapted)."""
    c, kl_coef = trainer.config, trainer.kl_ctl.value
    with torch.no_grad():
        scores = normalize_scores(rollout.scores, c.score_norm, c.score_clip)
        rewards, _ = compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, kl_coef,
                                     c.kl_estimator)  # fmt: skip
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, rollout.response_mask, shift_mean=False)
        advantages, returns = compute_advantages(rewards, rollout.values, rollout.response_mask, c.gamma, c.lam)
    update_stats = update(trainer, rollout, advantages, returns)
    # KL in nats per response, as Ziegler et al.'s controller (eq. 2) measures it: k1 summed over the tokens.
    kl = masked_sum(kl_k1(rollout.logprobs, rollout.ref_logprobs), rollout.response_mask, dim=1)  # (B,)
    trainer.kl_ctl.update(float(kl.mean()), len(rollout))
    trainer.end_step(len(rollout))
    rlhf_rewards = masked_sum(rewards, rollout.response_mask, dim=1)  # (B,) score - kl_coef * KL, per response
    trainer.last_episodes = {"kl": kl.tolist(), "rlhf_reward": rlhf_rewards.tolist()}
    return step_stats(trainer, rollout, kl, rlhf_rewards, returns, kl_coef) | update_stats


def step_stats(trainer, rollout: Rollout, kl, rlhf_rewards, returns, kl_coef: float) -> dict[str, float]:
    """The step's metrics (names in metrics.py): scores as reward_fn gave them, KL per response, value fit."""
    mask, B = rollout.response_mask, len(rollout)
    return {
        "score_mean": float(rollout.scores.mean()),
        "score_std": float(rollout.scores.std()) if B > 1 else 0.0,
        "rlhf_reward_mean": float(rlhf_rewards.mean()),
        "kl": float(kl.mean()),
        "kl_k3": float(masked_sum(kl_k3(rollout.logprobs, rollout.ref_logprobs), mask, dim=1).mean()),
        "kl_coef": kl_coef,
        "explained_variance": float(explained_variance(rollout.values, returns, mask)),
        "value_mean": float(masked_mean(rollout.values, mask)),
        "return_mean": float(masked_mean(returns, mask)),
        "response_length": float(mask.sum(1).float().mean()),
        "lr": trainer.optimizer.param_groups[0]["lr"],
    }


# ==========================================================================================================
# One PPO step: rollout, evaluation, optimisation


def step(trainer: Trainer, prompts: list[str], reward_fn: RewardFn) -> tuple[dict[str, float], Samples]:
    """One PPO step on this process's prompts: (stats over the global batch, this process's samples)."""
    samples = trainer.generate(prompts)  # 1. rollout: the policy writes a response to each prompt
    samples.scores = trainer.score(samples, reward_fn)  # 2. evaluation: reward_fn scores each response
    gen = samples.generation  # + the reference's log-probs and the values of the same tokens, all processes' episodes
    # The sampler's log-probs save a policy forward in fp32. Under bf16/fp16 its KV-cached steps round otherwise than
    # a training forward would: recompute them there, so the first minibatch's ratio is exactly 1.
    logprobs = gen.logprobs if trainer.config.mixed_precision == "no" else None
    rollout = trainer.forward_rollout(samples.queries, samples.query_mask, gen.responses, gen.response_mask,
                                      samples.scores, logprobs)  # fmt: skip
    return learn(trainer, rollout), samples  # 3-6. rewards, advantages, update, stats


class PPOTrainer(Trainer):
    """The models, optimizer and KL controller of a PPO run, and trl's original API: `step(queries, responses,
    scores)` for a batch you sampled and scored yourself, or `step_batch` for padded tensors."""

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer, value_model: nn.Module | None = None):
        if config.adaptive_kl:
            kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        else:
            kl_ctl = FixedKLController(config.kl_coef)
        super().__init__(config, policy, tokenizer, kl_ctl, value_model)

    def step(self, queries, responses, scores) -> dict[str, float]:
        """One PPO update from token lists: queries and responses are 1-D tensors of different lengths; scores
        one finite number per response. Pads them (queries left, responses right), computes the rollout log-probs
        with a forward pass, then updates as `step_batch` does. UserError for mismatched, empty or unreadable input."""
        if len(queries) != len(responses):
            raise UserError(f"PPOTrainer.step got {len(queries)} queries and {len(responses)} responses; "
                            "give one response per query")  # fmt: skip
        scores_t = check_scores(scores, len(responses), "PPOTrainer.step's scores")
        queries, responses = [torch.as_tensor(x) for x in queries], [torch.as_tensor(x) for x in responses]
        for name, seqs in (("query", queries), ("response", responses)):
            if bad := [i for i, x in enumerate(seqs) if x.dim() != 1 or len(x) == 0]:
                raise UserError(f"PPOTrainer.step: {name} {bad[0]} is not a non-empty 1-D tensor of token ids (an "
                                "empty answer is its end-of-turn token, which the score is attached to)")  # fmt: skip
        limit = position_limit(self.policy)
        if limit is not None and (long := [i for i, (q, r) in enumerate(zip(queries, responses)) if len(q) + len(r) > limit]):
            raise UserError(f"PPOTrainer.step: query + response {long[0]} is longer than the policy's {limit} "
                            "positions; clip the query from the left")  # fmt: skip
        pad, device = self.tokenizer.pad_token_id, self.device
        (q, q_mask), (r, r_mask) = pad_sequences(queries, pad, side="left"), pad_sequences(responses, pad, side="right")
        rollout = self.forward_rollout(q.to(device), q_mask.to(device), r.to(device), r_mask.to(device), scores_t)
        return learn(self, rollout)

    def step_batch(self, queries, query_mask, responses, response_mask, scores, logprobs=None) -> dict[str, float]:
        """One PPO update on a rollout batch (this process's shard of it under `accelerate launch`).

        queries (b, Tq) left-padded, query_mask (b, Tq); responses (b, Tr), response_mask (b, Tr) bool;
        scores (b,) float; logprobs (b, Tr): the rollout policy's log-probs (None = computed here);
        b = batch_size / processes. Returns a dict of float stats over the global batch (metrics.py's names).
        """
        scores = check_scores(scores, queries.shape[0], "step_batch's scores")
        return learn(self, self.forward_rollout(queries, query_mask, responses, response_mask, scores, logprobs))


def train(
    config: PPOConfig,
    prompts: list[str],
    reward_fn: RewardFn,
    out_dir: str | Path,
    policy: nn.Module | None = None,
    tokenizer=None,
    resume: bool = False,
    progress: bool = True,
    judge_fn: RewardFn | None = None,
) -> PPOTrainer:
    """Run `config.steps` PPO steps; write metrics, samples, checkpoints and the final models into out_dir.

    judge_fn, when given, scores the same responses without training on them (metric `judge_mean`): where
    score_mean climbs and judge_mean does not, the policy is exploiting the reward model.

    out_dir gets: config.json, metrics.csv, TensorBoard events (tb/), samples.jsonl, checkpoints/ (the two
    newest, resumable) and, at the end, policy/ (and value/) in Hugging Face format.
    """
    if not prompts:
        raise UserError("the prompt set is empty: give --prompts a file with at least one prompt")
    if resume:
        config = keep_saved_precision(config, out_dir)
    if policy is None:
        policy, tokenizer = load_policy(config.policy, seed=config.seed)
    torch.manual_seed(config.seed)
    trainer = PPOTrainer(config, policy, tokenizer)
    return run(trainer, step, prompts, reward_fn, out_dir, resume, progress, judge_fn)
