"""Named PPO tasks on movie reviews: their prompts, their reward, a judge that training never sees, and their
evaluation on held-out openings.

- `positive-reviews`: the policy continues the opening words of a movie review; the reward is a sentiment
  classifier's log-odds that the review (opening + continuation) is positive.
- `sentiment-control`: each opening carries a control prefix, `[negative]`, `[neutral]` or `[positive]`; the reward
  is the log-odds for `[positive]`, minus the log-odds for `[negative]`, and -|log-odds| for `[neutral]`, so one
  policy learns to write to order. A small model reads nothing into the prefixes at first; `sft_stories` (`wprlhf
  sft --task sentiment-control`) teaches them from labelled reviews before PPO.

The judge is VADER's compound polarity of the same review, signed the same way as the reward: a lexicon that
shares no weights with the classifier, so a policy that games the classifier shows as reward rising without the
judge. Continuations are plain text, so tasks feed prompts without the chat template.

`evaluate_task` (`wprlhf task-eval`) has a trained policy and its start policy continue the same held-out
openings and compares their rewards, positive probabilities and judge scores with paired 95% CIs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..data import Response, read_rows
from ..distributed import resolve_device
from ..errors import UserError
from ..evals.measures import mean_ci, paired_means, text_stats
from ..evals.sides import sample_side, side_kl
from ..generation import GenerationConfig, generation_config
from ..models import load_policy
from ..rewards.classifier import TEST_FILES, TRAIN_FILES, clean_text, join_review, load_labelled, log_odds_reward
from ..rewards.judges import sentiment
from ..signatures import RewardFn

CONTROLS = ("[negative]", "[neutral]", "[positive]")
OPENING_WORDS = 8
"""Words of a review's first line kept as its opening: enough to set a topic, too few to settle the verdict."""


@dataclass
class Task:
    """What `wprlhf ppo --task NAME` trains on: prompts, reward_fn, judge_fn (logged as judge_mean, never trained
    on) and whether prompts go through the chat template (False: a review is continued, not answered)."""

    name: str
    prompts: list[str]
    reward_fn: RewardFn
    judge_fn: RewardFn
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


def on_reviews(score_fn: RewardFn) -> RewardFn:
    """A text score (of the response alone, like `judges.sentiment`) applied to opening + continuation."""

    def review_score(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(s) for s in score_fn(list(prompts), [join_review(p, r) for p, r in zip(prompts, responses)])]

    return review_score


def controlled(score_fn: RewardFn) -> RewardFn:
    """Wrap a (prompts, responses) positive-sentiment score for sentiment-control: the control prefix is removed
    before scoring and sets the sign (`signed`)."""

    def control_score(prompts: list[str], responses: list[str]) -> list[float]:
        controls, openings = zip(*(split_control(p) for p in prompts)) if prompts else ((), ())
        scores = score_fn(list(openings), list(responses))
        return [signed(c, float(s)) for c, s in zip(controls, scores)]

    return control_score


TASKS = ("positive-reviews", "sentiment-control")


def check_task_name(name: str) -> None:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def check_task(name: str, classifier_dir: str | Path) -> None:
    """A UserError for an unknown task name or a missing classifier, before anything slow is loaded."""
    check_task_name(name)
    if not classifier_dir:
        raise UserError(f"task {name} needs --classifier DIR: a sentiment classifier written by "
                        "`wprlhf classifier train` (its log-odds of positive is the reward)")  # fmt: skip


def load_task(name: str, classifier_dir: str | Path, data: str | Path | None = None) -> Task:
    """The task NAME with the classifier in classifier_dir as its reward; openings from `data` (see
    `load_openings`) or the shipped ones."""
    check_task(name, classifier_dir)
    openings = load_openings(data)
    reward_fn = log_odds_reward(classifier_dir)
    judge_fn = on_reviews(sentiment)
    if name == "positive-reviews":
        return Task(name, openings, reward_fn, judge_fn)
    return Task(name, control_prompts(openings), controlled(reward_fn), controlled(judge_fn))


CONTINUATION_WORDS = 40
"""Words of a review after its opening that `sft_stories` keeps as the continuation to imitate: a PPO response
is 24 tokens or so, and 40 words say plenty about a review's verdict."""


def sft_stories(name: str, data: str | Path) -> list[Response]:
    """Labelled reviews as supervised examples in the task's own prompt format, for `wprlhf sft --task NAME`.

    sentiment-control: "[positive] <opening>" or "[negative] <opening>" (by the review's label) -> the review's
    next CONTINUATION_WORDS words. This is the control-code recipe (Keskar et al. 2019): a 135M model reads no
    meaning into "[positive]" by itself (measured: its samples under the three prefixes differ by a few points of
    P(positive)), and PPO spends most of its episodes discovering it, so SFT on labelled text first teaches the
    prefix's meaning and PPO sharpens it. IMDB has no neutral reviews, so "[neutral]" is left to PPO.
    positive-reviews: positive reviews' openings -> their continuations (an SFT baseline for the PPO task).

    Each continuation starts with a space, so `wprlhf sft` joins it to its prompt with nothing between, exactly as
    PPO continues an opening. prompt_id is the review's row, so SFT's held-out split keeps reviews apart.
    """
    check_task_name(name)
    if not data:
        raise UserError(f"sft --task {name} learns from labelled reviews: pass --data with a 'text,label' file or "
                        "a directory holding imdb_train.csv (e.g. ../shared/data/imdb)")  # fmt: skip
    texts, labels = load_labelled(data, "train")
    stories = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        if name == "positive-reviews" and label != 1:
            continue
        start = opening(text).split()
        words = text.split()[len(start) : len(start) + CONTINUATION_WORDS]
        if len(start) < 3 or not words:
            continue  # too short to give an opening and something after it
        prompt = " ".join(start)
        if name == "sentiment-control":
            prompt = f"{CONTROLS[2] if label == 1 else CONTROLS[0]} {prompt}"
        stories.append(Response(f"review-{i}", prompt, f"review-{i}", " " + " ".join(words), rank=0))
    if not stories:
        raise UserError(f"{data} gives no review with 3 or more opening words and a continuation for task {name}")
    return stories


# ==========================================================================================================
# evaluation on held-out openings

SHOWN_OPENINGS = 8
"""Openings whose start and trained continuations go into the result side by side, with their scores."""


def heldout_openings(data: str | Path | None, n: int, seed: int = 0) -> tuple[list[str], str, bool]:
    """Up to n openings to evaluate on: (openings, their source, whether they come from a test split).

    A directory holding a test file (imdb_test.csv, test.csv, ...) gives that file's openings, less any that its
    training file (what `wprlhf ppo --prompts DIR` read) also opens with. Anything else is read as
    `load_openings` reads it: the openings a run on the same `data` trained on. More than n are drawn at random
    with `seed`, kept in the source's order: a file sorted by label would otherwise give one label only.
    """
    if n < 1:
        raise UserError(f"the number of openings must be >= 1, got {n}")
    folder = Path(data) if data else None
    test = None
    if folder is not None and folder.is_dir():
        test = next((folder / f for f in TEST_FILES if (folder / f).is_file()), None)
    if test is None:
        openings, source = load_openings(data), str(data) if data else "builtin"
    else:
        trained_on = set(load_openings(folder)) if any((folder / f).is_file() for f in TRAIN_FILES) else set()
        openings, source = [o for o in load_openings(test) if o not in trained_on], str(test)
        if not openings:
            raise UserError(f"every opening of {test} also opens a review in {folder}'s training file; "
                            "evaluate on other openings (--prompts FILE)")  # fmt: skip
    if n < len(openings):
        openings = [openings[i] for i in sorted(random.Random(seed).sample(range(len(openings)), n))]
    return openings, source, test is not None


def evaluate_task(name: str, policy: str, start: str, classifier_dir: str | Path, data: str | Path | None = None,
                  n_openings: int = 128, response_length: int = 24, min_response_length: int = 8,
                  temperature: float = 0.7, seed: int = 0, batch_size: int = 16, chat_template: bool = False,
                  device: str = "auto", progress: bool = False, greedy: bool = False) -> dict:  # fmt: skip
    """The trained `policy` against its `start` policy on held-out openings (`heldout_openings`); greedy takes the
    most likely token at every step instead of sampling.

    Both continue every prompt once (sentiment-control: each opening under each control prefix) with the same
    sampling seed; the classifier scores opening + continuation (prefix removed) and VADER judges it. Every
    mean has a 95% CI that resamples openings, and each start/trained comparison is paired by opening
    (`paired_means`). KL is the k1 estimate of the trained samples under the start policy, nats per response.
    'tiny' is initialised with `seed`.

    Returns a JSON-ready dict. Each {mean, lo, hi} is a mean with its 95% CI; a paired block is {start, trained,
    diff}, diff being trained - start per opening. Keys: task, policy, start, classifier, n (openings),
    n_samples (responses per policy), openings_source, openings_from_test_split, seed, generation;
    reward (paired: log-odds, signed by control as in training), vader (paired: VADER compound, signed the same
    way), kl ({mean, lo, hi}: nats per response), text (distinct-n, repetition, words of each side), samples
    (the first SHOWN_OPENINGS openings' rows: opening, [control], start, trained, kl, and reward_ /
    positive_prob_ / vader_ start and trained, the last two unsigned). positive-reviews adds positive_prob
    (paired: the classifier's P(positive)); sentiment-control adds by_control ({control: {start, trained:
    P(positive); vader_start, vader_trained: unsigned compound; kl}}), gap_positive_minus_negative (paired:
    P(positive) under [positive] - under [negative], per opening) and neutral_between (the trained policy's
    [neutral] mean lies strictly between its [negative] and [positive] means).
    """
    check_task(name, classifier_dir)
    score = log_odds_reward(classifier_dir, device=device)  # positive log-odds; a bad directory fails here, early
    judge = on_reviews(sentiment)
    openings, source, from_test = heldout_openings(data, n_openings, seed)
    prompts = openings if name == "positive-reviews" else control_prompts(openings)
    if name == "sentiment-control":
        controls, plain = map(list, zip(*(split_control(p) for p in prompts)))
    else:  # positive-reviews rewards exactly what [positive] does, so one signed reading serves both tasks
        controls, plain = ["[positive]"] * len(prompts), list(prompts)
    groups = plain  # resample openings: an opening's three controlled samples move together
    temperature = 1.0 if greedy and temperature == 0 else temperature  # argmax needs none; log-probs at T = 1
    gen = generation_config(response_length=response_length, min_response_length=min_response_length,
                            temperature=temperature)  # fmt: skip
    gen.greedy = greedy

    texts, kls = _sample_both(policy, start, prompts, gen, seed, batch_size, chat_template, device, progress)
    scores = {}
    for side in ("start", "trained"):
        log_odds = [float(x) for x in score(plain, texts[side])]
        vader = [float(x) for x in judge(plain, texts[side])]
        scores[side] = {"reward": [signed(c, x) for c, x in zip(controls, log_odds)],
                        "positive_prob": torch.sigmoid(torch.tensor(log_odds, dtype=torch.float64)).tolist(),
                        "vader": vader, "judge": [signed(c, x) for c, x in zip(controls, vader)]}  # fmt: skip

    def both(key: str) -> dict:
        return paired_means(scores["start"][key], scores["trained"][key], groups)

    result = {"task": name, "policy": str(policy), "start": str(start), "classifier": str(classifier_dir),
              "n": len(openings), "n_samples": len(prompts), "openings_source": source,
              "openings_from_test_split": from_test, "seed": seed,
              "generation": {"response_length": response_length, "min_response_length": min_response_length,
                             "temperature": temperature, "greedy": greedy, "chat_template": chat_template},
              "reward": both("reward"), "vader": both("judge"), "kl": mean_ci(kls, groups)}  # fmt: skip
    if name == "positive-reviews":
        result["positive_prob"] = both("positive_prob")
    else:
        result.update(_by_control(scores, controls, kls, openings))
    result["text"] = {side: text_stats(plain, texts[side]) for side in ("start", "trained")}
    shown = SHOWN_OPENINGS * len(prompts) // len(openings)
    result["samples"] = [{"opening": plain[i], **({"control": controls[i]} if name == "sentiment-control" else {}),
                          "start": texts["start"][i], "trained": texts["trained"][i], "kl": kls[i],
                          **{f"{key}_{side}": scores[side][key][i] for key in ("reward", "positive_prob", "vader")
                             for side in ("start", "trained")}}
                         for i in range(min(shown, len(prompts)))]  # fmt: skip
    return result


def _sample_both(policy: str, start: str, prompts: list[str], gen: GenerationConfig, seed: int, batch_size: int,
                 chat_template: bool, device: str, progress: bool) -> tuple[dict, list[float]]:  # fmt: skip
    """({'start': texts, 'trained': texts}, KL of each trained text to the start policy). The same seed for both:
    common random numbers make the paired difference less noisy."""
    trained_model, tokenizer = load_policy(policy, seed=seed)
    start_model, start_tokenizer = load_policy(start, seed=seed)
    if len(tokenizer) != len(start_tokenizer):
        raise UserError(f"--policy {policy} has a vocabulary of {len(tokenizer)} tokens and --start {start} one of "
                        f"{len(start_tokenizer)}: --start must be the policy that PPO started from")  # fmt: skip
    run_on = resolve_device(device)
    trained_model.to(run_on)
    start_model.to(run_on)
    common = {"batch_size": batch_size, "progress": progress, "chat_template": chat_template}
    trained = sample_side("trained", trained_model, tokenizer, prompts, gen, seed, **common)
    kls = side_kl(trained, trained_model, start_model, tokenizer, prompts, gen, **common)
    start_side = sample_side("start", start_model, start_tokenizer, prompts, gen, seed, **common)
    return {"start": start_side.texts, "trained": trained.texts}, kls


def _by_control(scores: dict, controls: Sequence[str], kls: list[float], openings: list[str]) -> dict:
    """sentiment-control's view: each control's mean positive probability (classifier) and VADER compound, the
    positive - negative gap in positive probability paired by opening, and whether [neutral] lies between."""

    def column(side: str, key: str, control: str) -> list[float]:  # one value per opening, in their order
        return [v for c, v in zip(controls, scores[side][key]) if c == control]

    by_control = {c: {"trained": mean_ci(column("trained", "positive_prob", c), openings),
                      "start": mean_ci(column("start", "positive_prob", c), openings),
                      "vader_trained": mean_ci(column("trained", "vader", c), openings),
                      "vader_start": mean_ci(column("start", "vader", c), openings),
                      "kl": mean_ci([k for k, cc in zip(kls, controls) if cc == c], openings)}
                  for c in CONTROLS}  # fmt: skip
    gaps = {side: [p - q for p, q in zip(column(side, "positive_prob", "[positive]"),
                                         column(side, "positive_prob", "[negative]"))]
            for side in ("start", "trained")}  # fmt: skip
    means = [by_control[c]["trained"]["mean"] for c in CONTROLS]  # negative, neutral, positive
    gap = paired_means(gaps["start"], gaps["trained"], openings)
    return {"by_control": by_control, "gap_positive_minus_negative": gap,
            "neutral_between": bool(means[0] < means[1] < means[2])}  # fmt: skip


def summary(result: dict) -> str:
    """A few readable lines of an `evaluate_task` result: means [95% CI] of start, trained and their difference."""

    def ci(x: dict) -> str:
        return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"

    held = "" if result["openings_from_test_split"] else " (not a test split: training may have seen them)"
    lines = [(f"{result['task']}: {result['policy']} against {result['start']} on {result['n']} openings from "
             f"{result['openings_source']}{held}; start / trained / difference, 95% CI over openings")]  # fmt: skip
    signed_by = "" if result["task"] == "positive-reviews" else ", signed by control"
    rows = [(f"reward (log-odds{signed_by})", "reward"), ("P(positive)", "positive_prob"),
            (f"VADER (judge{signed_by})", "vader"), ("P(positive) gap pos - neg", "gap_positive_minus_negative")]
    for label, key in rows:
        if key in result:
            r = result[key]
            lines.append(f"  {label:<38} {ci(r['start'])}  {ci(r['trained'])}  {ci(r['diff'])}")
    lines.append(f"  {'KL to start, nats per response':<38} {ci(result['kl'])}")
    for control, r in result.get("by_control", {}).items():
        lines.append(f"  {control:<12} P(positive) {ci(r['start'])} -> {ci(r['trained'])}; VADER "
                     f"{r['vader_start']['mean']:+.3f} -> {r['vader_trained']['mean']:+.3f}")  # fmt: skip
    if "neutral_between" in result:
        lines.append(f"  trained [neutral] between [negative] and [positive]: {result['neutral_between']}")
    return "\n".join(lines)
