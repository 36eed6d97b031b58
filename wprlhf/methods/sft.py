"""Supervised fine-tuning: a causal LM learns prompt -> story, with the loss on the story's tokens only.

Read top to bottom: the config; text -> token ids (`encode_examples`, in the model's chat template where it has
one); packing; the one collator (token ids -> padded tensors and masks); the loss; held-out evaluation; then
`train()`, the plumbing around them (data, AdamW with warm-up and decay, metrics, samples, the loss plot, the
final export to OUT/policy, which `wprlhf ppo --policy OUT/policy` and plain `from_pretrained` load).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
from ..core import linear_schedule, logprobs_from_logits, masked_sum
from ..distributed import device_of, is_main_process, reduce_sum
from ..engine import Engine, Hardware, RunFiles, prepare_precision
from ..errors import UserError, check_numbers
from ..files import INPUTS_FILE, atomic_writer, input_fingerprints, write_json_atomic
from ..generation import GenerationConfig, chat_ids, generate, instructed, text_ids, uses_chat_template
from ..metrics import SFT_METRIC_NAMES, read_metrics, smooth
from ..models import count_parameters, load_policy

EXAMPLE_DATA = "../shared/data/writing_prompts"


@dataclass
class SFTConfig(Hardware):
    """Everything `wprlhf sft` needs. Defaults fit a 2-core laptop CPU: under 30 minutes on smollm2."""

    # --- what to train, on what
    policy: str = "smollm2"
    """Model to fine-tune: 'smollm2' (embedded SmolLM2-135M-Instruct), 'tiny' (random, tests), a local directory
    saved with save_pretrained, or a hub id."""
    data: str = ""
    """Karma-scored stories (required): a responses CSV / JSONL / Parquet file, a directory holding
    prompt_responses.csv.gz (e.g. ../shared/data/writing_prompts) or a hub id (rewardsignal/reddit_writing_prompts)."""
    top_ranked_only: int = 1
    """Train on each prompt's N highest-karma stories (response_rank < N); 0 = every story. SFT imitates what it
    sees, so by default it sees each thread's best story: karma is noisy, but the top of a thread is its readers'
    pick (the seed's notebook also calls rank 0 "best"). A larger N trades quality for quantity."""
    max_examples: int = 64
    """Train on at most this many stories, a seeded random subset (0 = all). The full 11k stories (~10M tokens)
    would take days on a CPU: on 2 cores smollm2 trains on 20-40 tokens per second, about 10 s per 256-token story."""
    max_length: int = 256
    """Tokens of prompt + story, chat template included. A longer story loses its end, and with it the
    end-of-turn token: the model learns to stop only from stories that fit."""
    chat_template: bool = True
    """Format as a user turn (the prompt) and an assistant turn (the story) with the tokenizer's chat template
    where it has one, exactly as `wprlhf ppo` and `wprlhf sample` encode prompts; otherwise (or False) the text
    is prompt + "\\n\\n" + story + EOS."""
    instruction: str = ""
    """Put before each prompt, with a blank line, in what the policy reads ('' = the bare prompt), in training and
    in its samples alike (`generation.instructed`)."""
    task: str = ""
    """Learn a review task's format instead of stories (`sentiment.sft_stories`): 'sentiment-control' (control
    prefix + opening -> the labelled review's continuation) or 'positive-reviews'. `data` then names labelled
    reviews (a 'text,label' file or a directory such as ../shared/data/imdb), and the text is plain: prompt and
    continuation joined with nothing between, as `wprlhf ppo --task` continues an opening (chat_template is
    ignored)."""
    keep_meta: bool = False
    """Keep Reddit meta lines (edits, links, thanks for gold) in the stories. Off, so the model does not learn to
    write them."""

    # --- optimisation
    epochs: int = 1
    """Passes over the training stories."""
    batch_size: int = 8
    """Examples (packed rows when packing) per optimizer step."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step, each of batch_size / gradient_accumulation_steps rows. More saves memory
    and changes nothing else: each micro-batch's loss is divided by the whole step's token count."""
    lr: float = 1e-4
    """Peak AdamW learning rate. Higher than the usual 2e-5 because a CPU run takes a few steps, not thousands."""
    warmup: float = 0.1
    """Share of the optimizer steps spent warming the learning rate up linearly from 0; then linear decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (on every parameter)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None = off."""
    packing: bool = False
    """Fill each row with several whole examples (first-fit, up to max_length tokens). Each example attends only
    to itself and keeps its own positions, so the loss is the unpacked one; packing only stops paying for padding,
    which matters when stories are shorter than max_length. Needs a model that takes a 4-D attention mask
    (Llama, Qwen, Mistral and other transformers models on the default 'sdpa' or 'eager' attention)."""

    # --- held-out loss and samples
    val_fraction: float = 0.1
    """Share of prompts held out (split by prompt with data.split_by_prompt, seed 42: no held-out prompt, nor a
    repost of it, is trained on). The split does not depend on `seed`, so runs with other seeds share it."""
    max_val_examples: int = 32
    """Held-out stories scored at each evaluation (0 = all): a fixed subset (seed 42), the same for every `seed`.
    Each costs one forward per evaluation."""
    eval_every: int = 4
    """Optimizer steps between held-out evaluations; step 0 (the untuned model, the baseline) and the last step
    are always evaluated."""
    n_samples: int = 2
    """Held-out prompts answered greedily and by sampling, before and after training, into samples.jsonl."""
    sample_tokens: int = 96
    """Max new tokens per sample."""

    # --- run plumbing
    seed: int = 0
    """Seeds the training subset, the order of batches, sampling and `tiny`'s init (not the held-out set)."""

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, non_negative=("lr", "weight_decay", "warmup", "max_grad_norm", "val_fraction"))
        # Ranges first: the divisibility check below divides by gradient_accumulation_steps.
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_every", "sample_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; "
                                f"set --{name.replace('_', '-')} to 1 or more")  # fmt: skip
        for name in ("max_examples", "max_val_examples", "top_ranked_only", "n_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0 (0 = no limit / none), got {getattr(self, name)}; "
                                f"set --{name.replace('_', '-')} to 0 or more")  # fmt: skip
        if self.batch_size % self.gradient_accumulation_steps:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}; pick a divisor of {self.batch_size}"
            )
        if self.max_length < 16:
            raise UserError(f"max_length {self.max_length} is too short for a prompt and a story; use >= 16")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must lie in (0, 1) (the held-out loss needs held-out prompts), "
                            f"got {self.val_fraction}")  # fmt: skip
        if not 0 <= self.warmup < 1:
            raise UserError(f"warmup is a share of the steps and must lie in [0, 1), got {self.warmup}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UserError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UserError(f"max_grad_norm must be > 0 or None (off), got {self.max_grad_norm}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps


def load_config(path: str | Path | None, overrides: dict) -> SFTConfig:
    """SFTConfig from a YAML/JSON file, then explicit overrides (None = not given); unknown keys are errors."""
    return ckpt.load_config(SFTConfig, path, overrides)


# ==========================================================================================================
# Text -> token ids


@dataclass
class Example:
    """One example as token ids: the prompt (context, no loss) and the response (the tokens the loss predicts).

    prompt_ids: the formatted prompt, ending where the story starts (after the assistant header of a chat model);
    response_ids: the story's tokens and, when the whole story fits, the end-of-turn (or EOS) token.
    """

    prompt_ids: list[int]
    response_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                    chat_template: bool = True, separator: str = "\n\n", instruction: str = "") -> list[Example]:  # fmt: skip
    """(prompt, story) texts -> Examples of at most max_length tokens, the story cut at its end first; each prompt
    read after the instruction (`generation.instructed`).

    Chat models: the prompt is the template of [user: prompt] with the assistant's turn opened, the ids
    generation.encode_prompts samples from; the completion is the story and the template's end-of-turn marker
    (`<|im_end|>` for SmolLM2), so the model learns to stop (`generation.chat_ids`). Plain models (or
    chat_template=False): prompt + separator, and story + EOS. Either way the story's text stays text: a story
    that spells `<|im_end|>` does not teach the model to stop there. A prompt longer than max_length / 2 keeps its
    last tokens (the assistant header sits at its end), as generation.encode_prompts does.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    if uses_chat_template(tokenizer, chat_template):
        prompt_ids, completion_ids = chat_ids(tokenizer, list(prompts), list(responses), instruction)
    else:  # the tokenizer's usual leading tokens (BOS) before the prompt; the story's text, then EOS
        prompt_ids = tokenizer([p + separator for p in instructed(list(prompts), instruction)],
                               add_special_tokens=True)["input_ids"]  # fmt: skip
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion_ids = [ids + eos for ids in text_ids(tokenizer, list(responses))]
    examples = []
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids)):
        if not p_ids:
            raise UserError(f"prompt {i} encodes to no tokens: {prompts[i]!r:.80}")
        p_ids = p_ids[-(max_length // 2) :]
        examples.append(Example(list(p_ids), list(c_ids[: max_length - len(p_ids)])))
    return examples


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Whole examples into rows of at most max_length tokens, first-fit decreasing (longest first). Deterministic.

    >>> rows = pack([Example([1], [2, 3]), Example([4], [5]), Example([6, 7], [8, 9])], max_length=6)
    >>> [[len(e) for e in row] for row in rows]
    [[4, 2], [3]]
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(example) <= free:
                rows[i].append(example)
                room[i] -= len(example)
                break
        else:
            rows.append([example])
            room.append(max_length - len(example))
    return rows


# ==========================================================================================================
# Token ids -> padded tensors: the one collator


def collate(rows: Sequence[Sequence[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> right-padded tensors. A row holds one example, or several when packed.

    Returns input_ids (B, T) int64; attention_mask (B, T) bool, True on real tokens; loss_mask (B, T) bool, True on
    response tokens, the ones the loss predicts (False on prompts and padding); position_ids (B, T) int64,
    restarting at 0 with each example; segment_ids (B, T) int64, k on the k-th example of its row (from 1), 0 on
    padding. T is the longest row.

    >>> batch = collate([[Example([5, 6], [7, 2])], [Example([5], [8])]], pad_token_id=0)
    >>> batch["input_ids"].tolist()
    [[5, 6, 7, 2], [5, 8, 0, 0]]
    >>> batch["loss_mask"].int().tolist(), batch["attention_mask"].int().tolist()
    ([[0, 0, 1, 1], [0, 1, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]])
    >>> packed = collate([[Example([5], [7]), Example([6], [8, 2])]], pad_token_id=0)
    >>> packed["input_ids"].tolist(), packed["loss_mask"].int().tolist()
    ([[5, 7, 6, 8, 2]], [[0, 1, 0, 1, 1]])
    >>> packed["position_ids"].tolist(), packed["segment_ids"].tolist()
    ([[0, 1, 0, 1, 2]], [[1, 1, 2, 2, 2]])
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row, each with at least one example")
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, example in enumerate(row, 1):
            if not example.prompt_ids:
                raise ValueError("an example needs at least one prompt token: the first token has no prediction")
            n_prompt, n = len(example.prompt_ids), len(example)
            input_ids[b, start : start + n] = torch.tensor(example.prompt_ids + example.response_ids)
            loss_mask[b, start + n_prompt : start + n] = True
            position_ids[b, start : start + n] = torch.arange(n)
            segment_ids[b, start : start + n] = k
            start += n
    attention_mask = segment_ids > 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "position_ids": position_ids, "segment_ids": segment_ids}  # fmt: skip


def attention_mask_for(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The mask the model gets: the (B, T) padding mask, or for packed rows a (B, 1, T, T) additive mask.

    The 4-D mask is block-diagonal and causal: a token sees earlier tokens of its own example only (0 there,
    the dtype's minimum elsewhere). Padding sees itself, so no softmax row is empty (NaN); its outputs are unused.
    """
    segments = batch["segment_ids"]  # (B, T)
    if int(segments.max()) <= 1:
        return batch["attention_mask"].long()
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T): query's example == key's example
    allowed = (same & causal) | torch.eye(T, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, T)


# ==========================================================================================================
# The loss


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-prob of each token given the tokens before it in its example. (B, T) float32, aligned with input_ids.

    batch: a `collate` output on the model's device. Position 0 has no context and gets 0; so does the first
    token of each packed example (it would be predicted from the previous example). Both are prompt tokens,
    outside loss_mask.
    """
    dtype = next(model.parameters()).dtype
    out = model(input_ids=batch["input_ids"], attention_mask=attention_mask_for(batch, dtype),
                position_ids=batch["position_ids"], use_cache=False)  # fmt: skip
    logprobs = logprobs_from_logits(out.logits[:, :-1], batch["input_ids"][:, 1:])  # (B, T-1): token t from t-1
    logprobs = F.pad(logprobs, (1, 0))  # (B, T)
    return torch.where(batch["position_ids"] > 0, logprobs, torch.zeros((), device=logprobs.device))


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_tokens: int | torch.Tensor | None = None):
    """Negative log-likelihood of the response tokens, summed and divided by n_tokens (default: this batch's).

    Passing the whole optimizer step's response-token count makes micro-batches add up to one large batch, and
    makes the loss the mean per response token: long stories weigh by their length, as in trl's SFT.
    Returns (loss scalar with grad, nll_sum float, tokens int).
    """
    mask = batch["loss_mask"]  # (B, T)
    nll_sum = -masked_sum(token_logprobs(model, batch), mask)
    count = int(mask.sum())
    return nll_sum / (n_tokens if n_tokens is not None else max(count, 1)), float(nll_sum.detach()), count


# ==========================================================================================================
# Held-out evaluation and samples


@torch.no_grad()
def evaluate(model: nn.Module, rows: Sequence[Sequence[Example]], pad_token_id: int, batch_size: int,
             device: torch.device) -> dict[str, float]:  # fmt: skip
    """Mean negative log-likelihood per response token over all of `rows` (nats), and the token count.

    Token-weighted over the whole set, so it does not depend on how rows are batched.
    """
    nll, tokens = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: sum(len(e) for e in rows[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_token_id)
        _, batch_nll, batch_tokens = sft_loss(model, {k: v.to(device) for k, v in batch.items()})
        nll, tokens = nll + batch_nll, tokens + batch_tokens
    return {"val_loss": nll / max(tokens, 1), "val_tokens": tokens}


def write_samples(path: Path, model: nn.Module, tokenizer, prompts: list[str], references: list[str],
                  config: SFTConfig, step: int, stage: str, echo: bool = True) -> None:  # fmt: skip
    """Append greedy and sampled responses to held-out prompts to samples.jsonl (one line each), beside the
    human story (`reference`, first 1000 characters) the loss scores them against."""
    from tqdm.auto import tqdm

    if not prompts:
        return
    lines = []
    for decoding in ("greedy", "sampled"):
        generation = GenerationConfig(max_new_tokens=config.sample_tokens, greedy=decoding == "greedy",
                                      instruction=config.instruction)  # fmt: skip
        done: list[bool] = []  # False: cut at sample_tokens with no end-of-turn
        texts = generate(model, tokenizer, prompts, generation, seed=config.seed, chat_template=config.chat_template,
                         finished=done)  # fmt: skip
        for prompt, text, reference, finished in zip(prompts, texts, references, done):
            lines.append({"step": step, "stage": stage, "decoding": decoding, "prompt": prompt, "response": text,
                          "finished": finished, "reference": reference[:1000]})  # fmt: skip
            if echo:
                tqdm.write(f"--- {stage} training, {decoding}\n> {prompt[:200]}\n{text[:400]}")
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """loss.png: the training loss per step (faint) and smoothed, and the held-out loss at each evaluation.

    rows: metrics.csv as read by metrics.read_metrics. Written atomically; uses matplotlib's Agg canvas directly,
    so no display and no global pyplot state.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, markersize=5, label="held-out")
        for i in {0, len(val) - 1}:  # the numbers in the title, where they were measured
            ax.annotate(f"{losses[i]:.3f}", (steps[i], losses[i]), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8, color="tab:orange")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png")


# ==========================================================================================================
# train(): stories in, fine-tuned policy out


def select_stories(stories: Sequence, top_ranked_only: int, source: str) -> list:
    """The stories SFT imitates: each prompt's top_ranked_only highest-karma ones (response_rank < N); 0 = all."""
    if not top_ranked_only:
        return list(stories)
    if stories and all(s.rank is None for s in stories):
        raise UserError(f"{source} has no response_rank column, so the best stories are unknown; add response_rank "
                        "(0 = best in its thread) or pass --top-ranked-only 0 to train on every story")  # fmt: skip
    return [s for s in stories if s.rank is not None and s.rank < top_ranked_only]


def _subset(items: list, limit: int, seed: int) -> list:
    """At most `limit` items (0 = all), a seeded random subset kept in input order."""
    if not limit or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def train(config: SFTConfig, out_dir: str | Path, policy: nn.Module | None = None, tokenizer=None,
          progress: bool = True, stories: Sequence | None = None) -> dict:  # fmt: skip
    """Fine-tune config.policy on config.data's stories; write the run into out_dir and return eval.json's dict.

    stories: the examples to learn from (`data.Response`s: prompt, response, rank) instead of reading config.data.
    A task's examples come this way (`wprlhf sft --task` passes `sentiment.sft_stories(task, data)`): SFT trains on
    whatever it is given and knows no task but by name, so it sits below the tasks (docs/architecture.md).

    out_dir gets config.json, inputs.json (`files.input_fingerprints` of the policy, the data and the stories given),
    metrics.csv (a row per optimizer step, val_loss at step 0 and every eval_every), tb/, samples.jsonl (held-out
    prompts before and after), loss.png, eval.json and policy/ (Hugging Face format, with sft_config.json).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out_dir = Path(out_dir)
    files = RunFiles(out_dir, resumable=False)
    config, separator, responses, train_stories, val_stories = read_stories(config, stories)
    policy, tokenizer = (policy, tokenizer) if policy is not None else load_policy(config.policy, seed=config.seed)
    config, acc = prepare_precision(config)
    device, main = device_of(acc), is_main_process()
    policy.to(device)
    # Dropout off, as everywhere in wprlhf (models._configure); then the held-out loss is deterministic too.
    policy.eval()
    torch.manual_seed(config.seed)

    train_examples, val_examples = (encode_examples(tokenizer, [s.prompt for s in part], [s.response for s in part],
                                                    config.max_length, config.chat_template, separator,
                                                    config.instruction)
                                    for part in (train_stories, val_stories))  # fmt: skip
    train_rows = pack(train_examples, config.max_length) if config.packing else [[e] for e in train_examples]
    val_rows = [[e] for e in val_examples]
    total_steps = math.ceil(len(train_rows) / config.batch_size) * config.epochs
    warmup_steps = round(config.warmup * total_steps)
    # DDP under `accelerate launch`: engine.model is the wrapped policy, `policy` stays the bare one.
    engine = Engine(acc, policy, {"grad_norm": (list(policy.parameters()), config.lr)},
                    weight_decay=config.weight_decay, schedule=lambda s: linear_schedule(s, total_steps, warmup_steps),
                    max_grad_norm=config.max_grad_norm, what="SFT",
                    fix="Try a lower --lr or --max-grad-norm 1, and check the data for empty or garbled stories.")
    progress = progress and main

    acc.wait_for_everyone()  # every process has looked at out_dir before the main one writes into it
    sizes = {"n_train_examples": len(train_examples), "n_train_rows": len(train_rows),
             "n_train_tokens": sum(len(e.response_ids) for e in train_examples), "n_val_examples": len(val_examples),
             "n_val_tokens": sum(len(e.response_ids) for e in val_examples), "steps": total_steps}  # fmt: skip
    files.open({"config.json": {**dataclasses.asdict(config), **sizes},
                INPUTS_FILE: run_inputs(config, responses if stories is not None else None)}, SFT_METRIC_NAMES)
    if progress:
        tqdm.write(f"sft {config.policy} ({count_parameters(policy) / 1e6:.1f} M parameters, {device}, mixed precision "
                   f"{config.mixed_precision}): {len(train_examples)} training stories ({sizes['n_train_tokens']} "
                   f"response tokens) in {len(train_rows)} rows, {len(val_examples)} held-out stories, "
                   f"{total_steps} steps")  # fmt: skip

    # --- before: the untuned model's held-out loss is the baseline to beat
    shown = val_stories[: config.n_samples]
    samples = ([s.prompt for s in shown], [s.response for s in shown])  # held-out prompts and their human stories
    before = evaluate(policy, val_rows, tokenizer.pad_token_id, config.micro_batch_size, device)
    if main:
        files.log(0, {"examples": 0, "tokens": 0, "val_loss": before["val_loss"],
                       "elapsed_s": time.perf_counter() - started})  # fmt: skip
        write_samples(out_dir / "samples.jsonl", policy, tokenizer, *samples, config, 0, "before", progress)
    if progress:
        tqdm.write(f"held-out loss before training: {before['val_loss']:.4f} nats per response token")

    step, last_val = train_steps(engine, policy, config, train_rows, val_rows, tokenizer.pad_token_id, files,
                                 started, before["val_loss"], total_steps, progress)  # fmt: skip

    # --- after: samples, the model, the numbers, the plot (the main process's job)
    acc.wait_for_everyone()
    result = {"val_loss_before": before["val_loss"], "val_loss_after": last_val,
              "val_loss_margin": before["val_loss"] - last_val, **sizes, "policy": config.policy,
              "data": config.data, "wall_s": time.perf_counter() - started}  # fmt: skip
    if main:
        write_samples(out_dir / "samples.jsonl", policy, tokenizer, *samples, config, step, "after", progress)
        files.close()
        export(config, out_dir, policy, tokenizer, result)
    return result


def run_inputs(config: SFTConfig, given: Sequence | None) -> dict:
    """inputs.json: what the run trained on, as files.fingerprint reads it (the policy, the data, and the stories
    `given` in memory). SFT does not resume, but the record travels with the run."""
    lists = {"stories": [(s.prompt, s.response, s.rank) for s in given]} if given is not None else {}
    return input_fingerprints({"policy": config.policy, "data": config.data}, lists)


def export(config: SFTConfig, out_dir: Path, policy: nn.Module, tokenizer, result: dict) -> None:
    """The trained policy in Hugging Face format (its settings beside it, as a reward model's train_config.json),
    eval.json and the plot of the losses."""
    ckpt.export_models(out_dir, {"policy": policy}, tokenizer)
    sizes = {k: v for k, v in result.items() if k.startswith("n_") or k == "steps"}
    write_json_atomic(out_dir / "policy" / "sft_config.json", {**dataclasses.asdict(config), **sizes})
    write_json_atomic(out_dir / "eval.json", result)
    title = (f"SFT of {Path(config.policy).name} on {result['n_train_examples']} stories: held-out loss "
             f"{result['val_loss_before']:.3f} -> {result['val_loss_after']:.3f} ({result['n_val_examples']} "
             "stories)")  # fmt: skip
    plot_losses(read_metrics(out_dir / "metrics.csv"), out_dir / "loss.png", title)


def read_stories(config: SFTConfig, stories: Sequence | None) -> tuple:
    """(config, separator, every story, training stories, held-out stories): `stories` given, or config.data read;
    split by prompt first, so the held-out prompts do not depend on the filters or the subset. A task's prompts are
    openings that PPO continues as plain text, so SFT formats them so too (no chat template, no separator)."""
    from ..data import load_responses, split_by_prompt

    if config.task and stories is None:
        raise UserError(f"sft task {config.task!r}: pass its examples, train(config, out_dir, "
                        f"stories=tasks.sft_stories({config.task!r}, data)), as `wprlhf sft --task` does")  # fmt: skip
    if not config.data and not config.task:
        raise UserError(f"sft needs --data: a responses file, a directory or a hub id, e.g. --data {EXAMPLE_DATA}")
    separator = "\n\n"
    if config.task:
        config, separator = dataclasses.replace(config, chat_template=False), ""
    responses = list(stories) if stories is not None else load_responses(config.data, keep_meta=config.keep_meta)
    if not responses:
        raise UserError(f"{config.data} holds no stories; it needs rows with prompt_id, prompt, response_id, response")
    train_stories, val_stories = split_by_prompt(responses, config.val_fraction, seed=42)
    train_stories = _subset(
        select_stories(train_stories, config.top_ranked_only, config.data), config.max_examples, config.seed
    )
    val_stories = _subset(select_stories(val_stories, config.top_ranked_only, config.data), config.max_val_examples, 42)
    if not train_stories or not val_stories:
        raise UserError(f"{config.data}: {len(train_stories)} training and {len(val_stories)} held-out stories after "
                        f"the split by prompt (val_fraction {config.val_fraction}) and top_ranked_only "
                        f"{config.top_ranked_only}; both need at least one story")  # fmt: skip
    return config, separator, responses, train_stories, val_stories


def train_steps(engine: Engine, policy: nn.Module, config: SFTConfig, train_rows: list, val_rows: list, pad: int,
                files: RunFiles, started: float, last_val: float, total_steps: int,
                progress: bool) -> tuple[int, float]:  # fmt: skip
    """The training loop: epochs of optimizer steps over train_rows (each step's loss the mean over all its response
    tokens, however it is cut into micro-batches and processes), the held-out loss of the bare `policy` every
    eval_every steps, a metrics row a step. Returns (steps taken, the last held-out loss)."""
    from tqdm.auto import tqdm

    acc, device = engine.accelerator, device_of(engine.accelerator)
    step, examples_seen, tokens_seen = 0, 0, 0
    bar = tqdm(total=total_steps, desc="sft", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        # The order is a pure function of (seed, epoch), as onpolicy.prompt_batch's.
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_rows))
        for first in range(0, len(order), config.batch_size):
            t0 = time.perf_counter()
            step_rows = [train_rows[i] for i in order[first : first + config.batch_size]]
            n_tokens = sum(len(e.response_ids) for row in step_rows for e in row)
            if len(step_rows) < acc.num_processes:
                continue  # a last step too small to give every process a row
            local_rows = step_rows[acc.process_index :: acc.num_processes]  # this process's slice of the step
            nll_sum, n_processed = 0.0, 0
            for rows in engine.micro_batches(local_rows, config.micro_batch_size):
                batch = {k: v.to(device) for k, v in collate(rows, pad).items()}
                loss, micro_nll, _ = sft_loss(engine.model, batch, max(n_tokens, 1))
                engine.backward(loss)  # a share of the step's mean over its response tokens
                nll_sum += micro_nll
                n_processed += int(batch["attention_mask"].sum())
            nll_sum, n_processed = reduce_sum(acc, {"nll": nll_sum, "n": n_processed}).values()
            stats = {"lr": engine.lr, **engine.step(step + 1, schedule=True, loss=nll_sum)}
            step += 1
            examples_seen += sum(len(row) for row in step_rows)
            tokens_seen += n_tokens
            stats.update(examples=examples_seen, tokens=tokens_seen, loss=nll_sum / max(n_tokens, 1),
                         tokens_per_s=n_processed / (time.perf_counter() - t0))  # fmt: skip
            if step % config.eval_every == 0 or step == total_steps:
                last_val = evaluate(policy, val_rows, pad, config.micro_batch_size, device)["val_loss"]
                stats["val_loss"] = last_val
            stats["elapsed_s"] = time.perf_counter() - started
            files.log(step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{last_val:.3f}")
    bar.close()
    return step, last_val
