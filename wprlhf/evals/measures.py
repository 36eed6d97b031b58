"""Compare a policy with another on held-out prompts: judge win rate, reward, KL, diversity, relevance, meta lines.

The numbers that show what PPO did beyond its own reward: a judge's win rate (with a prompt-bootstrap CI), the
KL of the policy's samples to the start policy, distinct-n and repetition (degenerate loops), prompt relevance
(off-topic stories) and the share of samples with Reddit meta lines (a karma-trained reward being gamed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core import bootstrap_ci, choice_credit, masked_sum
from ..forwards import policy_forward, sampling_floor
from ..generation import GenerationConfig, decode_responses, encode_prompts, fit_positions, sample
from ..models import stop_token_ids
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


@torch.no_grad()
def sample_with_kl(policy, reference, tokenizer, prompts: list[str], config: GenerationConfig, seed: int = 0,
                   batch_size: int = 16, progress: bool = False, chat_template: bool = True,
                   ) -> tuple[list[str], list[float]]:  # fmt: skip
    """Sample one response per prompt from `policy` and the KL of each to `reference`, in nats per response.

    KL is the k1 estimate sum_t log pi(y_t) - log ref(y_t) over the response's tokens (its stop token included),
    both at the sampling temperature and under the distribution sampled from: with config.min_new_tokens > 0 the
    stop tokens are masked while t < min_new_tokens and the rest renormalised (`forwards.sampling_floor`), so the
    estimate is of a true KL, >= 0 in expectation. PPO's logged `kl` and `wprlhf eval`'s are the same quantity.
    `reference` = None gives zeros. chat_template False feeds the prompts as plain text to be continued (the
    review tasks), as PPO fed them.
    """
    from tqdm.auto import tqdm

    floor = sampling_floor(config.min_new_tokens, config.stop_at_eos, stop_token_ids(tokenizer))
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, kls = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", disable=not progress):
        queries, query_mask = encode_prompts(tokenizer, prompts[start : start + batch_size], None, chat_template)
        # The KL's forwards below must read the same (clipped) prompts the sampler did.
        queries, query_mask = fit_positions(policy, queries.to(device), query_mask.to(device), config.max_new_tokens)
        gen = sample(policy, queries, query_mask, config, stop_token_ids(tokenizer), tokenizer.pad_token_id,
                     generator, tokenizer)  # fmt: skip
        texts += decode_responses(tokenizer, gen.responses, gen.response_mask)
        if reference is None:
            kls += [0.0] * len(gen.responses)
            continue
        batch = (queries, query_mask, gen.responses, gen.response_mask)
        ref_logprobs, _, _ = policy_forward(reference, *batch, config.temperature, **floor)
        # The sampler's log-probs are over the full vocabulary: under a floor the policy's are taken as the reference's.
        logprobs = policy_forward(policy, *batch, config.temperature, **floor)[0] if floor else gen.logprobs
        kls += masked_sum(logprobs - ref_logprobs, gen.response_mask, dim=1).tolist()
    return texts, kls
