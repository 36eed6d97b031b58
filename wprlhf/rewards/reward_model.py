"""Scalar-head reward models: label types, the one training loop, scoring, normalisation and evaluation.

A reward model is a sequence classifier on an encoder or a causal LM with one output per text; `classifier.py`'s
sentiment classifier, with two (negative / positive), is a rating-type reward model trained by the same loop.
What trains a head is a label type, as in lm-human-preferences' `label_types.py`: a small class with one
`loss()`, and how its examples are batched and scored:

- `Pairwise`: a prompt, two responses, the better one. Bradley-Terry: -log sigmoid(r_best - r_other), each
  comparison weighted by its `strength` when `RewardConfig.pair_weight` says so.
- `BestOfK`: a prompt, k >= 2 responses, the best one. Cross-entropy of softmax over the k rewards
  (lm-human-preferences' best-of-4); at k = 2 it is `Pairwise`.
- `BinaryRating`: a text and its label, 1 or 0. Two-way cross-entropy of the head's two logits.

Shared by every label type: `choice_credit` (the one tie rule of every accuracy), `fit` (optimizer, schedule,
accelerate, the non-finite guard, metrics, validation), `outputs` (batched scoring), `save` and `load`. `train`
fits comparisons; then scores are normalised to mean 0 / std 1 over a reference set of responses, folded into
the head's weights, so that `AutoModelForSequenceClassification.from_pretrained(DIR)` gives normalised rewards
with no wprlhf code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import bootstrap_ci, choice_credit, linear_schedule
from ..data import Comparison, length_ratio, load_comparisons, prompt_key, split_by_prompt
from ..distributed import device_of, reduce_sum, resolve_device
from ..engine import Engine, Hardware, RunFiles, prepare_precision
from ..errors import UserError, check_numbers, warn_if_degenerate
from ..files import write_json_atomic
from ..metrics import CLASSIFIER_METRIC_NAMES, RM_METRIC_NAMES
from ..models import (checkpointing, enable_gradient_checkpointing, freeze_lower_layers, load_reward_backbone,
                      position_limit)

TRAIN_CONFIG_FILE = "train_config.json"
PAIR_WEIGHTS = ("none", "strength")
SHIPPED_PAIRS_PER_PROMPT = 20
"""The cap of the shared data's comparisons_train (its README): `pairs_per_prompt` at this value reads that file."""
LENGTH_MATCHED_RATIO = 1.25
"""Held-out comparisons whose longest response is at most this many times the shortest (in words) form the
length-matched subset reported beside every accuracy: there, a longer story cannot win for being longer."""

Forward = Callable[[list], torch.Tensor]
"""The head's outputs for a list of texts (whatever the task's `encode` reads: a string, or a (prompt, response)
pair), in order: (n,) rewards or (n, 2) logits."""


@dataclass
class RewardConfig(Hardware):
    """`wprlhf rm train`: what to learn from, which backbone, how long. The defaults are the CPU recipe that beat
    TF-IDF on karma pairs (docs/data.md: 6,000 pairs read in 80-word windows of 128 tokens, ~8 minutes on 2 cores)."""

    data: str = ""
    """Comparisons: a pair CSV (prompt, response_a, response_b, label), comparisons JSONL, a directory holding
    comparisons_train.csv.gz, or a hub id."""
    model: str = "minilm"
    """Backbone: 'minilm' (embedded all-MiniLM-L6-v2), 'smollm2', 'tiny', a local directory or a hub id."""
    max_length: int = 128
    """Tokens of prompt + response (or of prompt + window); longer inputs lose the end of the response first."""
    max_examples: int = 6000
    """Use at most this many training comparisons (0 = all), drawn at random with `seed`."""
    pairs_per_prompt: int = SHIPPED_PAIRS_PER_PROMPT
    """Where --data is a karma data directory (comparisons_train.csv.gz beside prompt_responses.csv.gz): 20 reads
    the shipped comparisons_train (at most 20 pairs a prompt); any other number (0 = all) rebuilds the pairs of
    comparisons_train's prompts, and only those (never a test prompt), from prompt_responses with the data
    README's rule (`data.karma_pairs`), at most this many a prompt: 52,612 pairs over 586 prompts with 0, built
    in seconds. Elsewhere it must stay 20."""
    epochs: int = 1
    """Passes over the training comparisons."""
    batch_size: int = 16
    """Comparisons per optimizer step. Batches are drawn prompt by prompt, so a story shared by several
    comparisons of a batch is encoded once."""
    window_words: int = 80
    """Read long responses in windows of this many words (0 = one window: the start, cut at max_length). Training
    draws one random window of each response per epoch; scoring averages the scores of all its windows, so the
    reward sees a whole story, not just its opening (karma follows style spread over the story: a bag of words
    over the first 96 words of a story predicts the better one of a pair 54 % of the time, over all of it 63 %).
    Kept in the saved config as `reward_window_words`."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many of the lowest transformer layers: their backward pass is most of the
    cost on a CPU, and the general features they carry change little when learning a reward."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping them: the same update
    for about a third more compute, keeping only each layer's input (one hidden vector a token) and one layer's
    activations at a time. Kept, activations grow as batch_size x max_length x layers: for a 0.5-1B decoder on 32
    pairs of 512 tokens (32,768 tokens a step) they, not the weights, decide whether a step fits a GPU
    (docs/scaling.md, "A reward model on a GPU")."""
    lr: float = 5e-5
    """AdamW learning rate (head and backbone alike)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.06
    """Share of optimizer steps with a linear warm-up; then linear decay to 0."""
    val_fraction: float = 0.05
    """Share of prompts held out of training for the validation loss/accuracy curve."""
    eval_every: int = 125
    """Optimizer steps between validation passes (the last step always has one: 3 passes at the defaults). A pass
    scores the validation comparisons exactly as `rm eval` does, every window of every story, so the curve shows
    the number `rm eval` will report: on karma pairs, 500 comparisons are ~370 stories and ~3,400 windows, about
    7x the encodes of reading only each story's opening."""
    keep_meta: bool = False
    """Keep Reddit meta lines (links, 'Edit:') in the text; off by default as they leak karma."""
    normalize_samples: int = 500
    """Responses used to normalise scores to mean 0 / std 1 (from the training data's responses; with windows,
    each costs one forward per window)."""
    pair_weight: str = "none"
    """'none': every comparison counts the same; 'strength': each comparison's loss is weighted by its
    `Comparison.strength` (karma pairs: `data.vote_strength`, log2 of the vote ratio, 1 to ~12), so a pair that
    won 640 to 10 teaches more than one that won 40 to 20. A labeling page's strengths use the same weights."""
    seed: int = 0
    """Seeds the fresh head's init, the train/held-out split by prompt, the subset drawn and the batch order."""

    def __post_init__(self):
        super().__post_init__()
        if self.pair_weight not in PAIR_WEIGHTS:
            raise UserError(f"pair_weight {self.pair_weight!r} is not one of {', '.join(PAIR_WEIGHTS)}; "
                            "set --pair-weight none or strength")  # fmt: skip
        if self.max_length < 16:
            raise UserError(f"max_length {self.max_length} is too short for a prompt and a response; use >= 16")
        for name in ("batch_size", "epochs", "eval_every"):  # eval_every 0 would divide by zero mid-training
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; "
                                f"set --{name.replace('_', '-')} to 1 or more")  # fmt: skip
        if self.normalize_samples < 2:
            raise UserError(f"normalize_samples must be >= 2 (a std needs two scores), got {self.normalize_samples}")
        check_numbers(self, non_negative=("lr", "weight_decay", "warmup_ratio", "val_fraction", "pairs_per_prompt"))
        if not self.val_fraction < 1:
            raise UserError(f"val_fraction must lie in [0, 1), got {self.val_fraction}: the rest is what the reward "
                            "model trains on; set --val-fraction below 1 (0.05 is usual)")  # fmt: skip


def accuracy_ci(credit: Sequence[float], groups: Sequence) -> tuple[float, list[float]]:
    """The mean credit and its 95% CI, resampling whole groups (a prompt's comparisons move together; texts that
    are independent are each their own group). credit must not be empty."""
    lo, hi = bootstrap_ci(list(credit), list(groups))
    return float(np.mean(credit)), [lo, hi]


# ==========================================================================================================
# label types: each has one loss(), batches() and batch_loss(forward, examples) -> (loss, credit)


def _prompt_batches(comparisons: list[Comparison], batch_size: int, rng: random.Random) -> Iterator[list[Comparison]]:
    """Shuffled batches that keep a prompt's comparisons together: pairs of one prompt share stories, and
    `_comparison_scores` encodes each distinct story of a batch once (about 1.4x fewer encodes on karma pairs)."""
    by_prompt: dict[str, list[int]] = {}
    for i, c in enumerate(comparisons):
        by_prompt.setdefault(c.prompt, []).append(i)
    groups = list(by_prompt.values())
    rng.shuffle(groups)
    order = []
    for group in groups:
        rng.shuffle(group)
        order += group
    for start in range(0, len(order), batch_size):
        yield [comparisons[i] for i in order[start : start + batch_size]]


def _comparison_scores(forward: Forward, batch: list[Comparison], weighted: bool = False):
    """Score every distinct (prompt, response) of a batch in one call of `forward`.

    Returns scores (B, K) float, best (B,) int64, valid (B, K) bool (False on the padding slots of comparisons
    with fewer than K responses; they point at text 0), tie (B,) bool and weight (B,) float (each comparison's
    `strength` when weighted, else None), on the scores' device."""
    K = max(len(c.responses) for c in batch)
    texts: dict[tuple[str, str], int] = {}
    index = torch.zeros(len(batch), K, dtype=torch.long)
    valid = torch.zeros(len(batch), K, dtype=torch.bool)
    for i, c in enumerate(batch):
        for j, r in enumerate(c.responses):
            index[i, j] = texts.setdefault((c.prompt, r), len(texts))
            valid[i, j] = True
    flat = forward(list(texts))  # (distinct texts,)
    device = flat.device
    best = torch.tensor([c.best for c in batch], device=device)
    tie = torch.tensor([c.tie for c in batch], device=device)
    weight = torch.tensor([c.strength for c in batch], device=device, dtype=flat.dtype) if weighted else None
    return flat[index.to(device)], best, valid.to(device), tie, weight


def _weighted_mean(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum(weight * losses) / sum(weight): the mean a comparison of strength s enters s times; None = plain mean."""
    return losses.mean() if weight is None else (weight * losses).sum() / weight.sum()


class Pairwise:
    """Two responses to a prompt and the better one, or a labelled tie: Bradley-Terry."""

    num_labels = 1
    unit = "comparisons"
    metric_names = RM_METRIC_NAMES

    def __init__(self, weighted: bool = False):
        self.weighted = weighted

    def loss(self, scores: torch.Tensor, best: torch.Tensor, tie: torch.Tensor | None = None,
             weight: torch.Tensor | None = None):  # fmt: skip
        """-log sigmoid(r_best - r_other), the Bradley-Terry likelihood of the labeler's choice (Stiennon et al.
        2020, eq. 1); a tie's target is 1/2: -(log sigmoid(d) + log sigmoid(-d)) / 2.

        scores (N, 2) float; best (N,) int64 in {0, 1}; tie (N,) bool or None (no ties); weight (N,) float > 0 or
        None: the loss is sum(weight * loss_i) / sum(weight) (a comparison of weight 3 counts as three copies).
        Returns the mean loss (scalar) and the `choice_credit` (M,) of the M comparisons that are not ties.
        """
        tie = torch.zeros_like(best, dtype=torch.bool) if tie is None else tie
        margin = scores.gather(1, best[:, None]).squeeze(1) - scores.gather(1, 1 - best[:, None]).squeeze(1)  # (N,)
        target = 1 - 0.5 * tie.to(margin.dtype)  # P(best beats the other): 1, or 1/2 for a tie
        losses = -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin))  # (N,)
        return _weighted_mean(losses, weight), choice_credit(scores, best)[~tie]

    def batches(self, comparisons: list[Comparison], batch_size: int, rng: random.Random):
        return _prompt_batches(comparisons, batch_size, rng)

    def batch_loss(self, forward: Forward, batch: list[Comparison]):
        scores, best, _, tie, weight = _comparison_scores(forward, batch, self.weighted)
        return self.loss(scores, best, tie, weight)


class BestOfK:
    """k >= 2 responses to a prompt (k may differ between comparisons) and the best one, or a labelled tie."""

    num_labels = 1
    unit = "comparisons"
    metric_names = RM_METRIC_NAMES

    def __init__(self, weighted: bool = False):
        self.weighted = weighted

    def loss(self, scores: torch.Tensor, best: torch.Tensor, valid: torch.Tensor, tie: torch.Tensor | None = None,
             weight: torch.Tensor | None = None):  # fmt: skip
        """Cross-entropy of softmax(scores) against the labeler's choice (Ziegler et al. 2019, eq. 1:
        lm-human-preferences' best-of-4 loss); a tie's target is uniform over its responses.

        scores (N, K) float; best (N,) int64; valid (N, K) bool, False where a comparison has fewer than K
        responses; tie (N,) bool or None (no ties); weight (N,) float > 0 or None, as in `Pairwise.loss`.
        Returns the mean loss (scalar) and the `choice_credit` (M,) of the M comparisons that are not ties.
        """
        tie = torch.zeros_like(best, dtype=torch.bool) if tie is None else tie
        logp = torch.log_softmax(scores.masked_fill(~valid, -math.inf), dim=-1)  # (N, K)
        target = F.one_hot(best, scores.shape[1]).to(logp.dtype)
        uniform = valid.to(logp.dtype) / valid.sum(-1, keepdim=True)
        target = torch.where(tie[:, None], uniform, target)
        losses = -(target * logp.masked_fill(~valid, 0.0)).sum(-1)  # (N,)
        return _weighted_mean(losses, weight), choice_credit(scores, best, valid)[~tie]

    def batches(self, comparisons: list[Comparison], batch_size: int, rng: random.Random):
        return _prompt_batches(comparisons, batch_size, rng)

    def batch_loss(self, forward: Forward, batch: list[Comparison]):
        return self.loss(*_comparison_scores(forward, batch, self.weighted))


class BinaryRating:
    """A text and its label, 1 (positive) or 0 (negative): a two-way classifier."""

    num_labels = 2
    unit = "texts"
    metric_names = CLASSIFIER_METRIC_NAMES

    def loss(self, logits: torch.Tensor, labels: torch.Tensor):
        """Cross-entropy of softmax(logits) against the label, nats per text.

        logits (N, 2) float; labels (N,) int64 0/1. Returns the mean loss (scalar) and each text's
        `choice_credit` (N,): 1 when its label has the higher logit, 1/2 when the two are equal, else 0.
        """
        return F.cross_entropy(logits, labels), choice_credit(logits, labels)

    def batches(self, examples: list[tuple[str, int]], batch_size: int, rng: random.Random):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]

    def batch_loss(self, forward: Forward, batch: list[tuple[str, int]]):
        logits = forward([text for text, _ in batch])  # (B, 2)
        return self.loss(logits, torch.tensor([label for _, label in batch], device=logits.device))


Label = Pairwise | BestOfK | BinaryRating


def comparison_label(comparisons: Sequence[Comparison], weighted: bool = False) -> Pairwise | BestOfK:
    """Pairwise when every comparison has two responses (karma pairs, the labeling page's pairs), else BestOfK;
    weighted: each comparison's loss weighted by its strength."""
    return (Pairwise if all(len(c.responses) == 2 for c in comparisons) else BestOfK)(weighted)


# ==========================================================================================================
# scoring, loading, saving


def head_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head on a padded batch (input_ids, attention_mask (B, T), any device), with grad if enabled:
    (B,) float rewards for a one-output head, less config.reward_offset (the shift a normalised head without a
    bias keeps there, `fold_normalization`); (B, 2) float logits for a two-output head."""
    bare = getattr(model, "module", model)  # DDP-wrapped while training
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    if logits.shape[-1] != 1:
        return logits.float()
    return logits.squeeze(-1).float() - getattr(bare.config, "reward_offset", 0.0)


@torch.no_grad()
def outputs(model: nn.Module, tokenizer, encode: Callable, texts: list, max_length: int, batch_size: int = 32,
            progress: bool = False) -> torch.Tensor:  # fmt: skip
    """`head_outputs` of many texts, batched, no grad, dropout off: (N,) or (N, 2) float32 on the CPU, in input order.

    encode(tokenizer, texts, max_length) pads a batch. Texts are sorted by length (characters; a (prompt,
    response) pair counts both) so that padding stays small."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n = model.config.num_labels
    out = torch.empty(len(texts), *([n] if n > 1 else []))
    order = sorted(range(len(texts)), key=lambda i: _length(texts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        out[idx] = head_outputs(model, encode(tokenizer, [texts[i] for i in idx], max_length)).cpu()
    model.train(was_training)
    return out


def _length(text: str | tuple[str, ...]) -> int:
    return len(text) if isinstance(text, str) else sum(len(t) for t in text)


def load(path: str | Path, num_labels: int, device: str | torch.device, name: str, command: str):
    """A head saved by `fit` and `save` (or any sequence classifier with num_labels outputs): (model in eval mode,
    tokenizer, its train_config.json as a dict, {} when there is none). name and command go into the error for a
    directory that holds no model ('reward model', 'rm train')."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{name} directory {path} has no config.json; train one with `wprlhf {command} --out {path}`")
    model, tokenizer = load_reward_backbone(str(path), num_labels=num_labels)
    model.to(resolve_device(device))
    return model.eval(), tokenizer, read_train_config(path)


def read_train_config(path: str | Path) -> dict:
    """The train_config.json that `fit` saved beside a model, {} when there is none."""
    file = Path(path) / TRAIN_CONFIG_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def save(model: nn.Module, tokenizer, out_dir: Path, held_out: dict) -> dict:
    """The trained model in Hugging Face format beside its tokenizer (plain `transformers` loads the directory),
    and eval-heldout.json. Returns held_out."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_json_atomic(out_dir / "eval-heldout.json", held_out)
    return held_out


def encode(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """(prompt, response) text pairs -> padded input_ids / attention_mask (B, T).

    Truncation 'longest_first' trims the longer text (nearly always the story) from its end. A text that spells a
    special token (`<|im_end|>`, `[SEP]`) is read as those characters.
    """
    return tokenizer([p for p, _ in pairs], [r for _, r in pairs], truncation="longest_first", max_length=max_length,
                     padding=True, return_tensors="pt", split_special_tokens=True)  # fmt: skip


def story_windows(text: str, n: int) -> list[str]:
    """Consecutive windows of n words (whitespace-split, rejoined with spaces); one window when n <= 0 or the text
    is short. A last window under n/2 words joins the one before it, so no score rests on a few words."""
    words = text.split()
    if n <= 0 or len(words) <= n:
        return [text]
    chunks = [words[i : i + n] for i in range(0, len(words), n)]
    if len(chunks[-1]) < n / 2:
        tail = chunks.pop()
        chunks[-1] += tail
    return [" ".join(c) for c in chunks]


def _window_words(model: nn.Module) -> int:
    return int(getattr(getattr(model, "module", model).config, "reward_window_words", 0) or 0)


@torch.no_grad()
def score(model: nn.Module, tokenizer, prompts: list[str], responses: list[str], max_length: int = 256,
          batch_size: int = 32, progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Reward of each (prompt, response), batched, no grad. Returns (N,) float32 on the CPU.

    A model trained with window_words scores a long response as the mean over its windows. Each distinct
    (prompt, window) is encoded once: comparisons share stories, and the same text then gets exactly the same
    score wherever it recurs (two copies batched with different padding could differ in the last bits, and an
    exact tie would become an arbitrary win or loss)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pieces = [story_windows(r, _window_words(model)) for r in responses]
    owner = torch.tensor([i for i, ws in enumerate(pieces) for _ in ws], dtype=torch.long)  # (W,) response of each window
    distinct: dict[tuple[str, str], int] = {}
    slots = [distinct.setdefault((prompts[i], w), len(distinct)) for i, ws in enumerate(pieces) for w in ws]
    text_of = torch.tensor(slots, dtype=torch.long)  # (W,) distinct text of each window
    flat = outputs(model, tokenizer, encode, list(distinct), max_length, batch_size, progress)  # (distinct,)
    counts = torch.tensor([len(ws) for ws in pieces], dtype=torch.float32)
    return torch.zeros(len(responses)).index_add_(0, owner, flat[text_of]) / counts


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """A reward model saved by `wprlhf rm train` (or any num_labels=1 sequence classifier). Returns (model, tokenizer)."""
    model, tokenizer, _ = load(path, 1, device, "reward model", "rm train")
    return model, tokenizer


def reward_fn_from_model(path: str | Path, max_length: int | None = None, batch_size: int = 32):
    """`rm:DIR` as a PPO reward: reward_fn(prompts, responses) -> list[float], batched, no grad."""
    model, tokenizer, trained = load(path, 1, "cpu", "reward model", "rm train")
    length = max_length or trained.get("max_length", 256)

    def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
        return score(model, tokenizer, prompts, responses, length, batch_size).tolist()

    return reward_fn


# ==========================================================================================================
# training


def fresh_head(config, num_labels: int, head_config: dict) -> tuple[nn.Module, object]:
    """(model, tokenizer): config.model's backbone with a fresh head of num_labels outputs, head_config set on its
    config, its lower freeze_layers layers frozen. UserError when max_length exceeds its positions."""
    model, tokenizer = load_reward_backbone(config.model, num_labels=num_labels, seed=config.seed)
    limit = position_limit(model)
    if limit is not None and config.max_length > limit:  # past a learned position table: an IndexError mid-batch
        raise UserError(f"--max-length {config.max_length} exceeds the {limit} positions of {config.model}; set "
                        f"--max-length {limit} or less")  # fmt: skip
    for key, value in head_config.items():
        setattr(model.config, key, value)
    freeze_lower_layers(model, config.freeze_layers)
    return model, tokenizer


def batch_stats(acc, loss: torch.Tensor, credit: torch.Tensor, share: float) -> dict[str, float]:
    """A step's loss (this process's, as its `share` of the global batch) and accuracy, over every process. credit
    has one entry per example with a right answer (labelled ties have none): no accuracy when none has."""
    stats = reduce_sum(acc, {"loss": loss.item() * share, "credit": float(credit.sum()), "counted": len(credit)})
    return {"loss": stats["loss"], **({"accuracy": stats["credit"] / stats["counted"]} if stats["counted"] else {})}


def fit(config, out_dir: Path, label: Label, train_set: list, val_set: list, rng: random.Random, *, name: str,
        encode: Callable, validate: Callable, saved: dict, head_config: dict, dropout: bool,
        each_epoch: Callable[[random.Random], list] | None = None, progress: bool = True):  # fmt: skip
    """Train a fresh head on config.model with AdamW, a linear warm-up and decay, and clipping at norm 1.

    config: a RewardConfig or ClassifierConfig (model, max_length, epochs, batch_size, lr, weight_decay,
    warmup_ratio, eval_every, freeze_layers, seed, device; gradient_checkpointing where it has one). label: the
    label type of train_set's examples. rng: draws the batches (and whatever each_epoch draws), so a caller that
    goes on using it after training gets the same draws as before. name: 'reward model' or 'classifier', in
    messages. encode(tokenizer, texts, max_length): a padded batch. validate(model, tokenizer): the evaluation of
    val_set, a dict with loss and accuracy, logged as val_loss / val_accuracy every eval_every steps and at the last
    (never when val_set is empty). saved: written as train_config.json. head_config: set on the model's config
    (saved with it). dropout: on while training (a classifier) or off (a reward model: comparisons are noisy
    enough). each_epoch(rng): the examples of one epoch (default: train_set).

    Under `accelerate launch` every process draws the same global batches and trains on its slice of each;
    only the main process writes. Returns (model, tokenizer) in eval mode on the main process once every process
    has finished, None on the others.
    """
    from tqdm.auto import tqdm

    config, acc = prepare_precision(config)
    precision = config.mixed_precision
    saved = {**saved, "mixed_precision": precision}  # what ran, not 'auto'
    device, main = device_of(acc), acc.is_main_process
    model, tokenizer = fresh_head(config, label.num_labels, head_config)
    model.to(device)
    # Only RewardConfig has the setting: a classifier's encoders are small enough to keep their activations.
    if getattr(config, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)

    total_steps = math.ceil(len(train_set) / config.batch_size) * config.epochs
    warmup = max(1, int(config.warmup_ratio * total_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    # DDP under `accelerate launch`: engine.model is the wrapped model, `model` stays the bare one.
    engine = Engine(acc, model, {"grad_norm": (params, config.lr)}, weight_decay=config.weight_decay,
                    schedule=lambda s: linear_schedule(s, total_steps, warmup), max_grad_norm=1.0,
                    what=f"{name.replace(' ', '-')} training",
                    fix="Try a lower --lr, and check the training data for empty or garbled texts.")  # fmt: skip
    processes = f", {acc.num_processes} processes" if acc.num_processes > 1 else ""
    files = RunFiles(out_dir, resumable=False, held_ok=True)  # the command or the pipeline phase owns the folder
    files.open({TRAIN_CONFIG_FILE: saved}, label.metric_names,
               announce=f"{name} {config.model}: {len(train_set)} training / {len(val_set)} validation {label.unit}, "
                        f"{total_steps} steps on {device}{processes}, mixed precision {precision}")  # fmt: skip

    def forward(texts: list) -> torch.Tensor:
        return head_outputs(engine.model, encode(tokenizer, texts, config.max_length))

    torch.manual_seed(config.seed)  # dropout masks
    step, seen, started = 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{name} train", unit="step", disable=not (progress and main))
    last_val = None
    for _ in range(config.epochs):
        for batch in label.batches(each_epoch(rng) if each_epoch else train_set, config.batch_size, rng):
            if len(batch) < acc.num_processes:
                continue  # a last batch too small to give every process an example
            model.train(dropout)
            local = batch[acc.process_index :: acc.num_processes]
            # transformers recomputes a checkpointed layer only in train mode, and a reward model trains in eval mode
            # (no dropout): this switches those layers alone (a no-op without gradient checkpointing).
            with checkpointing(model):
                loss, credit = label.batch_loss(forward, local)
            engine.backward(loss * len(local) / len(batch))  # the local mean as a share of the global batch's mean
            engine.step(step + 1, schedule=True, loss=loss)
            step += 1
            seen += len(batch)
            row = {"examples": seen, **batch_stats(acc, loss, credit, len(local) / len(batch)), "lr": engine.lr,
                   "elapsed_s": time.perf_counter() - started}  # fmt: skip
            if val_set and (step % config.eval_every == 0 or step == total_steps):
                result = validate(model, tokenizer)
                row.update({f"val_{k}": result[k] for k in ("loss", "accuracy") if k in result})
            files.log(step, row)
            bar.update(1)
            # The last held-out accuracy measured (every eval_every steps), not a 'nan' on the steps between.
            last_val = row.get("val_accuracy", last_val)
            bar.set_postfix(loss=f"{row['loss']:.3f}", **({} if last_val is None else {"val_acc": f"{last_val:.3f}"}))
    bar.close()
    files.close()
    model.eval()
    acc.wait_for_everyone()
    return (model, tokenizer) if main else None


def _random_windows(comparisons: list[Comparison], n: int, rng: random.Random) -> list[Comparison]:
    """Each response replaced by one of its windows, drawn at random, the same window wherever a story recurs
    (so a batch still encodes a story shared by several comparisons once). A one-window response draws nothing:
    data of short responses trains exactly as with no windows."""
    chosen: dict[str, str] = {}
    for c in comparisons:
        for r in c.responses:
            if r not in chosen:
                windows = story_windows(r, n)
                chosen[r] = windows[0] if len(windows) == 1 else rng.choice(windows)
    return [dataclasses.replace(c, responses=[chosen[r] for r in c.responses]) for c in comparisons]


def fold_normalization(model: nn.Module, mean: float, std: float) -> None:
    """Rescale the head so that its rewards r (what `score` gives now) become (r - mean) / std; a bias-free head
    keeps the shift in config.reward_offset (applied by wprlhf's `score`).

    A model normalised before (a reward_offset already set) is normalised again from its current rewards: with
    r = h - o (h the head's output, o the old offset), (r - mean) / std = h / std - (o + mean) / std, so the new
    offset keeps the old one (overwriting it left the scores off-centre by o / std). config.reward_normalization
    stays the map from the head's first, raw outputs to the rewards: (raw - mean) / std, composed over the folds.
    """
    head = getattr(model, "classifier", None) or model.score
    if isinstance(head, nn.Sequential) or not isinstance(head, nn.Linear):  # e.g. RoBERTa's two-layer head
        head = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    shift = mean + getattr(model.config, "reward_offset", 0.0)  # in the head's current output units
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is not None:
            head.bias.sub_(shift).div_(std)
            model.config.reward_offset = 0.0
        else:
            model.config.reward_offset = shift / std
    before = getattr(model.config, "reward_normalization", None) or {"mean": 0.0, "std": 1.0}
    # raw -> (raw - M) / S -> ((raw - M) / S - mean) / std = (raw - (M + mean * S)) / (S * std)
    model.config.reward_normalization = {"mean": before["mean"] + mean * before["std"], "std": before["std"] * std}


def resolve_comparisons(source: str, keep_meta: bool, pairs_per_prompt: int = SHIPPED_PAIRS_PER_PROMPT) -> list[Comparison]:
    """Comparisons from a file, hub id, or directory (comparisons_train.csv.gz / comparisons.jsonl / karma);
    pairs_per_prompt other than 20: comparisons_train's prompts' karma pairs rebuilt (`RewardConfig`)."""
    path = Path(source)
    if pairs_per_prompt != SHIPPED_PAIRS_PER_PROMPT:
        return _rebuilt_pairs(path, keep_meta, pairs_per_prompt)
    if path.is_dir():
        for name in ("comparisons_train.csv.gz", "comparisons_train.csv", "comparisons.jsonl"):
            if (path / name).exists():
                return load_comparisons(path / name, keep_meta=keep_meta)
        from ..data import karma_pairs, load_responses

        return karma_pairs(load_responses(path, keep_meta=keep_meta))
    return load_comparisons(source, keep_meta=keep_meta)


def _rebuilt_pairs(path: Path, keep_meta: bool, pairs_per_prompt: int) -> list[Comparison]:
    """Every qualifying karma pair (at most pairs_per_prompt a prompt; 0 = all) of comparisons_train's prompts,
    from prompt_responses in the same directory. Raises UserError when path is no such directory."""
    from ..data import karma_pairs_of, load_responses

    train_file = path / "comparisons_train.csv.gz"
    if not (path.is_dir() and train_file.exists() and any(path.glob("prompt_responses.*"))):
        raise UserError(f"--pairs-per-prompt {pairs_per_prompt} rebuilds karma pairs, so --data must be a directory "
                        f"holding comparisons_train.csv.gz and prompt_responses.csv.gz; {path} is not; leave "
                        f"--pairs-per-prompt at {SHIPPED_PAIRS_PER_PROMPT} for a comparisons file")  # fmt: skip
    return karma_pairs_of(load_comparisons(train_file, keep_meta=True), load_responses(path, keep_meta=keep_meta),
                          max_pairs_per_prompt=pairs_per_prompt or None)  # fmt: skip


def train(config: RewardConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train a reward model on comparisons; save it (HF format, normalised), metrics.csv, and held-out eval."""
    out_dir = Path(out_dir)
    if not config.data:
        raise UserError("rm train needs --data: a comparisons file, a directory or a hub id")
    comparisons = resolve_comparisons(config.data, config.keep_meta, config.pairs_per_prompt)
    _require_decided(comparisons, config.data, 0)  # none, or only ties: nothing to learn which is better from
    rng = random.Random(config.seed)
    train_set, val_set = split_by_prompt(comparisons, config.val_fraction, seed=config.seed)
    if not train_set:
        raise UserError(f"val_fraction {config.val_fraction} holds out every one of the {len(comparisons)} "
                        "comparisons' prompts: none is left to train on; lower --val-fraction or give more data")  # fmt: skip
    if config.max_examples and len(train_set) > config.max_examples:
        train_set = rng.sample(train_set, config.max_examples)
    if len(val_set) > 500:  # enough for a curve; keeps each validation pass short
        # Drawn across the held-out prompts, by an RNG of its own (training's draws stay as they were): the first 500
        # would be a few prompts' pairs where a prompt has hundreds (--pairs-per-prompt 0), and so a CI of little use.
        val_set = [val_set[i] for i in sorted(random.Random(config.seed).sample(range(len(val_set)), 500))]
    saved = {**dataclasses.asdict(config), "train_comparisons": len(train_set), "val_comparisons": len(val_set)}
    windows = (lambda rng: _random_windows(train_set, config.window_words, rng)) if config.window_words else None

    def validate(model, tokenizer) -> dict:
        """Every story read whole, exactly as `rm eval` will (scoring only the opening made a learning model look
        like it was not learning)."""
        return evaluate(model, tokenizer, val_set, config.max_length)

    fitted = fit(config, out_dir, comparison_label(train_set, config.pair_weight == "strength"), train_set, val_set, rng, name="reward model",
                 encode=encode, validate=validate, saved=saved, dropout=False, each_epoch=windows,
                 head_config={"reward_window_words": config.window_words}, progress=progress)  # fmt: skip
    if fitted is None:  # the other processes' copies are never saved: normalising them would be wasted work
        return {}
    model, tokenizer = fitted
    # Normalise over the training data's responses (lm-human-preferences normalises over reference samples).
    texts = [(c.prompt, r) for c in train_set for r in c.responses]
    sample = rng.sample(texts, min(len(texts), config.normalize_samples))
    raw = score(model, tokenizer, [p for p, _ in sample], [r for _, r in sample], config.max_length)
    fold_normalization(model, float(raw.mean()), float(raw.std().clamp(min=1e-6)))
    held_out = evaluate(model, tokenizer, val_set, config.max_length) if val_set else {}
    if val_set:
        add_baselines(held_out, train_set, val_set, "the held-out comparisons")
    return save(model, tokenizer, out_dir, held_out)


# ==========================================================================================================
# evaluation


def evaluate(model, tokenizer, comparisons: list[Comparison], max_length: int, progress: bool = False,
             batch_size: int = 32, credits: list | None = None) -> dict:  # fmt: skip
    """A reward model's numbers on comparisons, every response read whole (`score`: the mean over its windows).
    `rm eval`, eval-heldout.json and the validation curve of `train` all come from here, so they agree.

    Returns accuracy (mean `choice_credit` over the comparisons with a winner: a best response that shares the
    top score with m others counts 1/(m+1)), n (those comparisons), ci95 (prompt bootstrap), loss (training's
    `Pairwise` or `BestOfK` loss, nats, labelled ties included with target 1/k; of the scores as they are, so a
    saved model's, normalised to std 1, differs from the training curve's), ties (labelled ties, left out of
    accuracy) and length_matched: accuracy, n and ci95 on the decided comparisons whose `length_ratio` is at
    most LENGTH_MATCHED_RATIO (only n when there are none). With no comparison there is only n = ties = 0; with
    only ties, no accuracy and ci95: the caller decides whether that is an error, so no NaN ever stands in for
    a number. credits, when given a list, receives the credit of each decided comparison, in order.
    """
    decided = [c for c in comparisons if not c.tie]
    result: dict = {"n": len(decided), "ties": len(comparisons) - len(decided)}
    if not comparisons:
        return result
    pairs = [(c.prompt, r) for c in comparisons for r in c.responses]
    flat = score(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs], max_length, batch_size, progress)
    row = {pair: i for i, pair in enumerate(pairs)}  # equal texts have equal scores: `score` encodes each once

    def whole(texts: list[tuple[str, str]]) -> torch.Tensor:
        """Training's forward, read as `score` reads: whole stories, no grad."""
        return flat.double()[[row[t] for t in texts]]

    loss, credit = comparison_label(comparisons).batch_loss(whole, comparisons)
    result["loss"] = float(loss)
    if credits is not None:
        credits.extend(credit.tolist())
    if decided:
        result = {**accuracy_fields(credit.tolist(), decided), **result}
        matched = [i for i, c in enumerate(decided) if length_ratio(c.responses) <= LENGTH_MATCHED_RATIO]
        result["length_matched"] = accuracy_fields([float(credit[i]) for i in matched], [decided[i] for i in matched])
    return result


def accuracy_fields(credit: Sequence[float], decided: Sequence[Comparison]) -> dict:
    """{accuracy, n, ci95} of the credits of decided comparisons (a prompt bootstrap); only n when there are none."""
    if not decided:
        return {"n": 0}
    accuracy, ci95 = accuracy_ci(credit, [group_of(c) for c in decided])
    return {"accuracy": accuracy, "n": len(decided), "ci95": ci95}


def group_of(comparison: Comparison) -> str:
    """What a bootstrap resamples a comparison with: its thread id, else its prompt's key (reposts together)."""
    return comparison.prompt_id or prompt_key(comparison.prompt)


def _padded(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-comparison scores (a list of N sequences of floats) -> scores (N, K) float64, valid (N, K) bool."""
    k = max(len(r) for r in rows)
    scores = torch.zeros(len(rows), k, dtype=torch.float64)
    valid = torch.zeros(len(rows), k, dtype=torch.bool)
    for i, r in enumerate(rows):
        scores[i, : len(r)] = torch.as_tensor(r, dtype=torch.float64)
        valid[i, : len(r)] = True
    return scores, valid


def always_first(comparisons: list[Comparison]) -> float | None:
    """Baseline: a constant predictor that always picks the first response, scored as every accuracy is
    (`choice_credit`). A set where it scores near 1 is one-sided, and any accuracy on it flatters. None when every
    comparison is a labelled tie."""
    decided = [c for c in comparisons if not c.tie]
    if not decided:
        return None
    return sum(c.best == 0 for c in decided) / len(decided)


def majority_position(comparisons: list[Comparison]) -> float | None:
    """Baseline: the constant predictor that always picks the position that wins most often on this set (always
    A, or always B, ...): the pairs' majority class. None when every comparison is a labelled tie."""
    decided = [c for c in comparisons if not c.tie]
    if not decided:
        return None
    wins = [c.best for c in decided]
    return max(wins.count(position) for position in set(wins)) / len(decided)


def set_baselines(train_set: list[Comparison] | None, test_set: list[Comparison], where: str) -> dict:
    """Every baseline of a comparison test set: the constant predictors always_first and majority_position, with a
    warning when the latter is high (`warn_if_degenerate`), longer_wins, and tfidf_logreg when there is a training
    set to fit it on."""
    out = {"always_first": always_first(test_set), "majority_position": majority_position(test_set),
           "longer_wins": longer_wins(test_set)}  # fmt: skip
    if train_set is not None:
        out["tfidf_logreg"] = tfidf_logreg(train_set, test_set)
    warn_if_degenerate(out["majority_position"], "always picking the same position", where,
                       "shuffle which position the better response takes")  # fmt: skip
    return out


def add_baselines(result: dict, train_set: list[Comparison] | None, test_set: list[Comparison], where: str) -> None:
    """`set_baselines` into an `evaluate` result: on test_set, and on its length-matched subset beside the
    model's own accuracy there."""
    result["baselines"] = set_baselines(train_set, test_set, where)
    matched = [c for c in test_set if not c.tie and length_ratio(c.responses) <= LENGTH_MATCHED_RATIO]
    if matched and "length_matched" in result:
        result["length_matched"]["baselines"] = set_baselines(train_set, matched, f"the length-matched part of {where}")


def scorer_credit(score_texts: Callable[[list[tuple[str, str]]], Sequence[float]],
                  comparisons: list[Comparison]) -> torch.Tensor:  # fmt: skip
    """The `choice_credit` (M,) of each of the M comparisons that are not labelled ties, by a scorer of responses:
    score_texts([(prompt, response), ...]) -> one float a response (a baseline reads the response alone)."""
    decided = [c for c in comparisons if not c.tie]
    flat = torch.as_tensor(list(score_texts([(c.prompt, r) for c in decided for r in c.responses])),
                           dtype=torch.float64)  # fmt: skip
    scores, valid = _padded(flat.split([len(c.responses) for c in decided]))
    return choice_credit(scores, torch.tensor([c.best for c in decided], dtype=torch.long), valid)


def word_count(pairs: list[tuple[str, str]]) -> list[int]:
    """The length baseline's score of each (prompt, response): the response's words (longer wins; equal ties)."""
    return [len(response.split()) for _, response in pairs]


def longer_wins(comparisons: list[Comparison]) -> float | None:
    """Baseline: the longest response (in words) is the best; equal lengths tie (`choice_credit`: a best response
    as long as m others counts 1/(m+1)). None when every comparison is a labelled tie."""
    if all(c.tie for c in comparisons):
        return None
    return float(scorer_credit(word_count, comparisons).mean())


def tfidf_scorer(train_set: list[Comparison]) -> Callable[[list[tuple[str, str]]], np.ndarray] | None:
    """Baseline: a linear score on each response's TF-IDF (word 1-2 grams), fit by logistic regression on the
    (best - other) differences of the training comparisons. None when the data is too small to fit (no
    decided comparison, or no term in two responses)."""
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train_set = [c for c in train_set if not c.tie]
    if not train_set:
        return None
    vectorizer = TfidfVectorizer(min_df=2, max_features=50000, sublinear_tf=True, ngram_range=(1, 2))
    try:
        vectorizer.fit([r for c in train_set for r in c.responses])
    except ValueError:  # every term pruned: too little text for the baseline
        return None
    best = vectorizer.transform([c.responses[c.best] for c in train_set for _ in range(len(c.responses) - 1)])
    others = vectorizer.transform([r for c in train_set for i, r in enumerate(c.responses) if i != c.best])
    x = best - others
    # Both signs of every difference, no intercept: the score must not depend on the order responses came in.
    clf = LogisticRegression(C=1.0, max_iter=2000, fit_intercept=False)
    clf.fit(vstack([x, -x]), np.concatenate([np.ones(x.shape[0]), np.zeros(x.shape[0])]))
    return lambda pairs: clf.decision_function(vectorizer.transform([response for _, response in pairs]))


def tfidf_logreg(train_set: list[Comparison], test_set: list[Comparison]) -> float | None:
    """The TF-IDF baseline's accuracy on test_set (`tfidf_scorer` fit on train_set); a test comparison counts its
    `choice_credit`. None when it cannot be fit or every test comparison is a labelled tie."""
    scorer = tfidf_scorer(train_set) if any(not c.tie for c in test_set) else None
    return None if scorer is None else float(scorer_credit(scorer, test_set).mean())


def best_of_accuracy(model, tokenizer, responses, max_length: int, exclude_prompts: set[str], seed: int = 0) -> dict:
    """The seed's classifier metric: balanced accuracy of 'top-karma response or not' on a balanced set.

    Per prompt (outside exclude_prompts): its rank-0 response and one random other; 'top' = score above the
    median score of the set, and a score exactly at the median is half a 'top' (`choice_credit` of the two
    answers, median vs score). Balanced by construction, so chance is 50%.
    """
    rng = random.Random(seed)
    by_prompt: dict[str, list] = {}
    for r in responses:
        if prompt_key(r.prompt) not in exclude_prompts and r.rank is not None:
            by_prompt.setdefault(r.prompt_id, []).append(r)
    items, labels = [], []
    for group in by_prompt.values():
        top = [r for r in group if r.rank == 0]
        rest = [r for r in group if r.rank != 0]
        if top and rest:
            items += [top[0], rng.choice(rest)]
            labels += [1, 0]
    if not items:
        raise UserError("--best-of needs scored responses (response_rank) for prompts the model was not trained on")
    scores = score(model, tokenizer, [r.prompt for r in items], [r.response for r in items], max_length)
    # Each item chooses between 'not top' (scored at the median) and 'top' (its score); the label says which is right.
    median = float(np.median(scores.numpy()))  # numpy's: the mean of the two middle scores (torch's is the lower)
    answers = torch.stack([torch.full_like(scores, median), scores], dim=1)  # (N, 2)
    target = torch.tensor(labels)
    credit = choice_credit(answers, target)
    tpr, tnr = credit[target == 1].mean(), credit[target == 0].mean()
    return {"balanced_accuracy": float((tpr + tnr) / 2), "n": len(items)}


def run_eval(model_dir: str | Path, data: str, out: str | Path | None = None, max_examples: int = 0,
             max_length: int | None = None, best_of: bool = False, keep_meta: bool = False,
             train_data: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    """`wprlhf rm eval`: accuracy with CI on `data`, on raw and cleaned text, against baselines; writes JSON.

    Raises UserError naming `data` when it holds nothing to score (no rows, or only labelled ties): an accuracy
    of nothing is no number, and NaN is not JSON."""
    model_dir = Path(model_dir)
    model, tokenizer, trained = load(model_dir, 1, "auto", "reward model", "rm train")
    max_length = max_length or trained.get("max_length", 256)
    name = Path(data).name.split(".")[0] if Path(data).exists() else data.replace("/", "_")
    out = Path(out) if out else model_dir / f"eval-{name}{'-bestof' if best_of else ''}.json"
    train_source = train_data or trained.get("data")

    if best_of:
        from ..data import load_responses

        responses = load_responses(data, keep_meta=keep_meta)
        if not responses:
            raise UserError(f"{data} holds no responses; --best-of needs rows of prompt_id, prompt, response_id, "
                            "response and response_rank")  # fmt: skip
        exclude = set()
        if train_source:
            exclude = {prompt_key(c.prompt) for c in resolve_comparisons(train_source, keep_meta=True)}
        result = best_of_accuracy(model, tokenizer, responses, max_length, exclude)
        result["clean"] = not keep_meta
    else:
        test = resolve_comparisons(data, keep_meta=keep_meta)
        if max_examples:
            test = test[:max_examples]
        _require_decided(test, data, max_examples)
        result = evaluate(model, tokenizer, test, max_length, progress=progress)
        result["clean"] = not keep_meta
        if not keep_meta:
            raw = resolve_comparisons(data, keep_meta=True)[: len(test)]
            result["accuracy_raw"] = evaluate(model, tokenizer, raw, max_length)["accuracy"]
        train_set = resolve_comparisons(train_source, keep_meta=keep_meta) if train_source else None
        add_baselines(result, train_set, test, data)
    result.update(model=str(model_dir), data=data, max_length=max_length)
    write_json_atomic(out, result)
    return result


def _require_decided(comparisons: list[Comparison], data: str, max_examples: int) -> None:
    """A UserError naming the file when no comparison has a winner to be right about."""
    first = f"the first {max_examples} comparisons of " if max_examples else ""
    if not comparisons:
        raise UserError(f"{data} holds no comparisons, so there is no accuracy to measure; it needs rows of prompt, "
                        "response_a, response_b, label (0 if A is better, 1 if B) or JSONL lines of prompt, "
                        "responses, best")  # fmt: skip
    if all(c.tie for c in comparisons):
        raise UserError(f"{first}{data} are all ties ({len(comparisons)}), so there is no accuracy to measure; "
                        "accuracy needs comparisons with a best response (tie false)")  # fmt: skip
