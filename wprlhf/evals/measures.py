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


def scored_win_rate(new_scores: Sequence[float], start_scores: Sequence[float], groups: Sequence[str]) -> dict:
    """win_rate, win_rate_lo/hi (95% CI resampling `groups`, i.e. prompts), n and each pair's credit (`credits`)
    from scores already computed: a higher new score wins 1, an equal one 1/2 (`core.choice_credit`)."""
    pairs = torch.tensor([list(start_scores), list(new_scores)], dtype=torch.float64).T  # (N, 2): start, new
    wins = choice_credit(pairs, torch.ones(len(pairs), dtype=torch.long)).tolist()
    lo, hi = bootstrap_ci(wins, groups)
    return {"win_rate": float(np.mean(wins)), "win_rate_lo": lo, "win_rate_hi": hi, "n": len(wins), "credits": wins}


def lc_win_rate(credits: Sequence[float], new_lengths: Sequence[float], old_lengths: Sequence[float],
                groups: Sequence[str], n_boot: int = 400, seed: int = 0) -> dict:
    """Length-controlled win rate (Dubois et al. 2024, AlpacaEval 2 LC, eq. 1 reduced to one pair of policies): a
    logistic model of the judge's preference on the length difference, P(new wins) = sigmoid(theta_0 + theta_1 *
    tanh(delta / std(delta))), delta = new length - old length, read at delta = 0: sigmoid(theta_0).

    credits (N,): 1 a win of `new`, 0 a loss, 1/2 a tie (fitted as half a win and half a loss); lengths (N,) in
    words. Returns lc_win_rate with lc_win_rate_lo/hi (95 % CI, refitting on prompts resampled by `groups`) and
    length_coef (theta_1: > 0, the judge prefers the longer response). Where every delta is 0 (fixed-length
    responses) the model has the intercept alone and LC equals the raw win rate."""
    from sklearn.linear_model import LogisticRegression

    credit = np.asarray(credits, dtype=np.float64)
    delta = np.asarray(new_lengths, dtype=np.float64) - np.asarray(old_lengths, dtype=np.float64)
    if not len(credit) or len(delta) != len(credit) or not np.isfinite(credit).all() or not np.isfinite(delta).all():
        raise ValueError(f"lc_win_rate needs one finite credit and length difference per pair, got {len(credit)} "
                         f"credits and {len(delta)} differences")  # fmt: skip
    scale = delta.std()

    def fit(rows: np.ndarray) -> tuple[float, float]:
        c = credit[rows]
        x = np.tanh(delta[rows] / scale)[:, None] if scale > 0 else np.zeros((len(rows), 1))
        if c.min() == c.max():  # one class only: the intercept is unbounded, and the rate is that class's
            return float(c[0]), 0.0
        # Each pair twice, as a win weighted by its credit and a loss weighted by the rest (ties count 1/2 each).
        X, y, w = np.vstack([x, x]), np.r_[np.ones(len(c)), np.zeros(len(c))], np.r_[c, 1 - c]
        # sklearn's default L2 (C = 1) on the length coefficient alone (lbfgs leaves the intercept free): where the
        # longer side always wins, an unpenalised fit runs off to infinity and its reading at delta 0 means nothing.
        model = LogisticRegression(C=1.0).fit(X, y, sample_weight=w)
        return float(1 / (1 + np.exp(-model.intercept_[0]))), float(model.coef_[0, 0]) if scale > 0 else 0.0

    rate, coef = fit(np.arange(len(credit)))
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    members = list(by_group.values())
    rng = np.random.default_rng(seed)
    boots = [fit(np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))]))[0]
             for _ in range(n_boot)]  # fmt: skip
    return {"lc_win_rate": rate, "lc_win_rate_lo": float(np.percentile(boots, 2.5)),
            "lc_win_rate_hi": float(np.percentile(boots, 97.5)), "length_coef": coef}  # fmt: skip


def cut_words(texts: Sequence[str], words: int) -> list[str]:
    """Each text's first `words` words: distinct-n at equal length, so a side does not look more diverse for
    being shorter (distinct-n falls as a text grows)."""
    return [" ".join(t.split()[:words]) for t in texts]


def looped(texts: Sequence[str], span: int = 12) -> list[str]:
    """The looping-only baseline: each text's first `span` words said over and over to the text's own length in
    words, what a policy that learned only to repeat itself writes. A judge worth quoting must not prefer it to the
    text it came from (issue 38: PPO on a weak reward model learned looping dialogue)."""
    out = []
    for text in texts:
        words = text.split()
        head = words[:span]
        out.append(" ".join((head * (len(words) // max(len(head), 1) + 1))[: len(words)]))
    return out


def pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean cosine distance, 1 - cos, over every two of k unit-length embeddings (k, H) of one prompt's samples:
    the semantic spread of a policy's answers to one prompt (Lanchantin et al. 2025, DivPO's diversity measure);
    0 for identical samples. Needs k >= 2."""
    k = embeddings.shape[0]
    if k < 2:
        raise ValueError(f"pairwise distance needs at least 2 samples of a prompt, got {k}")
    sims = embeddings @ embeddings.T  # (k, k)
    off = ~torch.eye(k, dtype=torch.bool)
    return float((1 - sims[off]).mean())
