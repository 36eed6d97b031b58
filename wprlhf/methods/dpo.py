"""DPO: direct preference optimisation (Rafailov et al. 2023) from a comparisons file, against a frozen reference.

No reward model and no sampling: the policy learns from labelled pairs (prompt, chosen, rejected) directly. With
h = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)], each log-prob summed over the response's tokens
(the prompt's tokens never count), the loss of a pair is

    sigmoid (Rafailov et al. 2023, eq. 7):   -log sigmoid(beta * h)
    ipo     (Azar et al. 2023, eq. 17):      (h - 1 / (2 * beta))^2       (their tau is our beta)

and beta * (log pi(y) - log ref(y)) is a response's implicit reward (Rafailov et al., sec. 5), logged for the chosen
and rejected responses with their margin and the share of pairs it orders right (accuracy; an exact tie counts 1/2).

Read top to bottom: the config; comparisons -> pairs (ties skipped, a k-way comparison expanded to best-vs-each);
pairs -> tensors; `dpo_loss`; `pair_logprobs`; then `train()`, the plumbing: a held-out split by prompt, AdamW with
warm-up and decay, accelerate (one process or `accelerate launch`), metrics, checkpoints and resume, and the
export to OUT/policy in Hugging Face format. The reference is a frozen copy of the start policy; with LoRA, the
policy with its adapters off (one copy of the weights).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..checkpoint import keep_saved_precision
from ..core import choice_credit, linear_schedule, masked_sum, pad_sequences
from ..data import Comparison, load_comparisons, split_by_prompt
from ..distributed import (autocast_dtype, check_launch_environment, check_mixed_precision, device_of,
                           is_main_process, reduce_sum)
from ..engine import Engine, RunFiles, prepare_precision
from ..errors import UserError, check_numbers
from ..files import INPUTS_FILE, check_inputs, input_fingerprints, read_inputs
from ..forwards import policy_forward
from ..generation import check_bare_prompts, check_instruction, encode_prompts, fit_positions, text_ids
from ..metrics import DPO_METRIC_NAMES
from ..models import (add_lora, count_parameters, load_policy, make_reference, merged_copy, position_limit,
                      stop_token_ids)


@dataclass
class DPOConfig:
    """Everything `wprlhf dpo` needs. Defaults fit a 2-core CPU and a few hundred pairs."""

    policy: str = "smollm2"
    """Start policy, also the frozen reference: 'smollm2', 'tiny' (tests), a local directory or a hub id."""
    data: str = ""
    """Comparisons (required): a comparisons JSONL (the labeling page's export, `wprlhf label export`, the loop's
    labels, `data.write_comparisons`) or a pair CSV (prompt, response_a, response_b, label)."""
    beta: float = 0.1
    """The paper's beta: strength of the implicit KL constraint to the reference (larger = closer)."""
    loss: str = "sigmoid"
    """'sigmoid' (DPO, Rafailov et al. 2023) or 'ipo' (Azar et al. 2023)."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per step (the same update, less memory)."""
    lr: float = 1e-6
    """AdamW learning rate (trl's DPO default; small, as the loss pushes log-ratios without bound)."""
    warmup: float = 0.1
    """Share of the steps over which the learning rate warms up linearly; it then decays linearly to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this before each optimizer step (None = off)."""
    max_pairs: int = 0
    """Train on at most this many pairs, a seeded random subset (0 = all)."""
    max_prompt_length: int = 128
    """Prompt tokens kept (the last ones: the chat template's assistant header is at the end)."""
    max_response_length: int = 128
    """Response tokens kept (the first ones; a cut response loses its end-of-turn token)."""
    val_fraction: float = 0.1
    """Share of prompts held out (by prompt, reposts together) to report accuracy and margins on; 0 = none."""
    keep_meta: bool = False
    """Keep Reddit meta lines (edits, thanks, links) in the responses; off, as `rm train` reads them."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template where it has one, as PPO samples them."""
    instruction: str = ""
    """Put before each prompt, with a blank line, in what the policy reads ('' = the bare prompt), as the pairs'
    responses were sampled (`generation.instructed`)."""
    lora_r: int = 0
    """LoRA rank (0 = train all weights). With LoRA the reference is the policy with its adapters off."""
    lora_alpha: float = 16.0
    """LoRA scaling (alpha / r multiplies the adapters' update), with lora_r > 0."""
    eval_every: int = 50
    """Steps between held-out evaluations (and the last step)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (the last step always saves)."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where faster), 'no', 'bf16' or 'fp16': autocast of every forward; weights stay fp32."""
    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    seed: int = 0
    """Seeds the tiny init, the subset of pairs drawn (max_pairs) and the batch order."""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        check_numbers(self, non_negative=("beta", "lr", "warmup", "weight_decay", "max_grad_norm", "val_fraction"))
        for name, low in dict(epochs=1, batch_size=1, gradient_accumulation_steps=1, max_pairs=0, max_prompt_length=1,
                              max_response_length=1, lora_r=0, eval_every=1, checkpoint_every=1).items():  # fmt: skip
            if getattr(self, name) < low:
                raise UserError(f"{name} must be >= {low}, got {getattr(self, name)}; set --{name.replace('_', '-')}")
        if not self.beta > 0:
            raise UserError(f"beta must be > 0, got {self.beta}; set --beta (0.1 is the paper's)")
        if self.loss not in ("sigmoid", "ipo"):
            raise UserError(f"loss must be 'sigmoid' (DPO) or 'ipo', got {self.loss!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise UserError(f"batch_size {self.batch_size} is not divisible by gradient_accumulation_steps "
                            f"{self.gradient_accumulation_steps}; pick a divisor")  # fmt: skip
        if self.warmup > 1:
            raise UserError(f"warmup is a share of the steps, in [0, 1]; got {self.warmup}")
        if not 0 <= self.val_fraction < 0.5:
            raise UserError(f"val_fraction must lie in [0, 0.5), got {self.val_fraction}")


# ==========================================================================================================
# comparisons -> pairs -> tensors


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    prompt_id: str = ""


def pairs_from(comparisons: Sequence[Comparison]) -> list[Pair]:
    """(prompt, chosen, rejected) pairs: a tie is skipped (no preference to learn), and a k-way comparison gives
    its best response against each of the other k - 1 (the preferences the labeler stated, no more)."""
    out = []
    for c in comparisons:
        if c.tie:
            continue
        out += [Pair(c.prompt, c.responses[c.best], r, c.prompt_id) for i, r in enumerate(c.responses) if i != c.best]
    return out


def encode_pairs(tokenizer, pairs: Sequence[Pair], config: DPOConfig, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Pairs -> one batch of 2n rows, the chosen responses first, then the rejected ones in the same order.

    Returns queries (2n, Tq) left-padded and query_mask; responses (2n, Tr) right-padded and response_mask (bool,
    True on the response's tokens and its end-of-turn token). A response is its tokens and the tokenizer's first
    stop token, as the sampler would end it, cut to max_response_length. Where prompt + response would pass the
    model's positions, a prompt keeps its last (positions - max_response_length) tokens: a rule of the pair alone,
    never of its batch mates' lengths, so a pair's reference log-probs, cached the first time a batch holds it
    (`DPO.ref_logprobs`), are those of every later batch.
    """
    stop = stop_token_ids(tokenizer)[-1:]  # <|im_end|> for SmolLM2 (the largest id of EOS and end-of-turn)
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    # The response's text stays text (`text_ids`): one that spells <|im_end|> does not end early; the stop is ours.
    ids = [(row + stop)[: config.max_response_length] for row in text_ids(tokenizer, texts)]
    responses, response_mask = pad_sequences([torch.tensor(x, dtype=torch.long) for x in ids], tokenizer.pad_token_id)
    prompts = [p.prompt for p in pairs] * 2
    queries, query_mask = encode_prompts(tokenizer, prompts, config.max_prompt_length, config.chat_template,
                                         config.instruction)  # fmt: skip
    queries, query_mask = fit_positions(model, queries, query_mask, config.max_response_length)
    return queries, query_mask, responses, response_mask


# ==========================================================================================================
# the loss


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss: str = "sigmoid") -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Per-pair losses and the implicit rewards.

    Each argument (n,): a response's log-prob summed over its tokens (nats) under the policy (with grad) or the
    reference. Returns losses (n,) and stats (n,) each: chosen_reward, rejected_reward (beta * log-ratio), margin.
    sigmoid: -log sigmoid(beta h) (Rafailov et al. 2023, eq. 7); ipo: (h - 1/(2 beta))^2 (Azar et al. 2023, eq. 17).
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * h) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        stats = {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                 "margin": chosen_reward - rejected_reward}  # fmt: skip
    return losses, stats


def pair_credit(margin: torch.Tensor) -> torch.Tensor:
    """Each pair's share of `accuracy`: 1 where the chosen response's implicit reward is the higher (margin > 0),
    1/2 on an exact tie (margin 0: every pair while the policy equals the reference), 0 otherwise. The one tie rule
    of every accuracy in wprlhf (`core.choice_credit`, with the rejected response's reward as 0).

    margin (n,) -> (n,) float32, no grad.
    """
    rewards = torch.stack([margin.detach(), torch.zeros_like(margin.detach())], dim=1)  # (n, 2): chosen, rejected
    return choice_credit(rewards, torch.zeros(len(margin), dtype=torch.long))


def pair_logprobs(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs (n,) each, summed over response tokens, of a batch from `encode_pairs`."""
    queries, query_mask, responses, response_mask = batch
    logprobs = policy_forward(model, queries, query_mask, responses, response_mask, 1.0)[0]  # (2n, Tr)
    sums = masked_sum(logprobs, response_mask, dim=1)  # (2n,)
    n = sums.shape[0] // 2
    return sums[:n], sums[n:]


# ==========================================================================================================
# train()


class ResponseLogprobs(nn.Module):
    """The policy as the one module accelerate wraps (DDP hooks fire on its forward): a batch from `encode_pairs`
    -> (chosen, rejected) summed log-probs, as `pair_logprobs`."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, queries, query_mask, responses, response_mask):
        return pair_logprobs(self.policy, (queries, query_mask, responses, response_mask))


class DPO:
    """The models and optimizer of a DPO run; `batch_loss` is one micro-batch's loss and stats."""

    def __init__(self, config: DPOConfig, policy: nn.Module, tokenizer, total_steps: int, accelerator=None):
        if accelerator is None:  # else train() made it, from the config it resolved
            config, accelerator = prepare_precision(config)
        self.config, self.tokenizer = config, tokenizer
        self.accelerator = accelerator
        self.device = device_of(self.accelerator)
        self.policy = policy.to(self.device)
        limit = position_limit(self.policy)
        if limit is not None and config.max_response_length >= limit:
            raise UserError(f"max_response_length {config.max_response_length} leaves no room for a prompt in the "
                            f"model's {limit} positions; set --max-response-length to at most {limit - 1}")  # fmt: skip
        # Under bf16/fp16 autocast the reference's matmul weights are stored in that dtype: the same log-probs, less
        # memory. (DeepSpeed runs no autocast: it casts the models themselves; the reference stays a plain copy.)
        matmul_dtype = autocast_dtype(config.mixed_precision) if self.accelerator.native_amp else None
        self.reference = None if config.lora_r else make_reference(self.policy, matmul_dtype)
        if config.lora_r:
            self.policy = add_lora(self.policy, config.lora_r, config.lora_alpha)
        self.policy.eval()  # dropout off, as everywhere in wprlhf: the log-ratios are then deterministic
        params = [p for p in self.policy.parameters() if p.requires_grad]
        warmup = round(config.warmup * total_steps)
        schedule = lambda s: linear_schedule(s, total_steps, warmup)  # noqa: E731
        self.engine = Engine(accelerator, ResponseLogprobs(self.policy), {"grad_norm": (params, config.lr)},
                             weight_decay=config.weight_decay, schedule=schedule, max_grad_norm=config.max_grad_norm,
                             what="DPO update",
                             fix="lower --lr or --beta, or use --mixed-precision no")  # fmt: skip
        self.model = self.engine.model
        self.step = 0
        # The frozen reference gives a pair the same log-probs every epoch: each pair's are computed once, the first
        # time a batch holds it, and read from here after (a quarter of a step's work in every later epoch).
        self.ref_logprobs: dict[tuple[str, int], tuple[float, float]] = {}

    def batch_loss(self, pairs: Sequence[Pair], keys: Sequence[tuple[str, int]] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """Per-pair losses (n,) with grad, and per-pair stats (n,) each, of `pairs` under the current policy.
        keys: one per pair (('train', index) or ('val', index)), under which its reference log-probs are kept."""
        batch = tuple(x.to(self.device) for x in encode_pairs(self.tokenizer, pairs, self.config, self.policy))
        if keys is None or any(k not in self.ref_logprobs for k in keys):
            with torch.no_grad(), self.accelerator.autocast():
                if self.reference is not None:
                    ref = pair_logprobs(self.reference, batch)
                else:
                    with self.policy.disable_adapter():
                        ref = pair_logprobs(self.policy, batch)
            ref = torch.stack([r.float() for r in ref], 1)  # (n, 2): chosen, rejected
            if keys is not None:
                self.ref_logprobs.update(zip(keys, map(tuple, ref.tolist())))
        else:
            ref = torch.tensor([self.ref_logprobs[k] for k in keys], device=self.device)
        with self.accelerator.autocast():
            chosen, rejected = self.model(*batch)
        losses, stats = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.config.beta, self.config.loss)
        return losses, stats

    def save(self, out_dir: Path) -> None:
        """A resumable checkpoint of this step, written by the main process once every process has finished it."""
        self.accelerator.wait_for_everyone()
        if is_main_process():
            ckpt.save_checkpoint(ckpt.checkpoint_path(out_dir, self.step), {"policy": self.policy}, self.tokenizer,
                                 self.state_dict())  # fmt: skip
        self.accelerator.wait_for_everyone()

    def state_dict(self) -> dict:
        return {"step": self.step, **self.engine.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": dataclasses.asdict(self.config)}  # fmt: skip

    def check_state(self, state: dict) -> None:
        if missing := [k for k in ("step", "optimizer", "scheduler", "config") if k not in state]:
            raise ckpt.CheckpointError(f"{ckpt.STATE_FILE} is corrupt (it lacks {missing})")
        saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RESUMABLE_CHANGES}
        if changed := sorted(k for k in now if saved.get(k) != now[k]):
            raise UserError(f"the checkpoint was made with other settings ({', '.join(changed)}); resume with the same "
                            "settings or start a new run in another --out")  # fmt: skip


RESUMABLE_CHANGES = {"checkpoint_every", "eval_every", "device"}


def step_pairs(order: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Indices of the pairs of optimizer step `step` in one epoch's `order` (a pure function: resume needs no state)."""
    return order[step * batch_size : (step + 1) * batch_size]


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def evaluate(dpo: DPO, pairs: Sequence[Pair], batch_size: int) -> dict[str, float]:
    """Mean loss, accuracy (chosen reward > rejected, a tie 1/2: `pair_credit`) and margin on held-out pairs."""
    totals = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            losses, stats = dpo.batch_loss(pairs[start : start + batch_size],
                                           [("val", i) for i in range(start, min(start + batch_size, len(pairs)))])
            totals["val_loss"] += float(losses.sum())
            totals["val_accuracy"] += float(pair_credit(stats["margin"]).sum())
            totals["val_margin"] += float(stats["margin"].sum())
    return {k: v / len(pairs) for k, v in totals.items()}


def update(dpo: DPO, train_pairs: Sequence[Pair], rows: np.ndarray, step: int) -> dict[str, float]:
    """One optimizer step on the training pairs `rows` (global indices): this process's share of them in
    gradient_accumulation_steps micro-batches, the loss of the whole step's pairs their mean. Returns the step's
    mean loss, accuracy, implicit rewards and margin, and the gradient norm."""
    acc = dpo.accelerator
    local = rows[acc.process_index :: acc.num_processes]  # this process's pairs; DDP sums the gradients
    micro = max(1, math.ceil(len(local) / dpo.config.gradient_accumulation_steps))
    sums = {"loss": 0.0, "accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0}
    for chunk in dpo.engine.micro_batches(local, micro):
        losses, stats = dpo.batch_loss([train_pairs[j] for j in chunk], [("train", int(j)) for j in chunk])
        dpo.engine.backward(losses.sum() / len(rows))  # each micro-batch adds its share of the step's mean
        sums["loss"] += float(losses.detach().sum())
        sums["accuracy"] += float(pair_credit(stats["margin"]).sum())
        for k in ("chosen_reward", "rejected_reward", "margin"):
            sums[k] += float(stats[k].sum())
    sums = {k: v / len(rows) for k, v in reduce_sum(acc, sums).items()}
    return sums | dpo.engine.step(step + 1, schedule=True, loss=sums["loss"])


def read_pairs(config: DPOConfig, comparisons: Sequence[Comparison] | None) -> tuple[list, list, list]:
    """(every pair, training pairs, held-out pairs) of `comparisons`, or of config.data read: ties skipped, split by
    prompt, at most max_pairs trained on. UserError for no data, no pair, or no training pair left."""
    if comparisons is None:
        if not config.data:
            raise UserError("dpo needs --data: a comparisons JSONL (e.g. `wprlhf label export`'s) or a pair CSV")
        comparisons = load_comparisons(config.data, keep_meta=config.keep_meta)
    pairs = pairs_from(comparisons)
    if not pairs:
        raise UserError(f"{config.data or 'the comparisons'}: no pair to learn from ({len(comparisons)} comparisons, "
                        "all ties or none); label some responses as better than others")  # fmt: skip
    train_pairs, val_pairs = split_by_prompt(pairs, config.val_fraction, seed=42) if config.val_fraction else (pairs, [])
    if config.max_pairs:
        train_pairs = random.Random(config.seed).sample(train_pairs, min(config.max_pairs, len(train_pairs)))
    if not train_pairs:
        raise UserError(f"no training pairs after holding out {config.val_fraction:.0%} of the prompts; lower "
                        "--val-fraction or give more comparisons")  # fmt: skip
    return pairs, train_pairs, val_pairs


def train(config: DPOConfig, out_dir: str | Path, comparisons: Sequence[Comparison] | None = None, policy=None,
          tokenizer=None, resume: bool = False, progress: bool = True,
          allow_changed_inputs: bool = False) -> dict:  # fmt: skip
    """Fine-tune config.policy on config.data's preferences (or `comparisons`); returns the last step's metrics.

    out_dir gets config.json, metrics.csv (a row per optimizer step; held-out loss, accuracy and margin every
    eval_every), tb/, checkpoints/ (resumable with resume=True) and policy/ (Hugging Face format, with tokenizer),
    and inputs.json: the fingerprints of the policy, the data file and the pairs, which a resume compares (one that
    changed is refused unless allow_changed_inputs).
    UserError for a missing or empty comparisons file, no pair left after skipping ties, or a run already in out_dir.
    """

    out_dir = Path(out_dir)
    pairs, train_pairs, val_pairs = read_pairs(config, comparisons)
    files = RunFiles(out_dir, resume)
    inputs = input_fingerprints({"policy": config.policy, "data": config.data},
                                {"pairs": [(p.prompt, p.chosen, p.rejected) for p in pairs]})  # fmt: skip
    if resume:
        check_inputs(read_inputs(out_dir), inputs, allow_changed_inputs, f"the DPO run in {out_dir}")
        config = keep_saved_precision(config, out_dir)
    config, accelerator = prepare_precision(config)
    if policy is None:
        policy, tokenizer = load_policy(config.policy, seed=config.seed)
    check_bare_prompts(tokenizer, [p.prompt for p in pairs], config.chat_template)  # before any file is written
    check_instruction(tokenizer, config.instruction, config.chat_template)
    torch.manual_seed(config.seed)
    world = check_launch_environment()  # processes under `accelerate launch` / torchrun
    if config.batch_size % world:
        raise UserError(f"batch_size {config.batch_size} does not split over {world} processes; make --batch-size a "
                        "multiple of the process count")  # fmt: skip
    # A last, short batch is kept when every process gets a pair of it (DDP needs a backward on each), else dropped.
    steps_per_epoch = len(train_pairs) // config.batch_size + (len(train_pairs) % config.batch_size >= world)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than the {world} processes; give more comparisons")
    total = steps_per_epoch * config.epochs
    dpo = DPO(config, policy, tokenizer, total, accelerator)
    if resume:
        state = files.restore({"policy": dpo.policy}, dpo.check_state)
        dpo.engine.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        dpo.step = state["step"]
    config_record = dataclasses.asdict(config) | {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    files.open({"config.json": config_record, INPUTS_FILE: inputs}, DPO_METRIC_NAMES, dpo.step,
               f"dpo: {len(train_pairs)} pairs ({len(val_pairs)} held out), {total} steps, policy {config.policy} "
               f"({count_parameters(dpo.policy) / 1e6:.1f} M parameters), mixed precision {config.mixed_precision}")
    started, row = time.perf_counter(), {}
    for step in files.steps(dpo.step, total, "dpo", progress):
        epoch, within = divmod(step, steps_per_epoch)
        rows = step_pairs(epoch_order(len(train_pairs), epoch, config.seed), within, config.batch_size)
        sums = update(dpo, train_pairs, rows, step)
        dpo.step = step + 1
        row = {"pairs": epoch * len(train_pairs) + min((within + 1) * config.batch_size, len(train_pairs)), **sums,
               "lr": dpo.engine.lr, "elapsed_s": time.perf_counter() - started}  # fmt: skip
        if val_pairs and (dpo.step % config.eval_every == 0 or dpo.step == total):
            row |= evaluate(dpo, val_pairs, config.batch_size)
        files.log(dpo.step, row)
        if files.checkpoint_due(dpo.step, config.checkpoint_every, total):
            dpo.save(out_dir)
    files.close()
    if is_main_process():
        ckpt.export_models(out_dir, {"policy": merged_copy(dpo.policy)}, tokenizer)
    dpo.accelerator.wait_for_everyone()
    return row

