"""One writer for metrics.csv, TensorBoard and samples.jsonl; the metric names live here.

The same names appear in the CSV header, TensorBoard tags and reports, so a plot of `kl` means one thing.
On resume, rows past the checkpoint's step are dropped, so a resumed run's files match an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .files import iter_jsonl, read_csv_floats, write_text_atomic

# Per PPO step. Units: kl in nats per response (sum over its tokens); times in seconds.
METRIC_NAMES = (
    "step",                # PPO steps done
    "episodes",            # prompt -> response episodes trained on so far
    "score_mean",          # mean of reward_fn's scores over the batch, as given (before score_norm)
    "score_std",
    "judge_mean",          # mean true score of a hidden judge on the same responses (loop/demo runs only)
    "rlhf_reward_mean",    # mean per-response sum of per-token rewards: score - kl_coef * KL (trl's name)
    "kl",                  # mean per-response KL to the reference, k1 estimator (sum of log p - log q)
    "kl_k3",               # the same with the k3 estimator (non-negative, lower variance)
    "kl_coef",             # the KL coefficient used in this step's rewards
    "entropy",             # mean per-token policy entropy, nats
    "policy_loss",
    "value_loss",
    "clipfrac",            # share of tokens where the clipped surrogate was active
    "value_clipfrac",
    "approxkl",            # KL of the policy after each minibatch to the rollout policy (k3), per token
    "kl_term",             # GRPO: the loss's KL term, k3 of the policy to the reference, per token
    "explained_variance",  # of the returns by the rollout values
    "value_mean",
    "return_mean",
    "grad_norm",           # the policy's gradient norm (with a shared value head, its head's too), before clipping
    "value_grad_norm",     # the separate value model's, before clipping
    "response_length",     # mean tokens per response, stop token included
    "truncated_share",     # share of responses cut at response_length with no stop token (empty: fixed-length mode)
    "lr",
    "ppo_minibatches",     # minibatch updates this PPO step (fewer when target_approxkl stops early)
    "time_generate",
    "time_score",
    "time_train",
    "episodes_per_s",
)  # fmt: skip


# Per optimizer step of reward-model (and classifier) training.
RM_METRIC_NAMES = (
    "step",
    "examples",      # comparisons trained on so far
    "loss",          # comparison loss of this batch (Bradley-Terry for pairs)
    "accuracy",      # share of this batch's comparisons whose best response scored highest
    "val_loss",      # on held-out prompts, every eval_every steps
    "val_accuracy",
    "lr",
    "elapsed_s",
)  # fmt: skip


# Per optimizer step of DPO (dpo.py). Rewards are DPO's implicit ones: beta * (log pi(y) - log ref(y)), nats x beta.
DPO_METRIC_NAMES = (
    "step",
    "pairs",            # (prompt, chosen, rejected) pairs trained on so far
    "loss",             # mean DPO (or IPO) loss of this step's pairs
    "accuracy",         # share of this step's pairs whose chosen response has the larger implicit reward
    "chosen_reward",    # mean implicit reward of the chosen responses
    "rejected_reward",
    "margin",           # chosen_reward - rejected_reward, mean over pairs
    "grad_norm",        # before clipping
    "lr",
    "val_loss",         # on held-out prompts' pairs, every eval_every steps and at the last step
    "val_accuracy",
    "val_margin",
    "elapsed_s",
)  # fmt: skip


# Per optimizer step of text-classifier training (classifier.py).
CLASSIFIER_METRIC_NAMES = (
    "step",
    "examples",      # texts trained on so far
    "loss",          # cross-entropy of this batch, nats per text
    "accuracy",      # share of this batch's texts whose label got the higher logit
    "val_loss",      # on the held-out texts, every eval_every steps and at the last step
    "val_accuracy",
    "lr",
    "elapsed_s",
)  # fmt: skip


# Per optimizer step of supervised fine-tuning (sft.py). Losses in nats per response token; step 0 = untuned.
SFT_METRIC_NAMES = (
    "step",
    "examples",      # stories trained on so far
    "tokens",        # response tokens trained on so far (the tokens the loss counts)
    "loss",          # mean negative log-likelihood per response token of this step's batch
    "val_loss",      # the same on held-out prompts' stories, at step 0 and every eval_every steps
    "lr",
    "grad_norm",     # before clipping
    "tokens_per_s",  # prompt + response tokens (no padding) through forward and backward per second
    "elapsed_s",     # since the run started, data loading and evaluations included
)  # fmt: skip


# Metric names of earlier versions -> today's. "reward" meant the raw score in one column and the KL-penalised
# return in another; run directories written before the rename still read (report, loop, --resume).
RENAMED = {"reward_mean": "score_mean", "reward_std": "score_std", "reward_total": "rlhf_reward_mean"}


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv (or loop_metrics.csv) -> list of {name: float} rows, old names translated (RENAMED)."""
    return [{RENAMED.get(k, k): v for k, v in row.items()} for row in read_csv_floats(path)]


def _rewrite_rows(path: Path, names: tuple[str, ...], last_step: int) -> tuple[str, ...]:
    """Rewrite metrics.csv for a resumed run, atomically: the rows up to last_step, old names translated (RENAMED),
    under the columns `names` plus any the file has that `names` lacks (kept, not dropped). Returns the columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [RENAMED.get(name, name) for name in reader.fieldnames or []]
        rows = [{RENAMED.get(k, k): v for k, v in row.items()} for row in reader]
    columns = tuple(names) + tuple(name for name in header if name not in names)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(row for row in rows if int(float(row["step"])) <= last_step)
    write_text_atomic(path, buf.getvalue())
    return columns


class MetricsLogger:
    """metrics.csv (one row per step), TensorBoard events under tb/, and samples.jsonl."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, names: tuple[str, ...] = METRIC_NAMES):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.names = names
        self.csv_path = self.out_dir / "metrics.csv"
        self.samples_path = self.out_dir / "samples.jsonl"
        if resume_step is not None and self.csv_path.exists():
            self.names = _rewrite_rows(self.csv_path, names, resume_step)
        if resume_step is not None:
            if self.samples_path.exists():
                kept = [row for _, row in iter_jsonl(self.samples_path) if row["step"] <= resume_step]
                write_text_atomic(self.samples_path, "".join(json.dumps(row) + "\n" for row in kept))
        new_file = not self.csv_path.exists()
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
        if new_file:
            self._csv.write(",".join(self.names) + "\n")
        # purge_step hides events a killed run wrote after its last checkpoint.
        self.tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, stats: dict) -> None:
        """One CSV row and TensorBoard scalars for `step`; names not in self.names are ignored."""
        row = {"step": step, **stats}
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if row.get(n) is None else row.get(n, "") for n in self.names])
        self._csv.write(buf.getvalue())
        self._csv.flush()
        os.fsync(self._csv.fileno())
        for name in self.names[1:]:
            if isinstance(row.get(name), (int, float)):
                self.tb.add_scalar(name, row[name], step)
        self.tb.flush()

    def log_samples(self, step: int, prompts: list[str], responses: list[str], scores: list[float],
                    kls: list[float], rlhf_rewards: list[float], echo: bool = True,
                    finished: list[bool] | None = None) -> None:  # fmt: skip
        """Append decoded samples to samples.jsonl (and print them): what the numbers in metrics.csv look like.
        rlhf_rewards: score - kl_coef * KL of each response; finished: whether it ended with a stop token (False =
        cut at the length cap)."""
        from tqdm.auto import tqdm

        finished = finished if finished is not None else [None] * len(prompts)
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for prompt, response, score, kl, total, done in zip(prompts, responses, scores, kls, rlhf_rewards, finished):
                row = {"step": step, "prompt": prompt, "response": response, "score": score, "kl": kl, "rlhf_reward": total}
                if done is not None:
                    row["finished"] = bool(done)
                f.write(json.dumps(row) + "\n")
                if echo:
                    tqdm.write(f"--- step {step}  score {score:.3f}  kl {kl:.2f}  reward {total:.3f}\n"
                               f"> {prompt[:200]}\n{response[:400]}")  # fmt: skip

    def close(self) -> None:
        self._csv.close()
        self.tb.close()


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average over ~1/10 of the run, bias-corrected so the curve starts at the data: the
    smoothed line drawn over every per-step curve (report.py's plots, SFT's loss.png).

    >>> [round(v, 3) for v in smooth([1.0, 0.0, 0.0])]
    [1.0, 0.333, 0.143]
    """
    beta = 1 - 1 / max(2, len(values) / 10)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
