"""Best-of-n sampling: n responses per prompt from a policy, the reward's best one kept.

The baseline every RLHF paper reports beside its RL policy (Stiennon et al. 2020, sec. 4.1; Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization"): no training at all, only a reward model choosing among samples.
Its distance from the sampling policy has a closed form, KL(best-of-n || policy) = log n - (n - 1) / n nats
(Stiennon et al. 2020, appendix G.3; exact when the reward has no ties), which puts it on the same KL axis as PPO.

One pool of n samples per prompt serves every smaller n too: best-of-m for m < n picks among the pool's first m
samples, which are themselves m independent samples. `wprlhf sample --best-of N --reward SPEC` writes it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..generation import GenerationConfig, generate_k
from ..signatures import RewardFn


def kl_bound(n: int) -> float:
    """KL(best-of-n || sampling policy) in nats per response: log n - (n - 1) / n (Stiennon et al. 2020, app. G.3)."""
    if n < 1:
        raise UserError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class Pool:
    """n samples per prompt and their scores.

    prompts (P,); responses (P, n) nested lists; scores (P, n) float64, from one reward_fn call over all P x n;
    finished (P, n) nested bools, whether each response ended with a stop token (None: not known, or fixed-length
    sampling, where every response reaches the cap by design).
    """

    prompts: list[str]
    responses: list[list[str]]
    scores: np.ndarray
    finished: list[list[bool]] | None = None

    def rows(self) -> list[dict]:
        """One {"prompt", "responses", "scores"[, "finished"]} dict per prompt, in the pool's order (a pool file's
        lines)."""
        out = [{"prompt": p, "responses": rs, "scores": [float(x) for x in sc]}
               for p, rs, sc in zip(self.prompts, self.responses, self.scores)]  # fmt: skip
        for row, done in zip(out, self.finished or []):
            row["finished"] = [bool(x) for x in done]
        return out

    @classmethod
    def from_rows(cls, prompts: list[str], rows: list[dict]) -> Pool:
        """The pool of a pool file's lines (`rows`' inverse), answering `prompts` (the lines' own prompts may be
        the instructed queries); finished is kept where every line has it."""
        finished = [r["finished"] for r in rows] if all("finished" in r for r in rows) else None
        return cls(prompts, [r["responses"] for r in rows], np.asarray([r["scores"] for r in rows], dtype=np.float64),
                   finished)  # fmt: skip

    def best(self, m: int) -> tuple[list[str], list[float]]:
        """Best-of-m for m <= n: each prompt's highest-scoring response among its first m samples (the first one
        of equal scores), and that score."""
        picks = self.picks(m)
        return ([rs[i] for rs, i in zip(self.responses, picks)],
                [float(self.scores[p, i]) for p, i in enumerate(picks)])  # fmt: skip

    def picks(self, m: int, by: np.ndarray | None = None) -> np.ndarray:
        """(P,) index of each prompt's pick among its first m samples: the highest score, or the highest value of
        `by` (P, n) where given (e.g. words: a policy rewarded for length alone); the first of equals."""
        n = self.scores.shape[1]
        if not 1 <= m <= n:
            raise UserError(f"best-of-{m} needs 1 <= m <= {n}, the samples per prompt in the pool")
        return (self.scores if by is None else by)[:, :m].argmax(1)


def sample_pool(policy, tokenizer, prompts: list[str], n: int, reward_fn: RewardFn, config: GenerationConfig,
                seed: int = 0, batch_size: int = 16, progress: bool = True, sampling_context=None,
                missing_eos_penalty: float = 0.0, **kwargs) -> Pool:  # fmt: skip
    """Sample n responses to each prompt and score them all with reward_fn; the scores must be finite. Other
    keyword arguments go to `generation.generate` (max_prompt_length, chat_template). sampling_context (e.g. a
    `torch.autocast`) is entered for the sampling only: the reward scores outside it, as it was trained.
    missing_eos_penalty: subtracted from the score of each response cut at the cap (trl's name), so best-of-n
    prefers a finished response; nothing is cut in fixed-length sampling."""
    if n < 1:
        raise UserError(f"--best-of must be >= 1, got {n}")
    if not prompts:
        raise UserError("best-of-n got no prompts; give --prompts a file with at least one prompt")
    done: list[bool] = []
    with sampling_context or contextlib.nullcontext():
        responses = generate_k(policy, tokenizer, prompts, n, config, seed=seed, batch_size=batch_size,
                               progress=progress, finished=done, **kwargs)  # fmt: skip
    flat = [r for rs in responses for r in rs]
    scores = np.asarray(reward_fn([p for p in prompts for _ in range(n)], flat), dtype=np.float64)
    if scores.shape != (len(flat),):
        raise UserError(f"the reward gave {scores.size} scores for {len(flat)} responses; best-of-n needs one score "
                        "per response")  # fmt: skip
    if not np.isfinite(scores).all():
        raise UserError(f"the reward gave {int((~np.isfinite(scores)).sum())} non-finite scores (NaN or inf) for "
                        f"{len(flat)} responses; best-of-n needs finite scores: check the reward")  # fmt: skip
    if missing_eos_penalty and not config.fixed_length:
        scores = scores - missing_eos_penalty * (1.0 - np.asarray(done, dtype=np.float64))
    finished = None if config.fixed_length else [done[i * n : (i + 1) * n] for i in range(len(prompts))]
    return Pool(prompts, responses, scores.reshape(len(prompts), n), finished)


def write_ranked(path, pool: Pool, policy: str, reward: str) -> None:
    """`wprlhf sample --best-of N`'s file: per prompt, its n responses sorted by score, best first (so the first
    response is best-of-n), with their scores; a `wprlhf sample` file that `wprlhf eval` and `label add` read."""
    import json

    from ..files import write_text_atomic

    lines = []
    for row in pool.rows():
        order = sorted(range(len(row["responses"])), key=lambda i: -row["scores"][i])  # stable: earlier of equal first
        ranked = {key: [row[key][i] for i in order] for key in ("responses", "scores", "finished") if key in row}
        lines.append(json.dumps({"prompt": row["prompt"], **ranked, "policy": policy, "best_of": len(order),
                                 "reward": reward}))  # fmt: skip
    write_text_atomic(path, "\n".join(lines) + "\n")
