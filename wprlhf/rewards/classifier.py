"""A text classifier (negative / positive): train it, evaluate it against baselines, and use its log-odds as a reward.

The data is rows of `text,label` with label 1 = positive, 0 = negative (`../shared/data/imdb`, the hub's
`stanfordnlp/imdb`, any CSV / JSONL / Parquet with those columns). The model is a two-label
`AutoModelForSequenceClassification` (default: the embedded all-MiniLM-L6-v2 with a fresh head), saved in Hugging
Face format with `id2label = {0: negative, 1: positive}`, so plain `transformers` loads it. As a PPO reward it gives
the log-odds of positive, logit_pos - logit_neg = log p(pos) / p(neg): unbounded, unlike the probability, so
PPO keeps a gradient when a review is already clearly positive (trl's IMDB example uses the same logit).

It is a rating-type reward model: `reward_model.fit` trains it with the `BinaryRating` label type, and loading,
saving, batched scoring and the tie rule are reward_model's. What is the classifier's own is here: its config,
the text,label data, head + tail truncation, the log-odds reward, F1 and the baselines.
"""

from __future__ import annotations

import dataclasses
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import choice_credit
from ..data import read_rows
from ..engine import Hardware
from ..errors import UserError, check_numbers, warn_if_degenerate
from ..files import write_json_atomic
from .reward_model import BinaryRating, accuracy_ci, fit, load, outputs, save

TRAIN_FILES = ("imdb_train.csv", "train.csv", "train.jsonl", "train.parquet")
TEST_FILES = ("imdb_test.csv", "test.csv", "test.jsonl", "test.parquet")
LABELS = {0: "negative", 1: "positive"}
HEAD_SHARE = 0.25
"""Share of the token budget kept from a long text's start; the rest comes from its end (see `encode`)."""

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class ClassifierConfig(Hardware):
    """`wprlhf classifier train`: what to learn from, which encoder, how long."""

    data: str = ""
    """Labelled text: a CSV / JSONL / Parquet file with columns text,label (1 = positive), a directory holding
    imdb_train.csv or train.csv, or a hub id (its train split, e.g. stanfordnlp/imdb)."""
    model: str = "minilm"
    """Encoder: 'minilm' (embedded all-MiniLM-L6-v2), a local directory or a hub id (a BERT, a DistilBERT, ...);
    a fresh two-way head goes on top."""
    max_length: int = 256
    """Tokens per text, special tokens included. Longer texts keep their first quarter and their last three
    quarters of the budget: reviews often end with the verdict."""
    epochs: int = 1
    """Passes over the training texts."""
    batch_size: int = 16
    """Texts per optimizer step."""
    lr: float = 5e-5
    """Peak AdamW learning rate (BERT fine-tuning's usual range is 2e-5 .. 5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.06
    """Share of optimizer steps with a linear warm-up; then linear decay to 0."""
    max_examples: int = 0
    """Train on at most this many texts (0 = all), drawn at random with `seed` (hub files can be sorted by label)."""
    val_fraction: float = 0.05
    """Share of the training texts held out for the validation curve and eval-heldout.json (at most 500 used)."""
    eval_every: int = 50
    """Optimizer steps between validation passes (the last step always has one)."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many of the lowest transformer layers: faster on a CPU, a little less
    accurate."""
    seed: int = 0
    """Seeds the head's init, the sample, the validation split and the batch order."""

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 8:
            raise UserError(f"max_length {self.max_length} is too short to hold a text; use >= 8")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; "
                                f"set --{name.replace('_', '-')} to 1 or more")  # fmt: skip
        if self.max_examples < 0:
            raise UserError(f"max_examples must be >= 0 (0 = all), got {self.max_examples}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check_numbers(self, non_negative=("weight_decay", "warmup_ratio"))
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")


# ==========================================================================================================
# data


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_text(text: str) -> str:
    """IMDB's raw reviews hold HTML line breaks (`<br /><br />`); make each a newline, as ../shared/data did."""
    return _BR.sub("\n", text).strip()


def _label(value, where: str, source: str) -> int:
    """0 / 1 from an int, a bool-free float or a string such as '1' or '1.0'; anything else is a UserError."""
    if isinstance(value, bool) or value is None:
        number = None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number not in (0.0, 1.0):
        raise UserError(f"{source} {where}: label {value!r} is not 0 or 1; the label column must hold 1 for "
                        "positive and 0 for negative")  # fmt: skip
    return int(number)


def load_labelled(source: str | Path, split: str = "train") -> tuple[list[str], list[int]]:
    """(texts, labels) from a file, a directory or a hub id; split picks a directory's train or test file.

    Raises UserError naming the file and row for a missing file, a missing text/label column, a label that is
    not 0/1, an empty text, or a source with no rows.
    """
    rows = read_rows(source, TRAIN_FILES if split == "train" else TEST_FILES)
    missing = [c for c in ("text", "label") if c not in rows.columns]
    if missing:
        has = ", ".join(map(str, rows.columns))
        raise UserError(f"{rows.source} lacks column(s) {', '.join(missing)} (has: {has}); a classifier needs a "
                        "'text' column and a 'label' column (1 = positive, 0 = negative)")  # fmt: skip
    if not rows:
        raise UserError(f"{rows.source} holds no examples; it needs rows of text,label")
    texts, labels = [], []
    for row, where in zip(rows, rows.where):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{rows.source} {where}: the text is empty or not text ({text!r:.40})")
        texts.append(clean_text(text))
        labels.append(_label(row.get("label"), where, rows.source))
    return texts, labels


def _sample(texts: list[str], labels: list[int], n: int, seed: int) -> tuple[list[str], list[int]]:
    """At most n (text, label) pairs drawn at random with `seed`; all of them, in order, when n is 0 or >= len."""
    if not n or n >= len(texts):
        return texts, labels
    idx = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in idx], [labels[i] for i in idx]


# ==========================================================================================================
# scoring


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Texts -> padded input_ids / attention_mask (B, T), T <= max_length, special tokens added.

    A text longer than the budget keeps its first HEAD_SHARE of the budget and the rest from its end: Sun et al.
    2019 (How to Fine-Tune BERT for Text Classification?, sec. 5.3.1) found head + tail truncation beat keeping
    the head or the tail alone on IMDB, where the verdict often sits in the last sentences.
    """
    prefix, suffix = _special_tokens(tokenizer)
    budget = max(1, max_length - prefix - suffix)
    head = int(budget * HEAD_SHARE)
    rows = []
    # [CLS] / [SEP] added, nothing truncated; a text that spells [SEP] keeps it as text
    for row in tokenizer(list(texts), verbose=False, split_special_tokens=True)["input_ids"]:
        start, body, end = row[:prefix], row[prefix : len(row) - suffix], row[len(row) - suffix :]
        if len(body) > budget:
            body = body[:head] + body[len(body) - (budget - head) :]
        rows.append(start + body + end)
    return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")


def _special_tokens(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text ([CLS] / [SEP] for BERT: 1, 1)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return i, len(full) - i - len(plain)
    return 0, 0


@torch.no_grad()
def log_odds(model: nn.Module, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 32,
             progress: bool = False) -> torch.Tensor:  # fmt: skip
    """logit_pos - logit_neg = log p(positive) / p(negative) of each text, batched, no grad. (N,) float32, CPU."""
    logits = outputs(model, tokenizer, encode, list(texts), max_length, batch_size, progress)  # (N, 2)
    return logits[:, 1] - logits[:, 0]


def two_way(log_odds: torch.Tensor) -> torch.Tensor:
    """(N,) log-odds -> (N, 2) logits [0, log-odds] with the same softmax: what `BinaryRating.loss` reads."""
    return torch.stack([torch.zeros_like(log_odds), log_odds], dim=1)


def load_classifier(path: str | Path, device: str | torch.device = "cpu"):
    """A classifier saved by `wprlhf classifier train` (or any two-label sequence classifier): (model, tokenizer)."""
    model, tokenizer, _ = _load(path, device)
    return model, tokenizer


def _load(path: str | Path, device: str | torch.device):
    """(model, tokenizer, train config) of a classifier directory; a UserError naming the command that makes one."""
    return load(path, 2, device, "classifier", "classifier train --data DATA")


def join_review(prompt: str, response: str) -> str:
    """The text a reader sees: an opening and the policy's continuation (decoded responses lose their leading
    space, so one is put back unless the continuation starts with punctuation)."""
    if not prompt:
        return response
    if not response:
        return prompt
    sep = "" if response[0] in ",.;:!?)'" or prompt[-1].isspace() else " "
    return prompt + sep + response


def log_odds_reward(model_dir: str | Path, max_length: int | None = None, batch_size: int = 32,
                    device: str = "auto") -> ScoreFn:  # fmt: skip
    """The classifier as a PPO reward: reward_fn(prompts, responses) -> log-odds that prompt + response is positive.

    The opening is scored with its continuation because the two read as one review; the opening's share is the
    same for every continuation of a prompt, so it moves no advantage after the value model learns it.
    """
    model, tokenizer, trained = _load(model_dir, device)
    length = max_length or trained.get("max_length", 256)

    def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [join_review(p, r) for p, r in zip(prompts, responses)]
        return log_odds(model, tokenizer, texts, length, batch_size).tolist()

    return reward_fn


# ==========================================================================================================
# training


def train(config: ClassifierConfig, out_dir: str | Path, polarity: ScoreFn | None = None,
          progress: bool = True) -> dict:  # fmt: skip
    """Fine-tune a two-way classifier; save it (HF format), train_config.json, metrics.csv and eval-heldout.json.

    polarity: an optional score whose sign predicts the label (VADER's compound, `judges.sentiment`), passed in
    by the caller, for the baseline in eval-heldout.json. Returns the held-out evaluation.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if not config.data:
        raise UserError("classifier train needs --data: a CSV with text,label, a directory or a hub id")
    texts, labels = load_labelled(config.data, "train")
    if len(set(labels)) < 2:
        raise UserError(f"{config.data} holds only label {labels[0]}; a classifier needs examples of both 0 and 1")
    rng = random.Random(config.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_val = min(500, round(config.val_fraction * len(texts)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if config.max_examples and len(train_idx) > config.max_examples:
        train_idx = train_idx[: config.max_examples]  # already a random draw: `order` is shuffled
    if not train_idx:
        raise UserError(f"{config.data}: no training examples left after holding out {n_val} for validation; "
                        "lower --val-fraction")  # fmt: skip
    train_texts, train_labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    val_texts, val_labels = [texts[i] for i in val_idx], [labels[i] for i in val_idx]

    # A local data path is stored resolved, so `classifier eval` finds the training file for its TF-IDF baseline
    # from any working directory.
    data = str(Path(config.data).resolve()) if Path(config.data).exists() else config.data
    saved = {**dataclasses.asdict(config), "data": data, "train_examples": len(train_texts),
             "val_examples": len(val_texts), "truncation": f"head {HEAD_SHARE:.0%} + tail"}  # fmt: skip
    # The validation curve reads each text exactly as `classifier eval` will (same truncation, scores, tie rule).
    def validate(model, tokenizer) -> dict:
        return evaluate(model, tokenizer, val_texts, val_labels, config.max_length)

    fitted = fit(config, out_dir, BinaryRating(), list(zip(train_texts, train_labels)),
                 list(zip(val_texts, val_labels)), rng, name="classifier", encode=encode, validate=validate,
                 saved=saved, head_config={"id2label": dict(LABELS), "label2id": {v: k for k, v in LABELS.items()}},
                 dropout=True, progress=progress)  # fmt: skip
    if fitted is None:  # not the main process
        return {}
    model, tokenizer = fitted
    held_out: dict = {}
    if val_texts:
        held_out = evaluate(model, tokenizer, val_texts, val_labels, config.max_length)
        held_out["baselines"] = baselines(train_texts, train_labels, val_texts, val_labels, polarity, "the held-out texts")
    held_out["elapsed_s"] = time.perf_counter() - started
    return save(model, tokenizer, out_dir, held_out)


# ==========================================================================================================
# evaluation


def binary_f1(predicted: Sequence[float], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN); 0 when there is no positive anywhere.

    predicted: 1 (positive), 0 (negative) or a share in between; a tie (log-odds exactly 0) is predicted 1/2, so
    it adds half a TP and half an FN to a positive text, half an FP to a negative one (expected counts under a
    coin flip; see `sign_credit`).

    >>> binary_f1([1, 1, 0, 0], [1, 0, 1, 0])  # TP 1, FP 1, FN 1
    0.5
    """
    tp = sum(p * y for p, y in zip(predicted, labels))
    fp = sum(p * (1 - y) for p, y in zip(predicted, labels))
    fn = sum((1 - p) * y for p, y in zip(predicted, labels))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def sign_credit(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How right a score whose sign predicts the label is, by the one tie rule (`core.choice_credit`):
    each text chooses between negative (scored 0) and positive (scored `scores`), so a score > 0 is right for
    label 1, < 0 for label 0, and exactly 0 (log-odds 0: p = 1/2, or a lexicon that found no word) is a tie
    between the two classes and counts 1/2, the expected accuracy of a coin flip, not 'negative' by default.

    scores (N,) float (log-odds, VADER's compound, a decision function); labels (N,) int64 0/1. Returns (N,).
    """
    return choice_credit(two_way(torch.as_tensor(scores, dtype=torch.float64)), torch.as_tensor(labels))


def evaluate(model, tokenizer, texts: list[str], labels: list[int], max_length: int, batch_size: int = 32,
             progress: bool = False) -> dict:  # fmt: skip
    """A classifier's numbers on labelled texts; `classifier eval`, eval-heldout.json and the validation curve of
    `train` all come from here, so they agree.

    Returns accuracy (mean `sign_credit` of the log-odds: log-odds exactly 0 counts 1/2), f1 (positive class,
    a tie predicted 1/2), n, a 95% bootstrap CI of the accuracy (each text its own group) and loss (training's
    `BinaryRating` loss: mean cross-entropy, nats per text). texts must not be empty (`load_labelled` refuses a
    file with no rows).
    """
    if not texts:
        raise ValueError("evaluate needs at least one text")
    scores = log_odds(model, tokenizer, texts, max_length, batch_size, progress).double()  # (N,)
    loss, credit = BinaryRating().loss(two_way(scores), torch.tensor(labels))
    predicted = sign_credit(scores, torch.ones(len(labels), dtype=torch.long)).tolist()  # 1, 1/2 or 0: how positive
    accuracy, ci95 = accuracy_ci(credit.tolist(), range(len(credit)))
    return {"accuracy": accuracy, "f1": binary_f1(predicted, labels), "n": len(credit), "ci95": ci95,
            "loss": float(loss)}  # fmt: skip


def polarity_accuracy(polarity: ScoreFn, texts: list[str], labels: list[int]) -> float | None:
    """Baseline: a lexicon score (VADER's compound) > 0 predicts positive, < 0 negative; exactly 0 (no sentiment
    word found) counts 1/2 (`sign_credit`). None when there are no texts."""
    if not texts:
        return None
    scores = torch.tensor([float(s) for s in polarity([""] * len(texts), texts)])
    return float(sign_credit(scores, torch.tensor(labels)).mean())


def tfidf_logreg(train_texts: list[str], train_labels: list[int], test_texts: list[str],
                 test_labels: list[int]) -> float | None:  # fmt: skip
    """Baseline: logistic regression on TF-IDF of word 1-2 grams, fit on the training texts; the sign of its
    decision function predicts the label (`sign_credit`: exactly 0 counts 1/2). None when the training texts are
    too few to fit (one label, or every term pruned)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2 or not test_texts:
        return None
    vectorizer = TfidfVectorizer(min_df=2, max_features=50000, sublinear_tf=True, ngram_range=(1, 2))
    try:
        x = vectorizer.fit_transform(train_texts)
    except ValueError:  # every term pruned: too little text for the baseline
        return None
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, train_labels)
    decision = torch.from_numpy(clf.decision_function(vectorizer.transform(test_texts)))  # > 0: class 1
    return float(sign_credit(decision, torch.tensor(test_labels)).mean())


def baselines(train_texts, train_labels, test_texts, test_labels, polarity: ScoreFn | None, where: str = "the test texts") -> dict:
    """{'majority_class', 'vader', 'tfidf_logreg'}: accuracies on the test texts (vader only when polarity is given,
    tfidf_logreg only with training texts). majority_class is a constant predictor's, the larger class's share;
    at 0.9 or more a warning says the set is one-sided (`warn_if_degenerate`)."""
    positive = sum(test_labels) / len(test_labels) if test_labels else None
    out = {"majority_class": None if positive is None else max(positive, 1 - positive)}
    warn_if_degenerate(out["majority_class"], "always predicting the majority class", where,
                       "add texts of the other class")  # fmt: skip
    if polarity is not None:
        out["vader"] = polarity_accuracy(polarity, test_texts, test_labels)
    if train_texts:
        out["tfidf_logreg"] = tfidf_logreg(train_texts, train_labels, test_texts, test_labels)
    return out


def run_eval(model_dir: str | Path, data: str, out: str | Path | None = None, max_examples: int = 0,
             max_length: int | None = None, train_data: str | None = None, polarity: ScoreFn | None = None,
             batch_size: int = 32, progress: bool = True) -> dict:  # fmt: skip
    """`wprlhf classifier eval`: accuracy, f1, n, ci95 on `data` against baselines; writes JSON and returns it.

    data: a file with text,label (a directory gives its imdb_test.csv / test.csv; a hub id its train split, so
    name the test file, e.g. `stanfordnlp/imdb:plain_text/test-00000-of-00001.parquet`). max_examples draws a
    random subset (seed 0). The TF-IDF baseline trains on `train_data`, else on the data the model was trained
    on; polarity (VADER's compound, `judges.sentiment`) gives the `vader` baseline.
    Default output: MODEL_DIR/eval-<data name>.json.
    """
    model_dir = Path(model_dir)
    model, tokenizer, trained = _load(model_dir, "auto")
    max_length = max_length or trained.get("max_length", 256)
    if not Path(data).exists() and ":" not in data:
        print(f"note: {data} is read as a hub id, whose train split is used; to evaluate on its test split name "
              "the file, e.g. stanfordnlp/imdb:plain_text/test-00000-of-00001.parquet", file=sys.stderr)  # fmt: skip
    texts, labels = load_labelled(data, "test")
    texts, labels = _sample(texts, labels, max_examples, seed=0)
    name = Path(data).name.split(".")[0] if Path(data).exists() else data.replace("/", "_").replace(":", "_")
    out = Path(out) if out else model_dir / f"eval-{name}.json"

    result = evaluate(model, tokenizer, texts, labels, max_length, batch_size, progress)
    train_texts, train_labels = [], []
    train_source = train_data or trained.get("data") or ""
    if train_data:
        train_texts, train_labels = load_labelled(train_data, "train")
    elif train_source:
        try:  # the data recorded at training time may since have moved, or be a hub id with no network here
            train_texts, train_labels = load_labelled(train_source, "train")
        except UserError as err:
            print(f"note: no tfidf_logreg baseline, the training data could not be read ({err}); pass --train-data",
                  file=sys.stderr)  # fmt: skip
    result["baselines"] = baselines(train_texts, train_labels, texts, labels, polarity, data)
    result.update(model=str(model_dir), data=data, max_length=max_length, train_data=train_source or "")
    write_json_atomic(out, result)
    return result
