"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath), k responses per prompt, no value model.

The step, top to bottom: sample k responses to each prompt and score them (`Trainer.rollout`, as PPO does); a
response's advantage is its score standardised within its prompt's group (Shao et al. 2024, sec. 4.1.2, outcome
supervision), given to every one of its tokens

    A_i = (r_i - mean(r_1..r_k)) / (std(r_1..r_k) + eps)          (std: the sample standard deviation, as trl)

and the loss is PPO's clipped surrogate plus the KL to the frozen reference as a loss term, not a reward penalty,
with the k3 estimator (Shao et al. 2024, eq. 3 and 4), each response's tokens averaged, then the responses:

    L = 1/G sum_i 1/|o_i| sum_t [ -min(ratio_it A_i, clip(ratio_it, 1 +- cliprange) A_i) + kl_coef * k3_it ],
    k3_it = ref(o_it) / pi(o_it) - log(ref(o_it) / pi(o_it)) - 1.

On samples of pi, k3 = r - 1 - log r with r = ref / pi estimates KL(pi || ref) without bias (Schulman 2020); as a
loss, differentiated through pi(o_it), its expected gradient is sum_o (pi - ref) grad log pi = grad KL(ref || pi),
which also vanishes only at pi = ref: a pull back to the reference. (As a reward, as PPO's and RLOO's penalty would
use it, k3's score-function gradient is grad KL(pi || ref) - grad KL(ref || pi), with no pull back: they refuse it.)
The 1/|o_i| weighs a short response's tokens more (Liu et al. 2025 call it a length bias); with fixed-length
responses (min_response_length = response_length) it is a constant. The settings are `GRPOConfig`; the run loop,
checkpoints and processes are `onpolicy`'s, shared with PPO and RLOO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import kl_k3, masked_mean, masked_sum, normalize_scores, policy_loss
from ..errors import UserError
from ..signatures import RewardFn
from .kl_control import kl_controller
from .onpolicy import Rollout, Samples, Trainer, prepare_run, run
from .onpolicy_config import OnPolicyConfig, check_group


@dataclass
class GRPOConfig(OnPolicyConfig):
    """Everything `wprlhf grpo` needs: the on-policy settings with GRPO's defaults. There is no value model, the
    group standardises the scores, and the KL to the reference is a k3 loss term, not a penalty in the reward."""

    samples_per_prompt: int = 4
    """k responses per prompt (>= 2): the group whose mean and std standardise each score (the paper's G = 64)."""
    kl_coef: float = 0.04
    """Weight of the k3 KL term in the loss (the paper's beta, 0.04)."""
    adaptive_kl: bool = False
    """A fixed kl_coef, as in the paper; True adapts it towards kl_target as PPO does."""
    ppo_epochs: int = 1
    """Passes over each batch (the paper: 1 update per sampling)."""
    num_minibatches: int = 1
    """Optimizer steps per pass."""
    eps: float = 1e-4
    """Added to a group's std: a group whose k scores are equal gets advantages 0, not 0/0."""

    def __post_init__(self):
        super().__post_init__()
        check_group(self, "GRPO")
        if not self.eps > 0:
            raise UserError(f"eps must be > 0, got {self.eps}; set --eps")


# ==========================================================================================================
# The maths of a step


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-standardised advantages (Shao et al. 2024, sec. 4.1.2): (r - group mean) / (group sample std + eps).

    scores (B,) with B = prompts * k, a prompt's k responses adjacent. Returns (B,).
    """
    grouped = scores.view(-1, k)  # (B/k, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).reshape(-1)


def grpo_loss(new_logprobs: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, cliprange: float, kl_coef: float,
              n_responses: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """GRPO's loss (Shao et al. 2024, eq. 3): clipped surrogate + kl_coef * k3 KL to the reference, each response's
    tokens averaged, then summed over responses and divided by n_responses (default: B; the whole minibatch's
    count makes micro-batches add up).

    new_logprobs (B, T) with grad; logprobs (B, T), the rollout policy's; ref_logprobs (B, T), the reference's;
    advantages (B,); mask (B, T) bool. Returns loss and stats (policy_loss's, and kl_term: the mean k3 per token).
    The k3 term's value estimates KL(pi || ref) (k3 = r - 1 - log r, r = ref / pi, on samples of pi); its gradient
    through new_logprobs is, in expectation, grad KL(ref || pi): both vanish only at pi = ref.
    """
    n_responses = mask.shape[0] if n_responses is None else n_responses
    weights = 1.0 / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1): 1/|o_i|
    token_advantages = advantages[:, None].expand_as(new_logprobs)  # (B, T)
    surrogate, stats = policy_loss(new_logprobs, logprobs, token_advantages, mask, cliprange, n_responses, weights)
    # k3 of pi to the reference, with the gradient through pi: (ref/pi) - log(ref/pi) - 1 (eq. 4).
    k3 = kl_k3(new_logprobs, ref_logprobs)
    kl_term = masked_sum(k3 * weights, mask) / n_responses
    stats["kl_term"] = masked_mean(k3.detach(), mask)
    return surrogate + kl_coef * kl_term, stats


def learn(trainer: Trainer, rollout: Rollout) -> dict[str, float]:
    """Group-standardised advantages, the update on GRPO's loss and the step's stats, on a scored rollout."""
    c, kl_coef = trainer.config, trainer.kl_ctl.value
    mask = rollout.response_mask
    with torch.no_grad():
        scores = normalize_scores(rollout.scores, "none", c.score_clip)  # the group standardises them below
        advantages = grpo_advantages(scores, c.samples_per_prompt, c.eps)  # (B,)

    for epoch, rows in trainer.schedule():  # epochs of minibatches, the loss handed over micro-batch by micro-batch
        for micro in trainer.micro_batches(rollout, rows):
            new_logprobs, _, entropy = trainer.train_forward(rollout, micro, with_entropy=epoch == 0)
            i = micro.idx
            # Responses, not tokens, are GRPO's unit: divide by the minibatch's response count. Its policy_loss
            # includes the KL term.
            loss = grpo_loss(new_logprobs, rollout.logprobs[i], rollout.ref_logprobs[i], advantages[i], mask[i],
                             c.cliprange, kl_coef, c.minibatch_size)  # fmt: skip
            trainer.backward(micro, {"policy_loss": loss}, entropy)
        trainer.optimizer_step()
    return trainer.finish_step(rollout) | trainer.update_stats()  # rlhf reward: score - kl_coef * KL, what the loss trades


def step(trainer: Trainer, prompts: list[str], reward_fn: RewardFn) -> tuple[dict[str, float], Samples]:
    """One GRPO step on this process's prompts (each repeated k times by the run loop)."""
    rollout, samples = trainer.rollout(prompts, reward_fn)  # 1-2. sample k responses a prompt, score them
    return learn(trainer, rollout), samples  # 3-4. group advantages, update


class GRPOTrainer(Trainer):
    """Policy, frozen reference, AdamW and the KL controller; no value model. `step_batch` as PPOTrainer's."""

    def __init__(self, config: GRPOConfig, policy: nn.Module, tokenizer):
        super().__init__(config, policy, tokenizer, kl_controller(config), with_value=False, learn=learn)


def train(config: GRPOConfig, prompts: list[str], reward_fn: RewardFn, out_dir: str | Path, policy=None,
          tokenizer=None, resume: bool = False, progress: bool = True, judge_fn: RewardFn | None = None,
          allow_changed_inputs: bool = False) -> Trainer:  # fmt: skip
    """Run `config.steps` GRPO steps into out_dir: the files `ppo.train` writes, without value/."""
    config, policy, tokenizer = prepare_run(config, prompts, reward_fn, out_dir, resume, policy, tokenizer,
                                            allow_changed_inputs)
    return run(GRPOTrainer(config, policy, tokenizer), step, prompts, reward_fn, out_dir, resume, progress, judge_fn)
