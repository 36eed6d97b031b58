"""Reward models learned from comparisons: a scalar head on an encoder or causal LM, trained, evaluated, normalised.

A comparison is k >= 2 responses to one prompt and the index of the best (`data.Comparison`). The loss is a
softmax over the k scores with the best as target: for k = 2 that is exactly Bradley-Terry,
-log sigmoid(r_best - r_other); for k = 4 it is lm-human-preferences' best-of-4 loss. After training, scores are
normalised to mean 0 / std 1 over a reference set of responses, folded into the head's weights, so that
`AutoModelForSequenceClassification.from_pretrained(DIR)` gives normalised rewards with no wprlhf code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import write_json_atomic
from .core import bootstrap_ci, linear_schedule
from .data import Comparison, load_comparisons, prompt_key, split_by_prompt
from .distributed import check_finite, device_of, make_accelerator, reduce_sum
from .errors import UserError
from .metrics import RM_METRIC_NAMES, MetricsLogger
from .models import freeze_lower_layers, load_reward_backbone, resolve_device

TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class RewardConfig:
    """`wprlhf rm train`: what to learn from, which backbone, how long. The defaults are the CPU recipe that beat
    TF-IDF on karma pairs (README: 6,000 pairs read in 80-word windows of 128 tokens, ~8 minutes on 2 cores)."""

    data: str = ""
    """Comparisons: a pair CSV (prompt, response_a, response_b, label), comparisons JSONL, a directory holding
    comparisons_train.csv.gz, or a hub id."""
    model: str = "minilm"
    """Backbone: 'minilm' (embedded all-MiniLM-L6-v2), 'smollm2', 'tiny', a local directory or a hub id."""
    max_length: int = 128
    """Tokens of prompt + response (or of prompt + window); longer inputs lose the end of the response first."""
    max_examples: int = 6000
    """Use at most this many training comparisons (0 = all), drawn at random with `seed`."""
    epochs: int = 1
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
    lr: float = 5e-5
    weight_decay: float = 0.01
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
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.max_length < 16:
            raise UserError(f"max_length {self.max_length} is too short for a prompt and a response; use >= 16")
        for name in ("batch_size", "epochs", "eval_every"):  # eval_every 0 would divide by zero mid-training
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; "
                                f"set --{name.replace('_', '-')} to 1 or more")  # fmt: skip
        if self.normalize_samples < 2:
            raise UserError(f"normalize_samples must be >= 2 (a std needs two scores), got {self.normalize_samples}")
        for name in ("lr", "weight_decay", "warmup_ratio", "val_fraction"):
            if not math.isfinite(getattr(self, name)):  # a NaN would pass every range check and reach the JSON
                raise UserError(f"{name} must be a finite number, got {getattr(self, name)}")


# ==========================================================================================================
# the loss, and the one rule for equal scores


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


def _padded(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-comparison scores (a list of N sequences of floats) -> scores (N, K) float64, valid (N, K) bool."""
    k = max(len(r) for r in rows)
    scores = torch.zeros(len(rows), k, dtype=torch.float64)
    valid = torch.zeros(len(rows), k, dtype=torch.bool)
    for i, r in enumerate(rows):
        scores[i, : len(r)] = torch.as_tensor(r, dtype=torch.float64)
        valid[i, : len(r)] = True
    return scores, valid


def comparison_loss(scores: torch.Tensor, best: torch.Tensor, valid: torch.Tensor, tie: torch.Tensor | None = None):
    """Cross-entropy of softmax(scores) against the labeler's choice; Bradley-Terry when k = 2.

    scores (N, K) float; best (N,) int64; valid (N, K) bool, False where a comparison has fewer than K
    responses; tie (N,) bool or None: a tie's target is uniform over its responses (BT with target 1/2).
    Returns the mean loss (scalar) and accuracy: the mean `choice_credit` of the rows that are not labelled ties
    (a best response sharing the top score with m others counts 1/(m+1)); 0 when every row is a tie.
    """
    logits = scores.masked_fill(~valid, -math.inf)
    logp = torch.log_softmax(logits, dim=-1)
    target = F.one_hot(best, scores.shape[1]).to(logp.dtype)
    if tie is not None and tie.any():
        uniform = valid.to(logp.dtype) / valid.sum(-1, keepdim=True)
        target = torch.where(tie[:, None], uniform, target)
    loss = -(target * logp.masked_fill(~valid, 0.0)).sum(-1).mean()
    decided = ~tie if tie is not None else torch.ones_like(best, dtype=torch.bool)
    credit = choice_credit(scores, best, valid) * decided
    accuracy = credit.sum() / decided.sum().clamp(min=1)
    return loss, accuracy


# ==========================================================================================================
# scoring


def encode(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """(prompt, response) text pairs -> padded input_ids / attention_mask (B, T).

    Truncation 'longest_first' trims the longer text (nearly always the story) from its end.
    """
    return tokenizer(prompts, responses, truncation="longest_first", max_length=max_length, padding=True,
                     return_tensors="pt")  # fmt: skip


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


def _forward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
    bare = getattr(model, "module", model)  # DDP-wrapped while training
    return scores - getattr(bare.config, "reward_offset", 0.0)


@torch.no_grad()
def score(model: nn.Module, tokenizer, prompts: list[str], responses: list[str], max_length: int = 256,
          batch_size: int = 32, progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Reward of each (prompt, response), batched, no grad. Returns (N,) float32 on the CPU.

    A model trained with window_words scores a long response as the mean over its windows. Each distinct
    (prompt, window) is encoded once: comparisons share stories, and the same text then gets exactly the same
    score wherever it recurs (two copies batched with different padding could differ in the last bits, and an
    exact tie would become an arbitrary win or loss)."""
    from tqdm.auto import tqdm

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pieces = [story_windows(r, _window_words(model)) for r in responses]
    owner = torch.tensor([i for i, ws in enumerate(pieces) for _ in ws], dtype=torch.long)  # (W,) response of each window
    distinct: dict[tuple[str, str], int] = {}
    slots = [distinct.setdefault((prompts[i], w), len(distinct)) for i, ws in enumerate(pieces) for w in ws]
    text_of = torch.tensor(slots, dtype=torch.long)  # (W,) distinct text of each window
    texts = list(distinct)
    device = next(model.parameters()).device
    # Sorting by length keeps padding small; results are put back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1]))
    flat = torch.empty(len(texts))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        batch = encode(tokenizer, [texts[i][0] for i in idx], [texts[i][1] for i in idx], max_length)
        flat[idx] = _forward_scores(model, {k: v.to(device) for k, v in batch.items()}).cpu()
    counts = torch.tensor([len(ws) for ws in pieces], dtype=torch.float32)
    return torch.zeros(len(responses)).index_add_(0, owner, flat[text_of]) / counts


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """A reward model saved by `wprlhf rm train` (or any num_labels=1 sequence classifier). Returns (model, tokenizer)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"reward model directory {path} has no config.json; train one with `wprlhf rm train --out {path}`")
    model, tokenizer = load_reward_backbone(str(path))
    return model.to(device).eval(), tokenizer


def reward_fn_from_model(path: str | Path, max_length: int | None = None, batch_size: int = 32):
    """`rm:DIR` as a PPO reward: reward_fn(prompts, responses) -> list[float], batched, no grad."""
    model, tokenizer = load_reward_model(path)
    trained = _read_train_config(Path(path))
    length = max_length or trained.get("max_length", 256)

    def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
        return score(model, tokenizer, prompts, responses, length, batch_size).tolist()

    return reward_fn


def _read_train_config(path: Path) -> dict:
    file = path / TRAIN_CONFIG_FILE
    return json.loads(file.read_text()) if file.exists() else {}


# ==========================================================================================================
# training


def _batches(comparisons: list[Comparison], batch_size: int, rng: random.Random):
    """Shuffled batches that keep a prompt's comparisons together: pairs of one prompt share stories, and
    `_comparison_batch` encodes each distinct story of a batch once (about 1.4x fewer encodes on karma pairs)."""
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


def _comparison_batch(model, tokenizer, batch: list[Comparison], max_length: int, device):
    """Score every distinct (prompt, response) of a batch in one forward. Returns loss, accuracy."""
    K = max(len(c.responses) for c in batch)
    texts: dict[tuple[str, str], int] = {}
    index = torch.zeros(len(batch), K, dtype=torch.long)
    valid = torch.zeros(len(batch), K, dtype=torch.bool)
    for i, c in enumerate(batch):
        for j, r in enumerate(c.responses):
            index[i, j] = texts.setdefault((c.prompt, r), len(texts))
            valid[i, j] = True
    enc = encode(tokenizer, [p for p, _ in texts], [r for _, r in texts], max_length)
    flat = _forward_scores(model, {k: v.to(device) for k, v in enc.items()})  # (distinct texts,)
    scores = flat[index.to(device)]  # (B, K); padding slots point at text 0 and are masked by `valid`
    best = torch.tensor([c.best for c in batch], device=device)
    tie = torch.tensor([c.tie for c in batch], device=device)
    return comparison_loss(scores, best, valid.to(device), tie)


def validate(model, tokenizer, comparisons: list[Comparison], max_length: int, batch_size: int = 32) -> dict:
    """The validation curve's point: `evaluate`'s loss and accuracy as val_loss / val_accuracy, so the curve
    reads every story whole, exactly as `rm eval` will (scoring only the opening made a learning model look
    like it was not learning). Keys are absent when there is nothing to measure."""
    model.eval()
    result = evaluate(model, tokenizer, comparisons, max_length, batch_size=batch_size)
    return {f"val_{k}": result[k] for k in ("loss", "accuracy") if k in result}


def fold_normalization(model: nn.Module, mean: float, std: float) -> None:
    """Rescale the head so that its outputs become (r - mean) / std; a bias-free head keeps the shift in
    config.reward_offset (applied by wprlhf's `score`)."""
    head = getattr(model, "classifier", None) or model.score
    if isinstance(head, nn.Sequential) or not isinstance(head, nn.Linear):  # e.g. RoBERTa's two-layer head
        head = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is not None:
            head.bias.sub_(mean).div_(std)
            model.config.reward_offset = 0.0
        else:
            model.config.reward_offset = mean / std
    model.config.reward_normalization = {"mean": mean, "std": std}


def resolve_comparisons(source: str, keep_meta: bool) -> list[Comparison]:
    """Comparisons from a file, hub id, or directory (comparisons_train.csv.gz / comparisons.jsonl / karma)."""
    path = Path(source)
    if path.is_dir():
        for name in ("comparisons_train.csv.gz", "comparisons_train.csv", "comparisons.jsonl"):
            if (path / name).exists():
                return load_comparisons(path / name, keep_meta=keep_meta)
        from .data import karma_pairs, load_responses

        return karma_pairs(load_responses(path, keep_meta=keep_meta))
    return load_comparisons(source, keep_meta=keep_meta)


def train(config: RewardConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train a reward model on comparisons; save it (HF format, normalised), metrics.csv, and held-out eval."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if not config.data:
        raise UserError("rm train needs --data: a comparisons file, a directory or a hub id")
    comparisons = resolve_comparisons(config.data, config.keep_meta)
    if not comparisons:
        raise UserError(f"{config.data} holds no comparisons")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    train_set, val_set = split_by_prompt(comparisons, config.val_fraction, seed=config.seed)
    if config.max_examples and len(train_set) > config.max_examples:
        train_set = rng.sample(train_set, config.max_examples)
    val_set = val_set[:500]  # enough for a curve; keeps each validation pass short
    acc = make_accelerator(resolve_device(config.device))
    device, main = device_of(acc), acc.is_main_process
    model, tokenizer = load_reward_backbone(config.model, num_labels=1, seed=config.seed)
    model.config.reward_window_words = config.window_words
    freeze_lower_layers(model, config.freeze_layers)
    model.to(device)

    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total_steps, warmup))
    trained, optimizer = acc.prepare(model, optimizer)  # DDP under `accelerate launch`; `model` stays the bare one
    logger = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = {**dataclasses.asdict(config), "train_comparisons": len(train_set), "val_comparisons": len(val_set)}
        write_strict_json(out_dir / TRAIN_CONFIG_FILE, saved)
        logger = MetricsLogger(out_dir, names=RM_METRIC_NAMES)
        print(f"reward model {config.model}: {len(train_set)} training / {len(val_set)} validation comparisons, "
              f"{total_steps} steps" + (f", {acc.num_processes} processes" if acc.num_processes > 1 else ""), flush=True)  # fmt: skip

    step, seen, started = 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="rm train", unit="step", disable=not (progress and main))
    for _ in range(config.epochs):
        epoch_set = _random_windows(train_set, config.window_words, rng) if config.window_words else train_set
        # Every process draws the same global batches (same rng) and trains on its slice of each.
        for batch in _batches(epoch_set, config.batch_size, rng):
            if len(batch) < acc.num_processes:
                continue  # a last batch too small to give every process a comparison
            # eval() everywhere: dropout off, as for the policy; the comparisons are noisy enough already.
            model.eval()
            local = batch[acc.process_index :: acc.num_processes]
            loss, accuracy = _comparison_batch(trained, tokenizer, local, config.max_length, device)
            # The local mean as a share of the global batch's mean; DDP averages over processes, hence * processes.
            acc.backward(loss * len(local) / len(batch) * acc.num_processes)
            grad_norm = acc.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
            check_finite(acc, step + 1, "reward-model training", "Try a lower --lr, and check the comparisons for "
                         "empty or garbled responses.", loss=loss, **({} if grad_norm is None else {"grad_norm": grad_norm}))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(batch)
            n = len(local) / len(batch)
            decided = sum(not c.tie for c in local)  # a labelled tie has no right answer: out of the accuracy
            stats = reduce_sum(acc, {"loss": loss.item() * n, "credit": accuracy.item() * decided, "decided": decided})
            row = {"loss": stats["loss"], "lr": schedule.get_last_lr()[0], "elapsed_s": time.perf_counter() - started}
            if stats["decided"]:
                row["accuracy"] = stats["credit"] / stats["decided"]
            if step % config.eval_every == 0 or step == total_steps:
                row.update(validate(model, tokenizer, val_set, config.max_length))
            if main:
                logger.log(step, {"examples": seen, **row})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{row.get('val_accuracy', float('nan')):.3f}")
    bar.close()
    if main:
        logger.close()

    acc.wait_for_everyone()
    if not main:  # the others' copies are never saved: normalising and evaluating them would be wasted work
        return {}
    # Normalise over the training data's responses (lm-human-preferences normalises over reference samples).
    texts = [(c.prompt, r) for c in train_set for r in c.responses]
    sample = rng.sample(texts, min(len(texts), config.normalize_samples))
    raw = score(model, tokenizer, [p for p, _ in sample], [r for _, r in sample], config.max_length)
    mean, std = float(raw.mean()), float(raw.std().clamp(min=1e-6))
    fold_normalization(model, mean, std)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    held_out = evaluate(model, tokenizer, val_set, config.max_length) if val_set else {}
    if val_set:
        held_out["baselines"] = {"longer_wins": longer_wins(val_set), "tfidf_logreg": tfidf_logreg(train_set, val_set)}
    write_strict_json(out_dir / "eval-heldout.json", held_out)
    return held_out


# ==========================================================================================================
# evaluation


def evaluate(model, tokenizer, comparisons: list[Comparison], max_length: int, progress: bool = False,
             batch_size: int = 32) -> dict:  # fmt: skip
    """A reward model's numbers on comparisons, every response read whole (`score`: the mean over its windows).
    `rm eval`, eval-heldout.json and the validation curve of `train` all come from here, so they agree.

    Returns accuracy (mean `choice_credit` over the comparisons with a winner: a best response that shares the
    top score with m others counts 1/(m+1)), n (those comparisons), ci95 (prompt bootstrap), loss (mean
    `comparison_loss`, nats, labelled ties included with a uniform target; of the scores as they are, so a saved
    model's, normalised to std 1, differs from the training curve's) and ties (labelled ties, left out of
    accuracy). With no comparison there is only n = ties = 0; with only ties, no accuracy and ci95: the caller
    decides whether that is an error, so no NaN ever stands in for a number.
    """
    decided = [c for c in comparisons if not c.tie]
    result: dict = {"n": len(decided), "ties": len(comparisons) - len(decided)}
    if not comparisons:
        return result
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    flat = score(model, tokenizer, prompts, responses, max_length, batch_size, progress)
    scores, valid = _padded(flat.split([len(c.responses) for c in comparisons]))  # (N, K)
    best = torch.tensor([c.best for c in comparisons])
    tie = torch.tensor([c.tie for c in comparisons])
    loss, _ = comparison_loss(scores, best, valid, tie)
    result["loss"] = float(loss)
    if decided:
        credit = choice_credit(scores, best, valid)[~tie].tolist()
        lo, hi = bootstrap_ci(credit, [c.prompt_id or prompt_key(c.prompt) for c in decided])
        result = {"accuracy": float(np.mean(credit)), **result, "ci95": [lo, hi]}
    return result


def longer_wins(comparisons: list[Comparison]) -> float | None:
    """Baseline: the longest response (in words) is the best; equal lengths tie (`choice_credit`: a best response
    as long as m others counts 1/(m+1)). None when every comparison is a labelled tie."""
    decided = [c for c in comparisons if not c.tie]
    if not decided:
        return None
    scores, valid = _padded([[len(r.split()) for r in c.responses] for c in decided])
    return float(choice_credit(scores, torch.tensor([c.best for c in decided]), valid).mean())


def tfidf_logreg(train_set: list[Comparison], test_set: list[Comparison]) -> float | None:
    """Baseline: a linear score on each response's TF-IDF, fit by logistic regression on (best - other)
    differences; a test comparison counts its `choice_credit` (1 when its best response alone has the top score,
    1/(m+1) when m others share it). None when the data is too small to fit (no term in two responses)."""
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train_set = [c for c in train_set if not c.tie]
    test_set = [c for c in test_set if not c.tie]
    if not train_set or not test_set:
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
    flat = torch.from_numpy(clf.decision_function(vectorizer.transform([r for c in test_set for r in c.responses])))
    scores, valid = _padded(flat.split([len(c.responses) for c in test_set]))
    return float(choice_credit(scores, torch.tensor([c.best for c in test_set]), valid).mean())


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
    trained = _read_train_config(model_dir)
    max_length = max_length or trained.get("max_length", 256)
    model, tokenizer = load_reward_model(model_dir, resolve_device("auto"))
    name = Path(data).name.split(".")[0] if Path(data).exists() else data.replace("/", "_")
    out = Path(out) if out else model_dir / f"eval-{name}{'-bestof' if best_of else ''}.json"
    train_source = train_data or trained.get("data")

    if best_of:
        from .data import load_responses

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
        baselines = {"longer_wins": longer_wins(test)}
        if train_source:
            train_set = resolve_comparisons(train_source, keep_meta=keep_meta)
            baselines["tfidf_logreg"] = tfidf_logreg(train_set, test)
        result["baselines"] = baselines
    result.update(model=str(model_dir), data=data, max_length=max_length)
    write_strict_json(out, result)
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


def write_strict_json(path: Path, obj) -> None:
    """write_json_atomic, refusing NaN and infinities: Python writes them as bare NaN / Infinity, which strict
    JSON parsers (JavaScript's JSON.parse, jq, most languages) reject. Every number in eval JSON must mean
    something; a NaN reaching here is a bug, reported before the file is written."""
    json.dumps(obj, allow_nan=False, default=str)  # raises ValueError: Out of range float values ...
    write_json_atomic(path, obj)
