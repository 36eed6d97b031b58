"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), k responses per prompt, no value model.

The step, top to bottom: sample k responses to each prompt and score them (`Trainer.rollout`, as PPO does); each
response's return is its score minus kl_coef times its KL to the frozen reference, the per-token penalty of
Ziegler et al. 2019 summed over the response (`core.compute_rewards`); the baseline of a response is the mean
return of the *other* k - 1 responses to its prompt (Ahmadian et al. 2024, eq. 6)

    A_i = R_i - 1/(k-1) * sum_{j != i} R_j,        R_i = score_i - kl_coef * sum_t (log pi(y_it) - log ref(y_it))

and every token of response i gets A_i in the policy-gradient loss, averaged over the minibatch's tokens (the
sequence-level REINFORCE gradient divided by the mean response length: a constant with fixed-length responses).
With ppo_epochs 1 and num_minibatches 1 (the defaults) the update is plain REINFORCE, since the ratio to the rollout
policy is 1; more epochs reuse the batch
with PPO's clipped ratio (`core.policy_loss`), as trl's RLOO does. The settings are `RLOOConfig`; the run loop,
checkpoints and processes are `onpolicy`'s, shared with PPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import compute_rewards, masked_sum, normalize_scores, policy_loss
from ..signatures import RewardFn
from .kl_control import kl_controller
from .onpolicy import Rollout, Samples, Trainer, prepare_run, run
from .onpolicy_config import KLPenaltyConfig, check_group


@dataclass
class RLOOConfig(KLPenaltyConfig):
    """Everything `wprlhf rloo` needs: the on-policy settings and the KL penalty in the reward, with RLOO's
    defaults. There is no value model: a response's baseline is its group's other returns."""

    samples_per_prompt: int = 4
    """k responses per prompt (>= 2): each one's baseline is the mean return of the other k - 1."""
    kl_coef: float = 0.05
    """Coefficient of the per-token KL penalty in the return (trl's RLOO default)."""
    adaptive_kl: bool = False
    """A fixed kl_coef, as in Ahmadian et al. 2024; True adapts it towards kl_target as PPO does."""
    ppo_epochs: int = 1
    """Passes over each batch (1: REINFORCE on fresh samples)."""
    num_minibatches: int = 1
    """Optimizer steps per pass."""

    def __post_init__(self):
        super().__post_init__()
        check_group(self, "RLOO")


# ==========================================================================================================
# The maths of a step


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages (Ahmadian et al. 2024, eq. 6): each return minus the mean of its group's others.

    returns (B,) with B = prompts * k, a prompt's k responses adjacent (as the run loop orders them).
    Returns (B,). A group's advantages sum to 0.
    """
    grouped = returns.view(-1, k)  # (B/k, k)
    others = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def learn(trainer: Trainer, rollout: Rollout) -> dict[str, float]:
    """Returns, leave-one-out advantages, the policy-gradient update and the step's stats, on a scored rollout."""
    c, kl_coef = trainer.config, trainer.kl_ctl.value
    mask = rollout.response_mask
    with torch.no_grad():
        scores = normalize_scores(rollout.scores, c.score_norm, c.score_clip)
        rewards = compute_rewards(scores, rollout.kl, mask, kl_coef)
        returns = masked_sum(rewards, mask, dim=1)  # (B,) score - kl_coef * KL
        advantages = rloo_advantages(returns, c.samples_per_prompt)  # (B,)
        token_advantages = advantages[:, None].expand_as(rewards)  # (B, Tr): one action, the whole response

    for epoch, rows in trainer.schedule():  # epochs of minibatches, the loss handed over micro-batch by micro-batch
        for micro in trainer.micro_batches(rollout, rows):
            new_logprobs, _, entropy = trainer.train_forward(rollout, micro, with_entropy=epoch == 0)
            i = micro.idx
            loss = policy_loss(new_logprobs, rollout.logprobs[i], token_advantages[i], micro.mask, c.cliprange,
                               micro.n_tokens)  # fmt: skip
            trainer.backward(micro, {"policy_loss": loss}, entropy)
        trainer.optimizer_step()
    return trainer.finish_step(rollout, returns) | trainer.update_stats()


def step(trainer: Trainer, prompts: list[str], reward_fn: RewardFn) -> tuple[dict[str, float], Samples]:
    """One RLOO step on this process's prompts (each repeated k times by the run loop)."""
    rollout, samples = trainer.rollout(prompts, reward_fn)  # 1-2. sample k responses a prompt, score them
    return learn(trainer, rollout), samples  # 3-5. returns, leave-one-out advantages, update


class RLOOTrainer(Trainer):
    """Policy, frozen reference, AdamW and the KL controller; no value model. `step_batch` as PPOTrainer's."""

    def __init__(self, config: RLOOConfig, policy: nn.Module, tokenizer):
        super().__init__(config, policy, tokenizer, kl_controller(config), with_value=False, learn=learn)


def train(config: RLOOConfig, prompts: list[str], reward_fn: RewardFn, out_dir: str | Path, policy=None,
          tokenizer=None, resume: bool = False, progress: bool = True, judge_fn: RewardFn | None = None,
          allow_changed_inputs: bool = False) -> Trainer:  # fmt: skip
    """Run `config.steps` RLOO steps into out_dir: the files `ppo.train` writes (metrics.csv, tb/, samples.jsonl,
    checkpoints/, policy/ in Hugging Face format), without value/."""
    config, policy, tokenizer = prepare_run(config, prompts, reward_fn, out_dir, resume, policy, tokenizer,
                                            allow_changed_inputs)
    return run(RLOOTrainer(config, policy, tokenizer), step, prompts, reward_fn, out_dir, resume, progress, judge_fn)
