"""Compare a policy with another on held-out prompts: judge win rate, reward, KL, diversity, relevance, meta lines.

The numbers that show what PPO did beyond its own reward: a judge's win rate (with a prompt-bootstrap CI), the
KL of the policy's samples to the start policy, distinct-n and repetition (degenerate loops), prompt relevance
(off-topic stories) and the share of samples with Reddit meta lines (a karma-trained reward being gamed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core import bootstrap_ci, choice_credit
from ..signatures import RewardFn
from ..text import meta_share, repeated_share, word_ngrams


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a set of texts (Li et al. 2016); 0 when there are none."""
    grams = [g for t in texts for g in word_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Share of texts in which some word n-gram occurs more than once: loops such as 'and then and then'."""
    if not texts:
        return 0.0
    return float(np.mean([repeated_share(t, n) > 0 for t in texts]))


def text_stats(prompts: list[str], texts: list[str], relevance: RewardFn | None = None) -> dict:
    """Diversity, repetition, length, meta-line share and (with a relevance scorer) mean prompt relevance."""
    stats = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
             "repetition": repetition_rate(texts), "meta_share": meta_share(texts),
             "words": float(np.mean([len(t.split()) for t in texts])) if texts else 0.0}  # fmt: skip
    if relevance is not None:
        stats["relevance"] = float(np.mean(relevance(prompts, texts)))
    return stats


def mean_ci(values: Sequence[float], groups: Sequence[str]) -> dict:
    """Mean of `values` with a 95% CI that resamples groups (prompts)."""
    lo, hi = bootstrap_ci(values, groups)
    return {"mean": float(np.mean(values)), "lo": lo, "hi": hi}


def paired_means(start: Sequence[float], trained: Sequence[float], groups: Sequence[str]) -> dict:
    """{'start', 'trained', 'diff'}: each side's mean_ci and that of the per-sample difference trained - start, for
    scores of two policies' responses to the same prompts, in the same order.

    The difference is bootstrapped as pairs, so the spread between prompts (some openings read positive whatever
    follows) cancels out of its CI; two separate CIs that overlap can still hide a clear difference.
    """
    if len(start) != len(trained):
        raise ValueError(f"paired scores need one start and one trained score each: {len(start)} != {len(trained)}")
    return {"start": mean_ci(start, groups), "trained": mean_ci(trained, groups),
            "diff": mean_ci([b - a for a, b in zip(start, trained)], groups)}  # fmt: skip


def win_rate(judge: RewardFn, prompts: list[str], new: list[str], start: list[str]) -> dict:
    """Judge's preference of `new` over `start` responses to the same prompts: wins count 1, ties 1/2 (the one tie
    rule, `core.choice_credit`, with `new` as the choice to be right about).

    Returns win_rate with win_rate_lo/hi (95% CI resampling prompts), n, and both sides' mean judge scores.
    """
    new_scores = [float(s) for s in judge(prompts, new)]
    start_scores = [float(s) for s in judge(prompts, start)]
    return {**scored_win_rate(new_scores, start_scores, prompts),
            "judge_new": float(np.mean(new_scores)), "judge_start": float(np.mean(start_scores)),
            "judge_new_scores": new_scores, "judge_start_scores": start_scores}  # fmt: skip


def scored_win_rate(new_scores: Sequence[float], start_scores: Sequence[float], groups: Sequence[str]) -> dict:
    """win_rate, win_rate_lo/hi (95% CI resampling `groups`, i.e. prompts) and n from scores already computed:
    a higher new score wins 1, an equal one 1/2 (`core.choice_credit`)."""
    pairs = torch.tensor([list(start_scores), list(new_scores)], dtype=torch.float64).T  # (N, 2): start, new
    wins = choice_credit(pairs, torch.ones(len(pairs), dtype=torch.long)).tolist()
    lo, hi = bootstrap_ci(wins, groups)
    return {"win_rate": float(np.mean(wins)), "win_rate_lo": lo, "win_rate_hi": hi, "n": len(wins)}
