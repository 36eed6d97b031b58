"""Named PPO tasks on movie reviews: their prompts, their reward, and a judge that training never sees.

- `positive-reviews`: the policy continues the opening words of a movie review; the reward is a sentiment
  classifier's log-odds that the review (opening + continuation) is positive.
- `sentiment-control`: each opening carries a control prefix, `[negative]`, `[neutral]` or `[positive]`; the reward
  is the log-odds for `[positive]`, minus the log-odds for `[negative]`, and -|log-odds| for `[neutral]`, so one
  policy learns to write to order.

The judge is VADER's compound polarity of the same review, signed the same way as the reward: a lexicon that
shares no weights with the classifier, so a policy that games the classifier shows as reward rising without the
judge. Continuations are plain text, so tasks feed prompts without the chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .classifier import TRAIN_FILES, clean_text, join_review, log_odds_reward
from .data import read_rows
from .errors import UserError
from .labelers import sentiment

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]

CONTROLS = ("[negative]", "[neutral]", "[positive]")
OPENING_WORDS = 8
"""Words of a review's first line kept as its opening: enough to set a topic, too few to settle the verdict."""


@dataclass
class Task:
    """What `wprlhf ppo --task NAME` trains on: prompts, reward_fn, judge_fn (logged as judge_mean, never trained
    on) and whether prompts go through the chat template (False: a review is continued, not answered)."""

    name: str
    prompts: list[str]
    reward_fn: ScoreFn
    judge_fn: ScoreFn
    chat_template: bool = False


# ==========================================================================================================
# prompts


def builtin_openings() -> list[str]:
    """About 100 short review openings written for wprlhf (no copied text), shipped with the package."""
    text = resources.files("wprlhf").joinpath("prompts/review_openings.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def opening(text: str, n_words: int = OPENING_WORDS) -> str:
    """The first n_words words of a review's first paragraph, HTML line breaks removed.

    >>> opening("A slow start.<br /><br />Then it gets better", 5)
    'A slow start.'
    >>> opening("I really wanted   to like this film, honestly", 5)
    'I really wanted to like'
    """
    first = clean_text(text).split("\n", 1)[0]
    return " ".join(first.split()[:n_words])


def load_openings(data: str | Path | None = None, n_words: int = OPENING_WORDS) -> list[str]:
    """Review openings: the shipped ones (no data), a .txt file's lines as written, or the first words of each
    review (at least 3) of a text column in a file, a directory holding imdb_train.csv / train.csv, or a hub id.
    Distinct, in the source's order."""
    if not data:
        return builtin_openings()
    path = Path(data)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"openings file {path} does not exist")
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        rows = read_rows(data, TRAIN_FILES)
        if "text" not in rows.columns:
            has = ", ".join(map(str, rows.columns))
            raise UserError(f"{rows.source} has no 'text' column (has: {has}); task openings are taken from the "
                            "reviews in a 'text' column, or give a .txt of openings")  # fmt: skip
        found = [opening(r["text"], n_words) for r in rows if isinstance(r.get("text"), str)]
        found = [o for o in found if len(o.split()) >= 3]
    out = list(dict.fromkeys(o for o in found if o))
    if not out:
        raise UserError(f"{data} gives no review openings; it needs at least one review of 3 or more words")
    return out


def control_prompts(openings: list[str]) -> list[str]:
    """Every opening once with each control prefix, the prefixes in turn: the policy can only tell what to write
    from the prefix, never from the opening.

    >>> control_prompts(["The film"])
    ['[negative] The film', '[neutral] The film', '[positive] The film']
    """
    return [f"{control} {text}" for text in openings for control in CONTROLS]


def split_control(prompt: str) -> tuple[str, str]:
    """'[positive] The film' -> ('[positive]', 'The film'); a prompt without a control prefix is a UserError."""
    for control in CONTROLS:
        if prompt.startswith(control):
            return control, prompt[len(control) :].lstrip()
    raise UserError(f"sentiment-control prompt {prompt[:60]!r} does not start with one of {', '.join(CONTROLS)}")


def signed(control: str, value: float) -> float:
    """The control's reading of a positive-sentiment score: itself, its negation, or -|value| for neutral."""
    if control == "[positive]":
        return value
    if control == "[negative]":
        return -value
    return -abs(value)


# ==========================================================================================================
# rewards and judges


def on_reviews(score_fn: ScoreFn) -> ScoreFn:
    """A text score (of the response alone, like `labelers.sentiment`) applied to opening + continuation."""

    def review_score(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(s) for s in score_fn(list(prompts), [join_review(p, r) for p, r in zip(prompts, responses)])]

    return review_score


def controlled(score_fn: ScoreFn) -> ScoreFn:
    """Wrap a (prompts, responses) positive-sentiment score for sentiment-control: the control prefix is removed
    before scoring and sets the sign (`signed`)."""

    def control_score(prompts: list[str], responses: list[str]) -> list[float]:
        controls, openings = zip(*(split_control(p) for p in prompts)) if prompts else ((), ())
        scores = score_fn(list(openings), list(responses))
        return [signed(c, float(s)) for c, s in zip(controls, scores)]

    return control_score


TASKS = ("positive-reviews", "sentiment-control")


def load_task(name: str, classifier_dir: str | Path, data: str | Path | None = None) -> Task:
    """The task NAME with the classifier in classifier_dir as its reward; openings from `data` (see
    `load_openings`) or the shipped ones."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if not classifier_dir:
        raise UserError(f"task {name} needs --classifier DIR: a sentiment classifier written by "
                        "`wprlhf classifier train` (its log-odds of positive is the reward)")  # fmt: skip
    openings = load_openings(data)
    reward_fn = log_odds_reward(classifier_dir)
    judge_fn = on_reviews(sentiment)
    if name == "positive-reviews":
        return Task(name, openings, reward_fn, judge_fn)
    return Task(name, control_prompts(openings), controlled(reward_fn), controlled(judge_fn))
