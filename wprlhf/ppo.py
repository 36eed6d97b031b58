"""PPO with a per-token KL penalty to a frozen reference (Ziegler et al. 2019) and a value model (Stiennon et al. 2020).

Read top to bottom: the config, the KL controllers, the algorithm (policy_forward / value_forward -> compute_rewards ->
compute_advantages -> policy_loss / value_loss), then `PPOTrainer`, which holds the models and runs one step
(`step_batch` -> `update`), and `train()`, the plumbing around it (prompts, reward_fn, metrics, checkpoints,
resume). Scores come from one callable,
`reward_fn(prompts: list[str], responses: list[str]) -> list[float]`: this module never knows who gives them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .core import (
    clip_around,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    last_true_index,
    logprobs_and_entropy,
    masked_mean,
    masked_sum,
    masked_whiten,
    pad_sequences,
    position_ids_from_mask,
)
from .distributed import check_divisible, check_finite, device_of, gather_padded, make_accelerator, reduce_sum, shard
from .errors import UserError
from .generation import GenerationConfig, decode_responses, encode_prompts, fit_positions, prompt_room, sample
from .metrics import MetricsLogger
from .models import (
    ValueHead,
    add_lora,
    checkpointing,
    count_parameters,
    enable_gradient_checkpointing,
    lm_parts,
    load_policy,
    make_optimizer,
    make_reference,
    make_value_model,
    merged_copy,
    position_limit,
    resolve_device,
    stop_token_ids,
    token_values,
)
from .rewards import RewardFn


@dataclass
class PPOConfig:
    """Everything `wprlhf ppo` needs. Defaults are sized for a laptop CPU; `ziegler2019` holds the paper's."""

    # --- what to train, on what, for how long
    policy: str = "smollm2"
    """Policy to start from: 'smollm2' (embedded), 'tiny' (random, tests), a local directory or a hub id."""
    reward: str = "vowels"
    """Reward SPEC: a built-in toy reward name, 'module:function', or 'path/to/file.py:function'."""
    prompts: str = ""
    """Prompt file: .txt (one a line), .jsonl / .csv / .csv.gz with a 'prompt' field. Empty = built-in prompts."""
    task: str = ""
    """A named task that brings its prompts, reward and judge (`wprlhf.tasks`): 'positive-reviews' or
    'sentiment-control'. It replaces `reward`; `prompts` then names reviews to take openings from (a directory
    such as ../shared/data/imdb, a text,label CSV or a .txt of openings; empty = the shipped openings). Read by
    `wprlhf ppo`; `train()` takes prompts and reward_fn as arguments."""
    classifier: str = ""
    """With `task`: a directory written by `wprlhf classifier train`, whose log-odds of positive is the reward."""
    steps: int = 20
    """PPO steps; one step = one rollout batch and one PPO update on it."""
    seed: int = 0
    """Seeds the tiny init, prompt order, sampling noise and minibatch order."""

    # --- rollout
    batch_size: int = 16
    """Episodes (prompt -> response) per PPO step."""
    num_minibatches: int = 2
    """Optimizer steps per PPO epoch; each sees batch_size / num_minibatches episodes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (trades memory for time; the update is the same)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    max_prompt_length: int = 128
    """Prompts longer than this keep their last tokens (the chat template's assistant header is at the end). A prompt
    also keeps only as many as leave room for response_length in the model's positions (GPT-2: 1024), with a
    warning; a response_length that leaves no room is an error before the first step."""
    response_length: int = 64
    """Maximum response tokens."""
    min_response_length: int = 0
    """Stop tokens are forbidden before this many tokens."""
    temperature: float = 0.7
    """Sampling temperature; log-probs in the loss use the same one."""
    top_k: int = 0
    """Top-k sampling (0 = full vocabulary, as PPO's log-probs assume)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off, as PPO's log-probs assume)."""
    stop_at_eos: bool = True
    """False = fixed-length responses of response_length tokens (benchmarks)."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template where it has one (instruct models)."""

    # --- optimisation
    lr: float = 1.41e-5
    """AdamW learning rate of the policy."""
    value_lr: float | None = None
    """Learning rate of the value model (None = lr)."""
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    """'constant' or 'linear' (decay to 0 over `steps`, stepped once per PPO step)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (policy and value together); None = off."""

    # --- PPO
    gamma: float = 1.0
    """Discount; 1 because an episode is one response."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip, PPO's epsilon."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    target_approxkl: float | None = None
    """Stop the epochs of a step early once a minibatch's approx-KL to the rollout policy exceeds this."""
    value_model: str = "separate"
    """'separate' (own network, initialised from the policy; Stiennon et al.) or 'shared' (a head on the policy)."""

    # --- rewards and KL
    kl_coef: float = 0.2
    """Initial beta of the per-token KL penalty."""
    adaptive_kl: bool = True
    """Adapt beta towards kl_target (Ziegler et al. 2019, sec. 2.2); False = fixed beta."""
    kl_target: float = 6.0
    """Target KL per response, nats."""
    kl_horizon: int = 512
    """Episodes over which beta moves by up to a factor e^0.2; small enough to move within a short CPU run."""
    kl_estimator: str = "k1"
    """Per-token KL in the penalty: 'k1' (log p - log q, the paper's) or 'k3' (non-negative)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch (keeping their mean)."""
    score_norm: str = "none"
    """'none' or 'batch' (standardise scores within each batch before adding them)."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] after normalisation; None = off."""

    # --- memory and speed
    mixed_precision: str = "no"
    """'no' (fp32), 'bf16' or 'fp16': autocast for every forward (accelerate's); weights and AdamW stay fp32."""
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft, on every linear layer); 0 = train all weights. With LoRA the
    reference is the same network with its adapters off, so the base weights are held once."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (the update is alpha / r * B A)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30 % more time."""
    optimizer: str = "adamw"
    """'adamw' (torch, fused) or 'adamw8bit' (bitsandbytes' 8-bit AdamW, where bitsandbytes is installed)."""

    # --- run plumbing
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'. Under `accelerate launch`, each process's own device."""
    checkpoint_every: int = 10
    """Steps between checkpoints (the last step always saves)."""
    log_samples: int = 2
    """Decoded samples printed every sample_every steps, and written to samples.jsonl."""
    sample_every: int = 5

    def __post_init__(self):
        # Ranges first: the divisibility checks below divide by these sizes.
        at_least = dict(steps=1, batch_size=1, num_minibatches=1, gradient_accumulation_steps=1, ppo_epochs=1,
                        max_prompt_length=1, response_length=1, min_response_length=0, top_k=0, kl_horizon=1,
                        checkpoint_every=1, sample_every=1, log_samples=0, lora_r=0)  # fmt: skip
        for name, low in at_least.items():
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value < low:
                raise UserError(f"{name} must be >= {low}, got {value}; set {flag} to {low} or more")
        for name in ("temperature", "kl_target"):  # each divides something
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if not value > 0:  # `not >` also refuses NaN
                raise UserError(f"{name} must be > 0, got {value}; set {flag} to a positive number")
        if self.min_response_length > self.response_length:
            raise UserError(f"min_response_length {self.min_response_length} exceeds response_length "
                            f"{self.response_length}; lower --min-response-length")  # fmt: skip
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}; set --top-p in that range (1 = off)")
        if self.batch_size % self.num_minibatches:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}; "
                f"pick a divisor of {self.batch_size}"
            )
        if self.minibatch_size % self.gradient_accumulation_steps:
            raise UserError(
                f"minibatch size {self.minibatch_size} (batch_size / num_minibatches) is not divisible by "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        choices = dict(lr_schedule=("constant", "linear"), kl_estimator=("k1", "k3"),
                       score_norm=("none", "batch"), value_model=("separate", "shared"),
                       mixed_precision=("no", "bf16", "fp16"), optimizer=("adamw", "adamw8bit"))  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.score_norm == "batch" and self.batch_size < 2:
            # The standard deviation of one score is undefined (NaN), and would reach every weight.
            raise UserError(f"score_norm 'batch' standardises scores over the batch and needs batch_size >= 2, got "
                            f"{self.batch_size}; raise --batch-size or use --score-norm none")  # fmt: skip

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.response_length, min_new_tokens=self.min_response_length,
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, stop_at_eos=self.stop_at_eos,
        )  # fmt: skip


PRESETS = {
    # trl v0.1's defaults after Ziegler et al. 2019, the seed's settings. trl v0.1 trained on one episode at a
    # time (minibatch size 1), hence 256 minibatches.
    "ziegler2019": dict(
        lr=1.41e-5, kl_coef=0.2, adaptive_kl=True, kl_target=6.0, kl_horizon=10000, gamma=1.0, lam=0.95,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, batch_size=256, num_minibatches=256, ppo_epochs=4,
    ),  # fmt: skip
}


# ==========================================================================================================
# KL controllers: an object with `value` and `update(kl, n_episodes)`


class FixedKLController:
    """A constant beta."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, eq. 2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e * n / horizon)."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_episodes / self.horizon


# ==========================================================================================================
# The algorithm. Each function is one phase and can be called alone in a test.


def _model_inputs(queries, query_mask, responses, response_mask):
    input_ids = torch.cat([queries, responses], dim=1)  # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return input_ids, attention_mask.long(), position_ids_from_mask(attention_mask)


def policy_forward(
    policy: nn.Module,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the responses under `policy`, the shared value head's values, and optionally entropy.

    queries (B, Tq) left-padded, query_mask (B, Tq) bool; responses (B, Tr), response_mask (B, Tr) bool.
    Returns logprobs (B, Tr), values (B, Tr) or None (no value_head), entropy (B, Tr) or None.
    Position t of each output belongs to response token t: it is read from the state just before that token.
    """
    Tr = responses.shape[1]
    input_ids, attention_mask, position_ids = _model_inputs(queries, query_mask, responses, response_mask)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    parts = lm_parts(policy)
    if parts is not None:
        backbone, head = parts
        # The states at Tq-1 .. Tq+Tr-2 predict response tokens 0 .. Tr-1. 1/T goes on the H-wide states, not on
        # the V-wide logits ((h/T)W = (hW)/T): two fewer passes over a (B, Tr, 49k) tensor, forward and backward.
        hidden = backbone(**inputs).last_hidden_state[:, -Tr - 1 : -1]  # (B, Tr, H)
        logits = head(hidden / temperature if temperature != 1.0 else hidden)  # (B, Tr, V)
        logprobs, entropy = logprobs_and_entropy(logits, responses, 1.0, with_entropy)
    else:
        out = policy(**inputs, logits_to_keep=Tr + 1, output_hidden_states=value_head is not None)
        hidden = out.hidden_states[-1][:, -Tr - 1 : -1] if value_head is not None else None
        logprobs, entropy = logprobs_and_entropy(out.logits[:, :-1], responses, temperature, with_entropy)
    values = None if value_head is None else value_head(hidden).float()
    return logprobs, values, entropy


def value_forward(value_model: nn.Module, queries, query_mask, responses, response_mask) -> torch.Tensor:
    """The separate value model's estimate before each response token. Same inputs as policy_forward -> (B, Tr)."""
    Tr = responses.shape[1]
    input_ids, attention_mask, position_ids = _model_inputs(queries, query_mask, responses, response_mask)
    return token_values(value_model, input_ids, attention_mask, position_ids)[:, -Tr - 1 : -1]


class PolicyAndValue(nn.Module):
    """The trained networks as one module, so accelerate wraps them once (DDP, DeepSpeed) and one forward
    gives what the loss needs. Same inputs as policy_forward -> logprobs, values (B, Tr), entropy or None."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: ValueHead | None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    def forward(self, queries, query_mask, responses, response_mask, temperature: float, with_entropy: bool = False):
        batch = (queries, query_mask, responses, response_mask)
        logprobs, values, entropy = policy_forward(self.policy, *batch, temperature, self.value_head, with_entropy)
        if self.value_model is not None:
            values = value_forward(self.value_model, *batch)
        return logprobs, values, entropy


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
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    n_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logprobs (B, T) with grad; old_logprobs, advantages (B, T); mask (B, T) bool. The loss is summed over the
    masked tokens and divided by n_tokens (default: mask.sum()); passing the whole minibatch's token count
    makes gradient accumulation over micro-batches equal to one large batch.
    Returns loss and stats: clipfrac (share of tokens whose clipped term was chosen), approxkl (k3 of the
    rollout policy to the current one).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    log_ratio = logprobs - old_logprobs
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
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    n_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2), summed / n_tokens.

    values (B, T) with grad; old_values (rollout values), returns (B, T); mask (B, T) bool.
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    clipped = clip_around(values, old_values, cliprange_value)
    losses = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * masked_sum(losses, mask) / n_tokens
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)}
    return loss, stats


# ==========================================================================================================
# Plumbing: the trainer holds models, optimizer and KL controller, and runs one step on a rollout batch.


class PPOTrainer:
    """Policy, frozen reference, value model, AdamW and the KL controller, and `step()`: one PPO update.

    Under `accelerate launch` each process samples and scores its shard of the batch (batch_size / processes
    episodes); `step_batch` gathers the shards, so every process computes the same global rewards, advantages
    and minibatches, trains on its slice of each minibatch, and DDP sums the gradients.
    """

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer, value_model: nn.Module | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = make_accelerator(resolve_device(config.device), config.mixed_precision)
        self.device = device_of(self.accelerator)
        self.local_batch_size = check_divisible(config.batch_size, "batch_size", self.accelerator)
        check_divisible(config.minibatch_size, "minibatch size (batch_size / num_minibatches)", self.accelerator)
        self.policy = policy.to(self.device)
        prompt_room(self.policy, config.response_length)  # a UserError now, before any work, if nothing fits
        self.value_model, self.value_head = None, None
        if config.value_model == "shared":
            self.value_head = ValueHead(self.policy.config.hidden_size, seed=config.seed + 1).to(self.device)
            value_params = list(self.value_head.parameters())
        else:
            self.value_model = (value_model or make_value_model(policy, seed=config.seed + 1)).to(self.device)
            value_params = list(self.value_model.parameters())
        # LoRA: the reference is the policy with its adapters switched off (one copy of the base weights).
        self.reference = None if config.lora_r else make_reference(self.policy)
        if config.lora_r:
            self.policy = add_lora(self.policy, config.lora_r, config.lora_alpha)
        if config.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                if model is not None:
                    enable_gradient_checkpointing(model)
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [{"params": policy_params, "lr": config.lr}, {"params": value_params, "lr": config.value_lr or config.lr}]
        optimizer = make_optimizer(config.optimizer, groups, config.adam_eps, config.weight_decay, self.device)
        decay = (lambda step: max(0.0, 1 - step / config.steps)) if config.lr_schedule == "linear" else (lambda step: 1.0)
        # Stepped once per PPO step on every process: not handed to accelerate, which would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        self.model, self.optimizer = self.accelerator.prepare(
            PolicyAndValue(self.policy, self.value_model, self.value_head), optimizer
        )
        self.trainable = policy_params + value_params
        # One process and a separate value model: the policy's loss is backpropagated before the value model runs,
        # so the two models' activations are never held at once (peak RSS of the smollm2 benchmark -350 MiB; the
        # gradients are the same). A DDP- or DeepSpeed-wrapped module needs one forward and one backward instead.
        self.separate_backwards = self.value_model is not None and self.accelerator.distributed_type == "NO"
        if config.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        # Sampling noise differs between processes; the minibatch order must not (all train on one global batch).
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 100_003 * rank)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.step_count = 0
        self.episodes = 0
        self.last_episodes: dict[str, list[float]] = {}
        """Per-episode kl and reward_total of the last global batch (the main process's episodes first), for the
        samples log."""

    def reference_logprobs(self, queries, query_mask, responses, response_mask) -> torch.Tensor:
        """Log-probs of the responses under the frozen start policy (B, Tr)."""
        batch = (queries, query_mask, responses, response_mask)
        if self.reference is not None:
            return policy_forward(self.reference, *batch, self.config.temperature)[0]
        with self.policy.disable_adapter():
            return policy_forward(self.policy, *batch, self.config.temperature)[0]

    # -------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def generate(self, prompts: list[str]):
        """Sample one response per prompt. Returns (queries, query_mask, Generation)."""
        c = self.config
        queries, query_mask = encode_prompts(self.tokenizer, prompts, c.max_prompt_length, c.chat_template)
        # The clipped queries are returned: PPO's forwards must read the prompts the responses were sampled from.
        queries, query_mask = fit_positions(self.policy, queries, query_mask, c.response_length)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        with self.accelerator.autocast():
            gen = sample(
                self.policy, queries, query_mask, c.generation(), self.stop_token_ids, self.tokenizer.pad_token_id,
                self.generator, self.tokenizer,
            )  # fmt: skip
        return queries, query_mask, gen

    # -------------------------------------------------------------------------------- the seed's API
    def step(self, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], scores: Sequence[float]) -> dict:
        """One PPO update from token lists: queries and responses are 1-D tensors of different lengths.

        Pads them (queries left, responses right), computes the rollout log-probs with a forward pass, then
        runs `step_batch`. For rollouts from `generate`, call `step_batch` with the sampling log-probs instead.
        """
        if len(queries) != len(responses):
            raise UserError(f"PPOTrainer.step got {len(queries)} queries and {len(responses)} responses; "
                            "give one response per query")  # fmt: skip
        scores_t = check_scores(scores, len(responses), "PPOTrainer.step's scores")
        queries, responses = [torch.as_tensor(x) for x in queries], [torch.as_tensor(x) for x in responses]
        for name, seqs in (("query", queries), ("response", responses)):
            if bad := [i for i, x in enumerate(seqs) if x.dim() != 1 or len(x) == 0]:
                raise UserError(f"PPOTrainer.step: {name} {bad[0]} is not a non-empty 1-D tensor of token ids")
        limit = position_limit(self.policy)
        if limit is not None and (long := [i for i, (q, r) in enumerate(zip(queries, responses)) if len(q) + len(r) > limit]):
            raise UserError(f"PPOTrainer.step: query + response {long[0]} is longer than the policy's {limit} "
                            "positions; clip the query from the left")  # fmt: skip
        pad = self.tokenizer.pad_token_id
        q, q_mask = pad_sequences(queries, pad, side="left")
        r, r_mask = pad_sequences(responses, pad, side="right")
        return self.step_batch(q.to(self.device), q_mask.to(self.device), r.to(self.device), r_mask.to(self.device),
                               scores_t.to(self.device))  # fmt: skip

    # -------------------------------------------------------------------------------- one PPO step
    def step_batch(self, queries, query_mask, responses, response_mask, scores, logprobs=None) -> dict:
        """One PPO update on a rollout batch (this process's shard of it under `accelerate launch`).

        queries (b, Tq) left-padded, query_mask (b, Tq); responses (b, Tr), response_mask (b, Tr) bool;
        scores (b,) float; logprobs (b, Tr): the rollout policy's log-probs (None = computed here);
        b = batch_size / processes. Returns a dict of float stats over the global batch (metrics.py's names).
        """
        c = self.config
        if queries.shape[0] != self.local_batch_size:
            raise UserError(f"step got {queries.shape[0]} episodes but batch_size is {c.batch_size} "
                            f"({self.local_batch_size} per process)")  # fmt: skip
        scores = check_scores(scores, queries.shape[0], "step_batch's scores").to(self.device)
        if not response_mask.any(dim=1).all():
            rows = torch.nonzero(~response_mask.any(dim=1)).flatten().tolist()
            raise UserError(f"step_batch: responses {rows[:5]} have no real token (response_mask all False); every "
                            "response needs at least one token (an empty answer is its end-of-turn token)")  # fmt: skip
        vocab = self.policy.get_input_embeddings().num_embeddings
        for name, ids in (("queries", queries), ("responses", responses)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                raise UserError(f"step_batch: {name} hold token ids outside the policy's vocabulary [0, {vocab}); "
                                "encode them with the policy's own tokenizer")  # fmt: skip
        temp = c.temperature

        # 1. Rollout forwards, no grad: reference log-probs, values (and the policy's log-probs if not sampled).
        with torch.no_grad(), self.accelerator.autocast():
            batch = (queries, query_mask, responses, response_mask)
            old_logprobs, old_values = None, None
            if logprobs is None or self.value_head is not None:
                old_logprobs, old_values, _ = policy_forward(self.policy, *batch, temp, self.value_head)
            if logprobs is not None:  # sampling already gave them: no second policy forward
                old_logprobs = torch.where(response_mask, logprobs, 0.0)
            if self.value_model is not None:
                old_values = value_forward(self.value_model, *batch)
            ref_logprobs = self.reference_logprobs(*batch)

        with torch.no_grad():
            # The global batch on every process: padding to the longest shard happens here and nowhere else.
            acc, pad = self.accelerator, self.tokenizer.pad_token_id
            queries, query_mask = gather_padded(acc, queries, pad, "left"), gather_padded(acc, query_mask, 0, "left")
            responses, response_mask = gather_padded(acc, responses, pad), gather_padded(acc, response_mask, 0)
            old_logprobs, old_values, ref_logprobs = (gather_padded(acc, x.float(), 0.0)
                                                      for x in (old_logprobs, old_values, ref_logprobs))  # fmt: skip
            scores = gather_padded(acc, scores.float(), 0.0)
            B = queries.shape[0]

            # 2. Scores -> per-token rewards with the KL penalty.
            raw_scores = scores.float()
            scores = raw_scores
            if c.score_norm == "batch":
                scores = (scores - scores.mean()) / (scores.std() + 1e-8)
            if c.score_clip is not None:
                scores = scores.clamp(-c.score_clip, c.score_clip)
            kl_coef = self.kl_ctl.value
            rewards, _ = compute_rewards(scores, old_logprobs, ref_logprobs, response_mask, kl_coef, c.kl_estimator)
            if c.whiten_rewards:
                rewards = masked_whiten(rewards, response_mask, shift_mean=False)

            # 3. Advantages and returns.
            advantages, returns = compute_advantages(rewards, old_values, response_mask, c.gamma, c.lam)

        # 4. PPO epochs over shuffled minibatches.
        update_stats = self.update(queries, query_mask, responses, response_mask, old_logprobs, old_values,
                                   advantages, returns)  # fmt: skip

        # 5. Adapt beta to the measured KL, then book-keeping.
        kl_per_response = masked_sum(kl_k1(old_logprobs, ref_logprobs), response_mask, dim=1)  # (B,)
        self.kl_ctl.update(float(kl_per_response.mean()), B)
        self.scheduler.step()
        self.step_count += 1
        self.episodes += B
        lengths = response_mask.sum(1).float()
        total_per_response = masked_sum(rewards, response_mask, dim=1)  # (B,)
        self.last_episodes = {"kl": kl_per_response.tolist(), "reward_total": total_per_response.tolist()}
        return {
            "reward_mean": float(raw_scores.mean()),
            "reward_std": float(raw_scores.std()) if B > 1 else 0.0,
            "reward_total": float(total_per_response.mean()),
            "kl": float(kl_per_response.mean()),
            "kl_k3": float(masked_sum(kl_k3(old_logprobs, ref_logprobs), response_mask, dim=1).mean()),
            "kl_coef": kl_coef,
            "explained_variance": float(explained_variance(old_values, returns, response_mask)),
            "value_mean": float(masked_mean(old_values, response_mask)),
            "return_mean": float(masked_mean(returns, response_mask)),
            "response_length": float(lengths.mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            **update_stats,
        }

    def update(self, queries, query_mask, responses, response_mask, old_logprobs, old_values, advantages, returns):
        """ppo_epochs x num_minibatches optimizer steps on the global batch (every argument (B, ...), the same on
        every process). Each process trains on its slice of each minibatch, in micro-batches; losses are divided
        by the whole minibatch's token count, so slices and micro-batches add up to one large batch exactly.
        Returns mean stats."""
        c, acc = self.config, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # minibatches that measured each statistic (entropy: the first epoch's)
        n_minibatches = 0
        stop = False
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=self.shuffle_generator).to(self.device)
            for mb_start in range(0, c.batch_size, c.minibatch_size):
                mb = order[mb_start : mb_start + c.minibatch_size]
                n_tokens = response_mask[mb].sum().clamp(min=1)
                local = mb[rank::world]
                micro_size = max(1, len(local) // c.gradient_accumulation_steps)
                micro_starts = range(0, len(local), micro_size)
                stats: dict[str, float] = {}
                for i, micro_start in enumerate(micro_starts):
                    idx = local[micro_start : micro_start + micro_size]
                    mask = response_mask[idx]
                    batch = (queries[idx], query_mask[idx], responses[idx], mask)
                    # Gradients are all-reduced once per minibatch, after its last micro-batch.
                    sync = contextlib.nullcontext() if i == len(micro_starts) - 1 else acc.no_sync(self.model)
                    # checkpointing: a no-op unless gradient_checkpointing is on. Entropy is a statistic, not a
                    # loss term: read it on the first epoch only (it costs several passes over the (b, Tr, V) logits).
                    with sync, checkpointing(self.model):
                        if self.separate_backwards:
                            logprobs, _, entropy = policy_forward(self.policy, *batch, c.temperature,
                                                                  with_entropy=epoch == 0)  # fmt: skip
                        else:
                            logprobs, values, entropy = self.model(*batch, c.temperature, with_entropy=epoch == 0)
                        pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask, c.cliprange, n_tokens)
                        if self.separate_backwards:  # frees the policy's activations before the value model runs
                            acc.backward(pg_loss)
                            values = value_forward(self.value_model, *batch)
                        vf_loss, vf_stats = value_loss(values, old_values[idx], returns[idx], mask, c.cliprange_value, n_tokens)
                        loss = c.vf_coef * vf_loss + (0.0 if self.separate_backwards else pg_loss)
                        # DDP averages gradients over processes; each loss is a share of the global sum, so scale back.
                        acc.backward(loss * world)
                    share = float(mask.sum() / n_tokens)  # weight of this micro-batch in the minibatch means
                    micro = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                             **{k: float(v) * share for k, v in {**pg_stats, **vf_stats}.items()}}  # fmt: skip
                    if entropy is not None:
                        micro["entropy"] = float(masked_mean(entropy, mask)) * share
                    for k, v in micro.items():
                        stats[k] = stats.get(k, 0.0) + v
                stats = reduce_sum(acc, stats)
                # max_norm inf measures the norm without clipping: the guard below needs it either way.
                norm = acc.clip_grad_norm_(self.trainable, c.max_grad_norm or math.inf)
                if norm is not None:  # None under DeepSpeed, whose engine clips by its own config
                    stats["grad_norm"] = float(norm)
                self.check_finite(stats)
                self.optimizer.step()
                # Freed, not zeroed: kept gradient buffers raised peak RSS of the smollm2 benchmark by ~650 MiB
                # (they sit beside the next rollout's activations) for no measurable speed-up.
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                n_minibatches += 1
                if c.target_approxkl is not None and stats["approxkl"] > c.target_approxkl:
                    stop = True  # the policy moved too far from the rollout policy: the samples are stale
                    break
            if stop:
                break
        out = {k: v / counts[k] for k, v in sums.items()}
        out["ppo_minibatches"] = n_minibatches
        return out

    def check_finite(self, stats: dict[str, float]) -> None:
        """Stop before an optimizer step whose losses or gradient norm are NaN/inf (every process agrees).

        Under fp16 an infinite gradient norm is the loss scaler's business: it skips that step and lowers its scale.
        """
        keys = ["policy_loss", "value_loss"] + ([] if self.config.mixed_precision == "fp16" else ["grad_norm"])
        check_finite(self.accelerator, self.step_count + 1, "PPO update", NON_FINITE_FIX,
                     **{k: stats[k] for k in keys if k in stats})  # fmt: skip

    # -------------------------------------------------------------------------------- saving
    def state_dict(self) -> dict:
        """Everything but the model weights that a resumed run needs to continue bit for bit."""
        return {
            "step": self.step_count,
            "episodes": self.episodes,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "generator": self.generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.episodes = state["step"], state["episodes"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.generator.set_state(state["generator"])
        if "shuffle_generator" in state:  # absent in checkpoints written before it existed
            self.shuffle_generator.set_state(state["shuffle_generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])

    def models(self) -> dict[str, nn.Module]:
        """The trained networks by the name of their folder in a checkpoint."""
        out = {"policy": self.policy}
        if self.value_model is not None:
            out["value"] = self.value_model
        return out

    def save(self, directory: Path) -> None:
        """A resumable checkpoint, written by the main process once every process has finished the step."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt.save_checkpoint(directory, self.models(), self.tokenizer, self.state_dict(), self.value_head)
        self.accelerator.wait_for_everyone()

    def export(self, out_dir: Path) -> None:
        """The final models in Hugging Face format (LoRA adapters merged), written by the main process."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            models = {name: merged_copy(model) for name, model in self.models().items()}
            ckpt.export_models(out_dir, models, self.tokenizer, self.value_head)
        self.accelerator.wait_for_everyone()

    def load(self, checkpoint: Path | ckpt.Checkpoint) -> None:
        """Restore a checkpoint folder (or one ckpt.resume_checkpoint has read). Every file is read and checked
        before anything changes: a CheckpointError or other settings leave the models and optimizer as they were."""
        if not isinstance(checkpoint, ckpt.Checkpoint):
            checkpoint = ckpt.read_checkpoint(checkpoint, self.models(), self.value_head, self.check_state)
        self.load_state_dict(ckpt.apply_checkpoint(checkpoint, self.models(), self.value_head))

    def check_state(self, state: dict) -> None:
        """For ckpt.read_checkpoint: CheckpointError for a trainer state this run cannot load, UserError for one
        made with other settings."""
        keys = ("step", "episodes", "optimizer", "scheduler", "kl_ctl", "generator", "torch_rng", "python_rng",
                "numpy_rng", "config")  # fmt: skip
        if missing := [k for k in keys if k not in state]:
            raise ckpt.CheckpointError(f"{ckpt.STATE_FILE} is corrupt (it lacks {missing})")
        if not isinstance(state["config"], dict):
            raise ckpt.CheckpointError(f"{ckpt.STATE_FILE} is corrupt (its config is not a mapping)")
        check_resumable(state["config"], self.config)  # first: other settings also make another optimizer
        try:
            saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        except (KeyError, TypeError):
            saved = None
        if saved != [len(g["params"]) for g in self.optimizer.state_dict()["param_groups"]]:
            raise ckpt.CheckpointError(f"{ckpt.STATE_FILE} is corrupt (its optimizer state is not this trainer's)")


NON_FINITE_FIX = ("Check that reward_fn returns finite scores of a sensible scale, then try a lower --lr, "
                  "--max-grad-norm 1, --score-clip 5, or --mixed-precision no; resume from the last checkpoint with --resume.")

# Fields that may differ between a run and its resumption; any other difference is a different experiment.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "log_samples", "sample_every", "device"}


def check_resumable(saved: dict, config: PPOConfig) -> None:
    current = dataclasses.asdict(config)
    # A field added since the checkpoint was written is missing from it; it ran with that field's default.
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {current[k]!r}" for k in changed)
        raise UserError(f"the checkpoint was made with other settings ({diffs}); resume with the same settings or "
                        "start a new run in another --out directory")  # fmt: skip


# ==========================================================================================================
# train(): prompts in, trained policy out


def prompt_batch(prompts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The prompts of a step: a pure function of (step, seed), walking seeded shuffles epoch by epoch.

    Needs no saved state, so a resumed run sees exactly the prompts the uninterrupted run would have.
    """
    n = len(prompts)
    orders: dict[int, np.ndarray] = {}  # a batch spans at most a few epochs: shuffle each once
    batch = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        batch.append(prompts[orders[epoch][pos]])
    return batch


def check_scores(scores, n: int, source: str) -> torch.Tensor:
    """Scores as a (n,) float32 tensor, or a UserError naming `source` (e.g. "reward 'vowels'") and the fault.

    The one check every entry point applies (`train`'s reward_fn, `PPOTrainer.step` and `step_batch`): one finite
    number per response. A NaN score would otherwise reach every weight through the advantages.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().reshape(-1).tolist() if scores.dim() <= 1 else scores
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise UserError(f"{source} must return a list of numbers, got {type(scores).__name__}: {err}")
    if len(values) != n:
        raise UserError(f"{source} returned {len(values)} scores for {n} responses; return one per response")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"{source} returned non-finite scores (NaN/inf) at positions {bad[:5]}; return finite numbers")
    return torch.tensor(values, dtype=torch.float32)


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
    reward_mean climbs and judge_mean does not, the policy is exploiting the reward model.

    out_dir gets: config.json, metrics.csv, TensorBoard events (tb/), samples.jsonl, checkpoints/ (the two
    newest, resumable) and, at the end, policy/ (and value/) in Hugging Face format.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if not prompts:
        raise UserError("the prompt set is empty: give --prompts a file with at least one prompt")
    if policy is None:
        policy, tokenizer = load_policy(config.policy, seed=config.seed)
    torch.manual_seed(config.seed)
    trainer = PPOTrainer(config, policy, tokenizer)
    acc = trainer.accelerator
    main = acc.is_main_process  # the one process that logs and writes files

    start = 0
    if resume:
        # The newest checkpoint that reads back whole: past an unreadable one it falls back, saying what was wrong.
        restart = ("start a new run: rerun without --resume and with --out set to a new directory"
                   if (out_dir / "metrics.csv").exists() else "start the run: rerun without --resume")  # fmt: skip
        trainer.load(ckpt.resume_checkpoint(out_dir, trainer.models(), trainer.value_head, trainer.check_state,
                                            restart, warn=ckpt.print_warning if main else None))  # fmt: skip
        start = trainer.step_count
    elif (out_dir / "metrics.csv").exists():
        raise UserError(f"{out_dir} already holds a run; use --resume to continue it or choose another --out")
    acc.wait_for_everyone()  # every process has looked at out_dir before the main one writes into it
    logger = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(out_dir / "config.json", dataclasses.asdict(config))
        logger = MetricsLogger(out_dir, resume_step=start if resume else None)

    reward_name = config.reward
    if not resume and main:
        n_params = count_parameters(trainer.policy)
        tqdm.write(f"policy {config.policy}: {n_params / 1e6:.1f} M parameters on {trainer.device}"
                   + (f", {acc.num_processes} processes" if acc.num_processes > 1 else ""))  # fmt: skip
    show = progress and main
    bar = tqdm(range(start, config.steps), desc="ppo", unit="step", disable=not show, initial=start, total=config.steps)
    for step in bar:
        batch_prompts = shard(prompt_batch(prompts, step, config.batch_size, config.seed), acc)
        t0 = time.perf_counter()
        queries, query_mask, gen = trainer.generate(batch_prompts)
        texts = decode_responses(tokenizer, gen.responses, gen.response_mask)
        t1 = time.perf_counter()
        scores = check_scores(reward_fn(batch_prompts, texts), len(texts), f"reward {reward_name!r}").to(trainer.device)
        t2 = time.perf_counter()
        stats = trainer.step_batch(queries, query_mask, gen.responses, gen.response_mask, scores, gen.logprobs)
        t3 = time.perf_counter()
        stats.update(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                     episodes_per_s=config.batch_size / (t3 - t0))  # fmt: skip
        if judge_fn is not None:
            judged = torch.tensor([float(s) for s in judge_fn(batch_prompts, texts)], device=trainer.device)
            stats["judge_mean"] = float(gather_padded(acc, judged, 0.0).mean())
        if main:
            logger.log(step + 1, {"episodes": trainer.episodes, **stats})
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['kl_coef']:.3f}")
            if config.log_samples and ((step + 1) % config.sample_every == 0 or step == 0):
                n = min(config.log_samples, len(texts))
                logger.log_samples(step + 1, batch_prompts[:n], texts[:n], scores[:n].tolist(),
                                   trainer.last_episodes["kl"][:n], trainer.last_episodes["reward_total"][:n], echo=progress)  # fmt: skip
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            trainer.save(ckpt.checkpoint_path(out_dir, step + 1))
    if main:
        logger.close()
    trainer.export(out_dir)
    return trainer


def load_config(path: str | Path | None, overrides: dict, preset: str | None = None) -> PPOConfig:
    """PPOConfig from a preset, then a YAML/JSON file, then explicit overrides; unknown keys are errors."""
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ckpt.load_config(PPOConfig, path, overrides, PRESETS.get(preset or ""))


def dump_config(config: PPOConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
