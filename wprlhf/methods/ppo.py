"""PPO with a per-token KL penalty to a frozen reference (Ziegler et al. 2019) and a value model (Stiennon et al. 2020).

The algorithm, top to bottom: the phases of a step (normalize_scores -> compute_rewards -> compute_advantages ->
policy_loss / value_loss -> update); `step`, one PPO step, one call per phase; `PPOTrainer`,
the trl-style API (`step(queries, responses, scores)`); and `train()`. Scores come from one callable,
`reward_fn(prompts: list[str], responses: list[str]) -> list[float]`: this module never knows who gives them.

The settings are `PPOConfig` (`onpolicy_config.py`); the KL controllers are in `kl_control.py`, and `compute_rewards`
(per-token KL penalty plus score) and `policy_loss` (the clipped surrogate), which RLOO and GRPO share, in
`core.py`; devices, processes, micro-batches, the LoRA reference, checkpoints
and the run loop are plumbing, in `onpolicy.py`; the forward passes are in `forwards.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core import (clip_around, compute_rewards, explained_variance, gae, masked_mean, masked_sum, masked_whiten,
                    normalize_scores, pad_sequences, policy_loss)
from ..errors import UserError
from ..models import position_limit
from ..signatures import RewardFn
from .kl_control import AdaptiveKLController, FixedKLController, kl_controller  # noqa: F401  (tests import them here)
from .onpolicy import Rollout, Samples, Trainer, check_scores, prepare_run, run
from .onpolicy_config import PPOConfig  # noqa: F401  (also imported from here: `from wprlhf.methods.ppo import PPOConfig, train`)

# ==========================================================================================================
# The phases of a step. Each is a function of tensors that a test can call alone.


def compute_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages, whitened over the batch's real tokens, and returns (targets of the value model).

    rewards, values (B, Tr); response_mask (B, Tr) bool. Returns advantages, returns (B, Tr), 0 on pads.
    """
    advantages, returns = gae(rewards, values, response_mask, gamma, lam)
    return masked_whiten(advantages, response_mask), returns


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
    """ppo_epochs passes over the rollout in num_minibatches minibatches, each an optimizer step on policy_loss +
    vf_coef * value_loss (PPO, eq. 9) handed to the engine micro-batch by micro-batch; `Trainer.schedule` stops
    early once a minibatch's approx-KL exceeds target_approxkl. Mean stats over the minibatches.

    advantages, returns (B, Tr): the rollout's, from `compute_advantages`."""
    c = trainer.config
    for epoch, rows in trainer.schedule():
        for networks in trainer.passes():  # policy and value model at once, or one after the other
            for micro in trainer.micro_batches(rollout, rows):
                new_logprobs, new_values, entropy = trainer.train_forward(rollout, micro, networks, epoch == 0)
                i, mask, n = micro.idx, micro.mask, micro.n_tokens
                losses = {}
                if "policy" in networks:
                    losses["policy_loss"] = policy_loss(new_logprobs, rollout.logprobs[i], advantages[i], mask,
                                                        c.cliprange, n)  # fmt: skip
                if "value" in networks:
                    losses["value_loss"] = value_loss(new_values, rollout.values[i], returns[i], mask,
                                                      c.cliprange_value, n)  # fmt: skip
                trainer.backward(micro, losses, entropy, c.vf_coef)
            trainer.optimizer_step(networks)
    return trainer.update_stats()


def learn(trainer: Trainer, rollout: Rollout) -> dict[str, float]:
    """Phases 3-6 of a step on a scored rollout: rewards, advantages, update, stats (and kl_coef adapted)."""
    c, kl_coef = trainer.config, trainer.kl_ctl.value
    with torch.no_grad():
        scores = normalize_scores(rollout.scores, c.score_norm, c.score_clip)
        rewards = compute_rewards(scores, rollout.kl, rollout.response_mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, rollout.response_mask, shift_mean=False)
        advantages, returns = compute_advantages(rewards, rollout.values, rollout.response_mask, c.gamma, c.lam)
    update_stats = update(trainer, rollout, advantages, returns)
    rlhf_rewards = masked_sum(rewards, rollout.response_mask, dim=1)  # (B,) score - kl_coef * KL
    return trainer.finish_step(rollout, rlhf_rewards) | value_stats(rollout, returns) | update_stats


def value_stats(rollout: Rollout, returns: torch.Tensor) -> dict[str, float]:
    """The value model's fit to the step's returns (B, Tr) (names in metrics.py)."""
    mask = rollout.response_mask
    return {
        "explained_variance": float(explained_variance(rollout.values, returns, mask)),
        "value_mean": float(masked_mean(rollout.values, mask)),
        "return_mean": float(masked_mean(returns, mask)),
    }


# ==========================================================================================================
# One PPO step: rollout, evaluation, optimisation


def step(trainer: Trainer, prompts: list[str], reward_fn: RewardFn) -> tuple[dict[str, float], Samples]:
    """One PPO step on this process's prompts: (stats over the global batch, this process's samples)."""
    # 1. rollout: the policy writes a response to each prompt; 2. evaluation: reward_fn scores each response;
    # + the reference's log-probs and the values of the same tokens, gathered over all processes' episodes.
    rollout, samples = trainer.rollout(prompts, reward_fn)
    return learn(trainer, rollout), samples  # 3-6. rewards, advantages, update, stats


class PPOTrainer(Trainer):
    """The models, optimizer and KL controller of a PPO run, and trl's original API: `step(queries, responses,
    scores)` for a batch you sampled and scored yourself, or `step_batch` for padded tensors."""

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer, value_model: nn.Module | None = None):
        super().__init__(config, policy, tokenizer, kl_controller(config), value_model, learn=learn)

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
    allow_changed_inputs: bool = False,
) -> PPOTrainer:
    """Run `config.steps` PPO steps; write metrics, samples, checkpoints and the final models into out_dir.

    judge_fn, when given, scores the same responses without training on them (metric `judge_mean`): where
    score_mean climbs and judge_mean does not, the policy is exploiting the reward model.

    out_dir gets: config.json, inputs.json, metrics.csv, TensorBoard events (tb/), samples.jsonl, checkpoints/ (the
    two newest, resumable) and, at the end, policy/ (and value/) in Hugging Face format.

    resume=True continues from the newest checkpoint; it refuses inputs (the prompts, a reward file or model, the
    policy) that changed since the run started, as inputs.json fingerprinted them, unless allow_changed_inputs.
    """
    config, policy, tokenizer = prepare_run(config, prompts, reward_fn, out_dir, resume, policy, tokenizer,
                                            allow_changed_inputs)
    return run(PPOTrainer(config, policy, tokenizer), step, prompts, reward_fn, out_dir, resume, progress, judge_fn)
