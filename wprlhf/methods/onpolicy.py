"""The plumbing under PPO's algorithm (`ppo.py`): models, optimizer, devices, processes, checkpoints, the run loop.

`Trainer` holds the policy, the frozen reference (with LoRA: the policy with its adapters off), the value model
(separate, or a head on the policy) and AdamW, prepared by accelerate. It samples (`generate`), scores (`score`), runs
the no-grad forwards of a rollout and gathers every process's shard into the global batch (`forward_rollout`), and
updates the trained networks on a minibatch of it (`optimize`: micro-batches, DDP scaling, each network's
gradient clipping, the non-finite guard). `run` is the loop around a step function: prompts per step, metrics,
samples, checkpoints, resume, the final export. None of it knows PPO's maths; `ppo.py` passes its losses in.

Under `accelerate launch` each process samples and scores its shard of the batch (batch_size / processes
episodes); `forward_rollout` gathers the shards, so every process computes the same global rewards, advantages
and minibatches, trains on its slice of each minibatch, and DDP sums the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..core import masked_mean, token_kl
from ..distributed import autocast_dtype, check_divisible, device_of, gather_padded, is_main_process, reduce_sum, shard
from ..engine import Engine, RunFiles, prepare_precision
from ..errors import UserError
from ..files import INPUTS_FILE, check_inputs, input_fingerprints, read_inputs
from ..forwards import policy_forward, sampling_floor, value_forward
from ..generation import (Generation, check_bare_prompts, check_instruction, decode_responses, encode_prompts,
                          fit_positions, prompt_room,
                          sample)
from ..models import (ValueHead, add_lora, checkpointing, count_parameters, enable_gradient_checkpointing, load_policy,
                      make_reference, make_value_model, merged_copy, stop_token_ids)
from ..signatures import RewardFn, reward_name
from .onpolicy_config import OnPolicyConfig, check_resumable

NON_FINITE_FIX = ("Check that reward_fn returns scores of a sensible scale, then rerun with a lower --lr, --max-grad-norm 1, "
                  "--score-clip 5 or --mixed-precision no: with --resume and the same --out where OUT/checkpoints "
                  "holds a checkpoint (a changed setting needs a new --out), else into a new --out.")  # fmt: skip
NORMS = {"policy": "grad_norm", "value": "value_grad_norm"}  # each network's gradient norm, as metrics name it


@dataclass
class MicroBatch:
    """One micro-batch of this process's slice of a minibatch (`Trainer.micro_batches`).

    idx (b,): its rows of the rollout; mask (b, Tr) bool: their response tokens; n_tokens (): the whole
    minibatch's response tokens over every process, which each micro-batch's loss is divided by, so that the
    micro-batches add up to the minibatch's loss; share: its own tokens / n_tokens (the weight of its stats)."""

    idx: torch.Tensor
    mask: torch.Tensor
    n_tokens: torch.Tensor
    share: float


@dataclass
class Samples:
    """This process's shard of a step's episodes as sampled: b = batch_size / processes rows.

    prompts, texts: b strings (texts = the decoded responses); queries (b, Tq) left-padded, query_mask (b, Tq) bool;
    generation: the sampler's responses, response_mask, logprobs (b, Tr); scores (b,) once scored.
    """

    prompts: list[str]
    texts: list[str]
    queries: torch.Tensor
    query_mask: torch.Tensor
    generation: Generation
    scores: torch.Tensor | None = None


@dataclass
class Rollout:
    """The global batch a PPO update learns from, the same on every process (B = batch_size rows).

    queries (B, Tq) left-padded, query_mask (B, Tq) bool; responses (B, Tr), response_mask (B, Tr) bool, True up
    to and including the stop token; logprobs (B, Tr): the rollout policy's log-probs of the sampled tokens;
    ref_logprobs (B, Tr): the frozen reference's; values (B, Tr): the value model's estimates; scores (B,): one
    reward_fn score per response. Every (B, Tr) tensor is float32 and 0 on padding. With min_response_length > 0
    both log-probs are those of the distribution sampled from (stop tokens masked while t < min_response_length,
    `forwards.sampling_floor`), as are the training forward's: `kl` is then a KL of what was sampled.
    """

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return self.queries.shape[0]

    @functools.cached_property
    def kl(self) -> torch.Tensor:
        """(B, Tr) k1 = logprobs - ref_logprobs on each response token, 0 on padding: the one KL of a step, read by
        the reward's penalty, the KL controller, the metrics and the samples log. Summed over a response's tokens it
        is its KL in nats, what Ziegler et al.'s controller (eq. 2) measures and `wprlhf eval` reports as `kl`."""
        return token_kl(self.logprobs, self.ref_logprobs, self.response_mask)


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
    scores = torch.tensor(values, dtype=torch.float32)
    if huge := torch.nonzero(~torch.isfinite(scores)).flatten().tolist():
        raise UserError(f"{source} returned scores beyond float32's range (|score| > 3.4e38) at positions {huge[:5]}; "
                        "scale them down")  # fmt: skip
    return scores


class PolicyAndValue(nn.Module):
    """The trained networks as one module, so accelerate wraps them once (DDP, DeepSpeed) and one forward
    gives what the loss needs. Same inputs as policy_forward -> logprobs, values (B, Tr), entropy or None.
    floor: policy_forward's `sampling_floor` keywords ({} without min_response_length)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: ValueHead | None,
                 floor: dict | None = None):  # fmt: skip
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head
        self.floor = floor or {}

    def forward(self, queries, query_mask, responses, response_mask, temperature: float, with_entropy: bool = False):
        batch = (queries, query_mask, responses, response_mask)
        logprobs, values, entropy = policy_forward(self.policy, *batch, temperature, self.value_head, with_entropy,
                                                   **self.floor)  # fmt: skip
        if self.value_model is not None:
            values = value_forward(self.value_model, *batch)
        return logprobs, values, entropy


class Trainer:
    """Policy, frozen reference, value model (none with with_value=False), AdamW and the KL controller `kl_ctl`
    (whatever the algorithm's module gives). The policy and value model given are put in eval mode (dropout off,
    as DPO and the CLI do): a policy in train mode would give other log-probs than its frozen copy, the reference,
    and than itself in the next forward (KL of 0.1-0.2 nats at step 0, ratios off 1 on fixed tokens)."""

    def __init__(self, config: OnPolicyConfig, policy: nn.Module, tokenizer, kl_ctl,
                 value_model: nn.Module | None = None, with_value: bool = True, learn: Callable | None = None):
        # 'auto' becomes what this device runs fastest; trainer.config (and so config.json) holds the choice.
        config, self.accelerator = prepare_precision(config)
        self.config = config
        self.tokenizer = tokenizer
        self.kl_ctl = kl_ctl
        self.learn = learn
        """The algorithm's `learn(trainer, rollout) -> stats`: its update on a scored rollout (`step_batch`)."""
        self.method = type(config).__name__.removesuffix("Config")  # 'PPO', 'RLOO', 'GRPO': for messages
        self.device = device_of(self.accelerator)
        self.local_batch_size = check_divisible(config.batch_size, "batch_size", self.accelerator)
        check_divisible(config.minibatch_size, "minibatch size (batch_size / num_minibatches)", self.accelerator)
        self.policy = policy.to(self.device).eval()
        prompt_room(self.policy, config.response_length)  # a UserError now, before any work, if nothing fits
        self.value_model, self.value_head = None, None
        if not with_value:  # RLOO, GRPO: a baseline from the other samples of a prompt instead of a value model
            value_params = []
        elif config.shared_value_head:
            self.value_head = ValueHead(self.policy.config.hidden_size, seed=config.seed + 1).to(self.device)
            value_params = list(self.value_head.parameters())
        else:
            self.value_model = (value_model or make_value_model(policy, seed=config.seed + 1)).to(self.device).eval()
            value_params = list(self.value_model.parameters())
        # Under bf16/fp16 autocast the reference holds its matmul weights in that dtype: the numbers autocast would
        # compute with, in less memory and without a cast per forward. (DeepSpeed runs no autocast: it casts the
        # models themselves, so there the reference stays a plain copy.)
        matmul_dtype = autocast_dtype(config.mixed_precision) if self.accelerator.native_amp else None
        # LoRA: the reference is the policy with its adapters switched off (one copy of the base weights).
        self.reference = None if config.lora_r else make_reference(self.policy, matmul_dtype)
        if config.lora_r:
            self.policy = add_lora(self.policy, config.lora_r, config.lora_alpha)
        if config.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                if model is not None:
                    enable_gradient_checkpointing(model)
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.floor = sampling_floor(config.min_response_length, config.stop_at_eos, stop_token_ids(tokenizer))
        """policy_forward's keywords for the distribution sampled from (`forwards.sampling_floor`): every log-prob of
        a rollout, of the reference and of the update under min_response_length's masked stop tokens."""
        decay = (lambda step: max(0.0, 1 - step / config.steps)) if config.lr_schedule == "linear" else (lambda step: 1.0)
        # Each trained network's gradient is clipped on its own (`Engine`); a shared value head is part of the
        # policy's network (its loss reaches the policy's weights), so the two are clipped together. The schedule is
        # stepped once per PPO step (`end_step`), after its several optimizer steps.
        groups = {"grad_norm": (policy_params, config.lr)}
        if value_params:  # PPO's value model or head (only PPOConfig has value_lr)
            groups["value_grad_norm"] = (value_params, config.value_lr or config.lr)
        networks = PolicyAndValue(self.policy, self.value_model, self.value_head, self.floor)
        self.engine = Engine(self.accelerator, networks, groups, weight_decay=config.weight_decay, schedule=decay,
                             max_grad_norm=config.max_grad_norm, what=f"{self.method} update", fix=NON_FINITE_FIX,
                             optimizer=config.optimizer, eps=config.adam_eps, clip_together=self.value_model is None)
        self.model, self.optimizer, self.scheduler = self.engine.model, self.engine.optimizer, self.engine.scheduler
        # One process and a separate value model: the policy's micro-batches run and the policy takes its step
        # before the value model runs, so the two models' activations and gradients are never held at once (the
        # updates are the same). A DDP- or DeepSpeed-wrapped module needs one forward and one backward instead.
        self.separate_backwards = self.value_model is not None and self.accelerator.distributed_type == "NO"
        self._pending: dict[str, float] = {}  # the current backward pass's stats, summed over its micro-batches
        self._minibatches: list[dict[str, float]] = []  # the stats of each minibatch of the current update
        # Sampling noise differs between processes; the minibatch order must not (all train on one global batch).
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 100_003 * rank)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.step_count = 0
        self.episodes = 0
        self.timings: dict[str, float] = {}
        """Seconds spent in the last step's sampling (time_generate) and scoring (time_score)."""
        self.last_episodes: dict[str, list[float]] = {}
        """Per-episode kl and rlhf_reward of the last global batch (the main process's episodes first), for the
        samples log."""

    # -------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Samples:
        """One response per prompt from the current policy (this process's prompts): text, as generation.generate
        gives, with the tensors PPO needs (generation.sample's)."""
        c, started = self.config, time.perf_counter()
        queries, query_mask = encode_prompts(self.tokenizer, prompts, c.max_prompt_length, c.chat_template, c.instruction)
        # The clipped queries are kept: PPO's forwards must read the prompts the responses were sampled from.
        queries, query_mask = fit_positions(self.policy, queries, query_mask, c.response_length)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        gen = self.sample(queries, query_mask)
        texts = decode_responses(self.tokenizer, gen.responses, gen.response_mask)
        self.timings["time_generate"] = time.perf_counter() - started
        return Samples(prompts, texts, queries, query_mask, gen)

    def sample(self, queries: torch.Tensor, query_mask: torch.Tensor) -> Generation:
        """Responses of the current policy to queries (b, Tq) left-padded, query_mask (b, Tq) bool, already fitted to
        the model's positions, in the run's precision and with its generation settings and noise."""
        # One autocast block for the whole call: under bf16 each weight is cast once and every decoding step reads the
        # cast (half the bytes of fp32 per token); the casts are freed when the block ends, before training.
        with self.accelerator.autocast():
            return sample(self.policy, queries, query_mask, self.config.generation(), self.stop_token_ids,
                          self.tokenizer.pad_token_id, self.generator, self.tokenizer)  # fmt: skip

    def score(self, samples: Samples, reward_fn: RewardFn) -> torch.Tensor:
        """reward_fn on this process's (prompts, texts), checked: scores (b,) on the trainer's device."""
        started = time.perf_counter()
        name = f"reward {self.config.reward!r}"
        scores = check_scores(reward_fn(samples.prompts, samples.texts), len(samples.texts), name).to(self.device)
        if self.config.missing_eos_penalty:  # a response cut at the cap is not a finished one (trl's penalty)
            scores = scores - self.config.missing_eos_penalty * (~samples.generation.finished).to(scores.dtype)
        self.timings["time_score"] = time.perf_counter() - started
        return scores

    def rollout(self, prompts: list[str], reward_fn: RewardFn) -> tuple[Rollout, Samples]:
        """Rollout and evaluation of a step: this process's prompts sampled (`generate`) and scored (`score`), then
        the no-grad forwards, gathered into the global Rollout (`forward_rollout`). Returns it and this process's
        Samples (for the samples log and a judge)."""
        samples = self.generate(prompts)
        samples.scores = self.score(samples, reward_fn)
        gen = samples.generation
        # The sampler's log-probs save a policy forward in fp32. Under bf16/fp16 its KV-cached steps round otherwise
        # than a training forward would: recompute them there, so the first minibatch's ratio is exactly 1. Under
        # min_response_length they are over the full vocabulary, not the distribution sampled from: recomputed too.
        logprobs = gen.logprobs if self.config.mixed_precision == "no" and not self.floor else None
        rollout = self.forward_rollout(samples.queries, samples.query_mask, gen.responses, gen.response_mask,
                                       samples.scores, logprobs)  # fmt: skip
        return rollout, samples

    def step_batch(self, queries, query_mask, responses, response_mask, scores, logprobs=None) -> dict[str, float]:
        """One update of the algorithm (`self.learn`) on a rollout batch you sampled and scored yourself (this
        process's shard of it under `accelerate launch`).

        queries (b, Tq) left-padded, query_mask (b, Tq); responses (b, Tr), response_mask (b, Tr) bool;
        scores (b,) float; logprobs (b, Tr): the rollout policy's log-probs (None = computed here; with
        min_response_length > 0 always computed here, under the distribution sampled from);
        b = batch_size / processes. RLOO and GRPO: a prompt's k responses sit side by side, and the processes'
        shards in rank order make the global batch. Returns a dict of float stats over the global batch.
        """
        if self.learn is None:
            raise UserError("this Trainer has no algorithm: build a PPOTrainer, RLOOTrainer or GRPOTrainer")
        scores = check_scores(scores, queries.shape[0], "step_batch's scores")
        return self.learn(self, self.forward_rollout(queries, query_mask, responses, response_mask, scores, logprobs))

    def reference_logprobs(self, queries, query_mask, responses, response_mask) -> torch.Tensor:
        """Log-probs of the responses under the frozen start policy (B, Tr), under the run's autocast (which a
        reference with bf16/fp16 weights needs)."""
        batch = (queries, query_mask, responses, response_mask)
        with self.accelerator.autocast():
            if self.reference is not None:
                return policy_forward(self.reference, *batch, self.config.temperature, **self.floor)[0]
            with self.policy.disable_adapter():
                return policy_forward(self.policy, *batch, self.config.temperature, **self.floor)[0]

    def forward_rollout(self, queries, query_mask, responses, response_mask, scores, logprobs=None) -> Rollout:
        """This process's episodes -> the global Rollout: no-grad forwards for the reference's log-probs and the
        values (and the policy's log-probs when the sampler's are not given), then every process's shard gathered.

        queries (b, Tq) left-padded, query_mask (b, Tq); responses (b, Tr), response_mask (b, Tr) bool; scores (b,)
        float, already checked (`check_scores`); logprobs (b, Tr) or None (with a floor, `self.floor`, they are
        recomputed: a sampler's are over the full vocabulary); b = batch_size / processes. UserError for a batch of the
        wrong size or content.
        """
        self.check_episodes(queries, responses, response_mask)
        batch = (queries, query_mask, responses, response_mask)
        with torch.no_grad(), self.accelerator.autocast():
            if logprobs is None or self.value_head is not None or self.floor:
                policy_logprobs, values, _ = policy_forward(self.policy, *batch, self.config.temperature,
                                                            self.value_head, **self.floor)  # fmt: skip
            if logprobs is None or self.floor:
                logprobs = policy_logprobs
            else:  # sampling already gave them: no second policy forward
                logprobs = torch.where(response_mask, logprobs, 0.0)
            if self.value_model is not None:
                values = value_forward(self.value_model, *batch)
            elif self.value_head is None:  # no value model: Rollout.values is 0
                values = torch.zeros_like(logprobs, dtype=torch.float32)
            ref_logprobs = self.reference_logprobs(*batch)
        with torch.no_grad():
            # The global batch on every process: padding to the longest shard happens here and nowhere else.
            acc, pad = self.accelerator, self.tokenizer.pad_token_id
            return Rollout(
                gather_padded(acc, queries, pad, "left"), gather_padded(acc, query_mask, 0, "left"),
                gather_padded(acc, responses, pad), gather_padded(acc, response_mask, 0),
                *(gather_padded(acc, x.float(), 0.0) for x in (logprobs, ref_logprobs, values, scores.to(self.device))),
            )  # fmt: skip

    def check_episodes(self, queries, responses, response_mask) -> None:
        """UserError for a shard of the wrong size, an empty response, or token ids the policy cannot read."""
        c = self.config
        if queries.shape[0] != self.local_batch_size:
            raise UserError(f"step got {queries.shape[0]} episodes but batch_size is {c.batch_size} "
                            f"({self.local_batch_size} per process)")  # fmt: skip
        if not response_mask.any(dim=1).all():
            rows = torch.nonzero(~response_mask.any(dim=1)).flatten().tolist()
            raise UserError(f"step_batch: responses {rows[:5]} have no real token (response_mask all False); every "
                            "response needs at least one token (an empty answer is its end-of-turn token)")  # fmt: skip
        vocab = self.policy.get_input_embeddings().num_embeddings
        for name, ids in (("queries", queries), ("responses", responses)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                raise UserError(f"step_batch: {name} hold token ids outside the policy's vocabulary [0, {vocab}); "
                                "encode them with the policy's own tokenizer")  # fmt: skip

    # -------------------------------------------------------------------------------- optimisation
    def minibatches(self) -> list[torch.Tensor]:
        """One epoch's minibatches: a fresh shuffle of the global batch's rows, cut into num_minibatches."""
        c = self.config
        order = torch.randperm(c.batch_size, generator=self.shuffle_generator).to(self.device)
        return [order[start : start + c.minibatch_size] for start in range(0, c.batch_size, c.minibatch_size)]

    def schedule(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(epoch, rows) of each minibatch of a step's update: ppo_epochs fresh shuffles of the global batch, each
        cut into num_minibatches (`minibatches`). Stops early once a minibatch's approx-KL to the rollout policy
        exceeds target_approxkl: the policy moved too far, the samples are stale. `update_stats` afterwards."""
        target, self._minibatches = self.config.target_approxkl, []
        for epoch in range(self.config.ppo_epochs):
            for rows in self.minibatches():
                self._minibatches.append({})
                yield epoch, rows
                if target is not None and self._minibatches[-1]["approxkl"] > target:
                    return

    def update_stats(self) -> dict[str, float]:
        """Each statistic's mean over the update's minibatches (entropy: the first epoch's), and their count."""
        return mean_stats(self._minibatches)

    def passes(self, with_value: bool = True) -> list[tuple[str, ...]]:
        """The networks each backward pass over a minibatch trains: ('policy', 'value') in one pass, or, with
        `separate_backwards`, the policy's pass and step before the value model's, so the two models' activations
        and gradients are never held at once (the updates are the same: the losses share no parameters).
        with_value False: the policy alone (RLOO, GRPO)."""
        if not with_value or self.value_model is None and self.value_head is None:
            return [("policy",)]
        return [("policy",), ("value",)] if self.separate_backwards else [("policy", "value")]

    def micro_batches(self, rollout: Rollout, rows: torch.Tensor) -> Iterator[MicroBatch]:
        """This process's slice of the minibatch `rows` (global indices) in gradient_accumulation_steps micro-batches,
        each under the engine's no_sync but the last (gradients are all-reduced once a minibatch) and with the
        policy's checkpointed layers recomputing in the backward (`models.checkpointing`)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        n_tokens = rollout.response_mask[rows].sum().clamp(min=1)
        local = rows[rank::world]
        for idx in self.engine.micro_batches(local, max(1, len(local) // self.config.gradient_accumulation_steps)):
            mask = rollout.response_mask[idx]
            with checkpointing(self.model):  # a no-op unless gradient_checkpointing is on
                yield MicroBatch(idx, mask, n_tokens, float(mask.sum() / n_tokens))

    def train_forward(self, rollout: Rollout, micro: MicroBatch, networks: tuple[str, ...] = ("policy",),
                      with_entropy: bool = False):  # fmt: skip
        """The forwards of a micro-batch's rows with gradients: (logprobs (b, Tr) or None, values (b, Tr) or None,
        entropy (b, Tr) or None) for the `networks` asked. Entropy is a statistic, not a loss term: asked for on
        the first epoch only (it costs several passes over the (b, Tr, V) logits)."""
        c, acc = self.config, self.accelerator
        batch = (rollout.queries[micro.idx], rollout.query_mask[micro.idx], rollout.responses[micro.idx], micro.mask)
        # The bare models' forwards need the autocast that accelerate gives only the prepared module's forward:
        # without it, --mixed-precision never reached a one-process run's training matmuls (a no-op in fp32).
        if not self.separate_backwards:
            return self.model(*batch, c.temperature, with_entropy=with_entropy)
        with acc.autocast():
            if networks == ("policy",):
                new_logprobs, _, entropy = policy_forward(self.policy, *batch, c.temperature, with_entropy=with_entropy,
                                                          **self.floor)  # fmt: skip
                return new_logprobs, None, entropy
            return None, value_forward(self.value_model, *batch), None

    def backward(self, micro: MicroBatch, losses: dict[str, tuple[torch.Tensor, dict]],
                 entropy: torch.Tensor | None = None, vf_coef: float = 1.0) -> None:  # fmt: skip
        """Backward of a micro-batch's losses, {'policy_loss': (loss, stats), 'value_loss': (loss, stats)}: each
        summed over the micro-batch's response tokens and divided by the minibatch's (`MicroBatch.n_tokens`), so
        the micro-batches of every process add up to the minibatch's loss; the value loss weighs vf_coef (PPO,
        eq. 9). Their stats are kept, weighted by the micro-batch's share of the minibatch's tokens."""
        loss = sum(value * (vf_coef if name == "value_loss" else 1.0) for name, (value, _) in losses.items())
        self.engine.backward(loss)  # a share of the minibatch's loss
        pending = self._pending
        for name, (value, stats) in losses.items():
            pending[name] = pending.get(name, 0.0) + value.item()
            for k, v in stats.items():
                pending[k] = pending.get(k, 0.0) + float(v) * micro.share
        if entropy is not None:
            pending["entropy"] = pending.get("entropy", 0.0) + float(masked_mean(entropy, micro.mask)) * micro.share

    def optimizer_step(self, networks: tuple[str, ...] = ("policy",)) -> None:
        """The engine's step over `networks` after their pass's backwards, stopping on a non-finite loss or
        gradient norm; the pass's stats, summed over processes, with each network's gradient norm before clipping,
        join the minibatch's."""
        stats, self._pending = reduce_sum(self.accelerator, self._pending), {}
        groups = None if len(networks) > 1 or not self.separate_backwards else [NORMS[networks[0]]]
        losses = {k: stats[k] for k in ("policy_loss", "value_loss") if k in stats}
        self._minibatches[-1].update(stats, **self.engine.step(self.step_count + 1, groups, **losses))

    def finish_step(self, rollout: Rollout, rlhf_rewards: torch.Tensor | None = None) -> dict[str, float]:
        """After a step's update: the KL per response (`Rollout.kl` summed) to the controller, the schedule and
        counters (`end_step`), and the per-episode numbers of the samples log. rlhf_rewards (B,): what the method
        maximises per response (None: score - kl_coef * KL). Returns the step's `rollout_stats`, with the kl_coef
        the step used (the controller's value before this update)."""
        kl_coef, kl = self.kl_ctl.value, rollout.kl.sum(1)  # (B,)
        if rlhf_rewards is None:
            rlhf_rewards = rollout.scores - kl_coef * kl
        self.kl_ctl.update(float(kl.mean()), len(rollout))
        self.end_step(len(rollout))
        self.last_episodes = {"kl": kl.tolist(), "rlhf_reward": rlhf_rewards.tolist()}
        return rollout_stats(self, rollout, kl_coef, rlhf_rewards)

    def end_step(self, n_episodes: int) -> None:
        """Book-keeping once a step's update is done: the learning-rate schedule and the counters."""
        self.scheduler.step()
        self.step_count += 1
        self.episodes += n_episodes

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
        if is_main_process():
            ckpt.save_checkpoint(directory, self.models(), self.tokenizer, self.state_dict(), self.value_head)
        self.accelerator.wait_for_everyone()

    def export(self, out_dir: Path) -> None:
        """The final models in Hugging Face format (LoRA adapters merged), written by the main process."""
        self.accelerator.wait_for_everyone()
        if is_main_process():
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


# ==========================================================================================================
# What every on-policy method's update shares: epochs over minibatches, and the rollout's statistics


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the minibatches that measured it (entropy: the first epoch's), and their count."""
    keys = dict.fromkeys(k for row in rows for k in row)  # in the order the minibatches logged them
    out = {k: sum(row[k] for row in rows if k in row) / sum(k in row for row in rows) for k in keys}
    return {**out, "ppo_minibatches": len(rows)}


def rollout_stats(trainer: Trainer, rollout: Rollout, kl_coef: float,
                  rlhf_rewards: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Metrics of a rollout every method logs (names in metrics.py): scores as reward_fn gave them, KL to the
    reference per response (`Rollout.kl` summed; and k3, logged only), the step's kl_coef, the mean rlhf reward
    (rlhf_rewards (B,)), response length, learning rate. `kl` is k1 summed over a response's tokens under the
    distribution sampled from (`Rollout`), the KL every evaluation reports (`sides.side_kl`)."""
    mask, B = rollout.response_mask, len(rollout)
    return {
        "score_mean": float(rollout.scores.mean()),
        "score_std": float(rollout.scores.std()) if B > 1 else 0.0,
        "rlhf_reward_mean": float(np.mean(rlhf_rewards.tolist())),  # in float64, as the samples log reads them
        "kl": float(rollout.kl.sum(1).mean()),
        "kl_k3": float(token_kl(rollout.logprobs, rollout.ref_logprobs, mask, "k3").sum(1).mean()),
        "kl_coef": kl_coef,
        "response_length": float(mask.sum(1).float().mean()),
        "lr": trainer.optimizer.param_groups[0]["lr"],
    }


# ==========================================================================================================
# The run loop: prompts in, a step function per batch, files out


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


def run_inputs(config: OnPolicyConfig, prompts: list[str]) -> dict[str, dict]:
    """The fingerprints (`files.input_fingerprints`) of what a run trains on: the policy, reward, prompts file and
    classifier its config names, and the prompts train() was handed (which the Python API may pass without a file)."""
    specs = {name: getattr(config, name) for name in ("policy", "reward", "prompts", "classifier")}
    return input_fingerprints(specs, {"prompt_list": prompts})


def prepare_run(config: OnPolicyConfig, prompts: list[str], reward_fn: RewardFn, out_dir: str | Path, resume: bool,
                policy: nn.Module | None, tokenizer, allow_changed_inputs: bool = False,
                ) -> tuple[OnPolicyConfig, nn.Module, object]:  # fmt: skip
    """What every algorithm's train() does before building its trainer: name the reward config.json records
    (`signatures.reward_name`), refuse an empty prompt set, refuse a resume whose inputs changed since the run
    started (unless allow_changed_inputs), keep a resumed run's precision, load the policy (config.policy) unless
    one is given, seed torch. (config, policy, tokenizer)."""
    named = config.reward if config.reward != OnPolicyConfig.reward else None  # the CLI's default names nothing
    config = dataclasses.replace(config, reward=reward_name(reward_fn, named))
    if not prompts:
        raise UserError("the prompt set is empty: give --prompts a file with at least one prompt")
    if resume:
        check_inputs(read_inputs(out_dir), run_inputs(config, prompts), allow_changed_inputs, f"the run in {out_dir}")
        config = ckpt.keep_saved_precision(config, out_dir)
    if policy is None:
        policy, tokenizer = load_policy(config.policy, seed=config.seed)
    check_bare_prompts(tokenizer, prompts, config.chat_template)  # every prompt, before step 1 (not at step 300)
    check_instruction(tokenizer, config.instruction, config.chat_template)
    torch.manual_seed(config.seed)
    return config, policy, tokenizer


def run(trainer: Trainer, step_fn: Callable, prompts: list[str], reward_fn: RewardFn, out_dir: str | Path,
        resume: bool = False, progress: bool = True, judge_fn: RewardFn | None = None) -> Trainer:  # fmt: skip
    """Run `config.steps` steps of `step_fn(trainer, prompts, reward_fn) -> (stats, Samples)`; write metrics,
    samples, checkpoints and the final models into out_dir (see `ppo.train`)."""

    config, out_dir = trainer.config, Path(out_dir)
    acc = trainer.accelerator
    main = is_main_process()  # the one process that logs and writes files
    files = RunFiles(out_dir, resume)
    if resume:
        trainer.load_state_dict(files.restore(trainer.models(), trainer.check_state, trainer.value_head))
    start = trainer.step_count
    acc.wait_for_everyone()  # every process has looked at out_dir before the main one writes into it
    processes = f", {acc.num_processes} processes" if acc.num_processes > 1 else ""
    files.open({"config.json": dataclasses.asdict(config), INPUTS_FILE: run_inputs(config, prompts)}, start=start,
               announce=f"policy {config.policy}: {count_parameters(trainer.policy) / 1e6:.1f} M parameters on "
                        f"{trainer.device}, mixed precision {config.mixed_precision}{processes}")  # fmt: skip
    bar = files.steps(start, config.steps, trainer.method.lower(), progress)
    for step in bar:
        # k = samples_per_prompt responses to each of batch_size / k prompts, a prompt's k side by side (RLOO's and
        # GRPO's groups); shards are contiguous, so the gathered global batch keeps the groups.
        k = config.samples_per_prompt
        batch = [p for p in prompt_batch(prompts, step, config.batch_size // k, config.seed) for _ in range(k)]
        batch_prompts = shard(batch, acc)
        started = time.perf_counter()
        stats, samples = step_fn(trainer, batch_prompts, reward_fn)
        elapsed = time.perf_counter() - started
        time_train = elapsed - trainer.timings["time_generate"] - trainer.timings["time_score"]
        stats.update(trainer.timings, time_train=time_train, episodes_per_s=config.batch_size / elapsed)
        if not config.generation().fixed_length:  # in fixed-length mode every response is cut by design: left empty
            cut = (~samples.generation.finished).float()
            stats["truncated_share"] = float(gather_padded(acc, cut, 0.0).mean())
        if judge_fn is not None:
            judged = torch.tensor([float(s) for s in judge_fn(samples.prompts, samples.texts)], device=trainer.device)
            stats["judge_mean"] = float(gather_padded(acc, judged, 0.0).mean())
        files.log(step + 1, {"episodes": trainer.episodes, **stats})
        if main:
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}", kl_coef=f"{stats['kl_coef']:.3f}")
            if config.log_samples and ((step + 1) % config.sample_every == 0 or step == 0):
                n = min(config.log_samples, len(samples.texts))
                files.logger.log_samples(step + 1, samples.prompts[:n], samples.texts[:n], samples.scores[:n].tolist(),
                                         trainer.last_episodes["kl"][:n], trainer.last_episodes["rlhf_reward"][:n],
                                         echo=progress, finished=samples.generation.finished[:n].tolist())  # fmt: skip
        if files.checkpoint_due(step + 1, config.checkpoint_every, config.steps):
            trainer.save(ckpt.checkpoint_path(out_dir, step + 1))
    files.close()
    trainer.export(out_dir)
    return trainer
