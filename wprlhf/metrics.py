"""One writer for metrics.csv, TensorBoard and samples.jsonl; the metric names live here.

The same names appear in the CSV header, TensorBoard tags and reports, so a plot of `kl` means one thing.
On resume, rows past the checkpoint's step are dropped, so a resumed run's files match an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

# Per PPO step. Units: kl in nats per response (sum over its tokens); times in seconds.
METRIC_NAMES = (
    "step",                # PPO steps done
    "episodes",            # prompt -> response episodes trained on so far
    "reward_mean",         # mean of reward_fn's scores over the batch
    "reward_std",
    "judge_mean",          # mean true score of a hidden judge on the same responses (loop/demo runs only)
    "reward_total",        # mean per-response sum of per-token rewards: score - beta * KL
    "kl",                  # mean per-response KL to the reference, k1 estimator (sum of log p - log q)
    "kl_k3",               # the same with the k3 estimator (non-negative, lower variance)
    "kl_coef",             # beta used in this step's rewards
    "entropy",             # mean per-token policy entropy, nats
    "policy_loss",
    "value_loss",
    "clipfrac",            # share of tokens where the clipped surrogate was active
    "value_clipfrac",
    "approxkl",            # KL of the policy after each minibatch to the rollout policy (k3), per token
    "explained_variance",  # of the returns by the rollout values
    "value_mean",
    "return_mean",
    "grad_norm",           # before clipping
    "response_length",     # mean tokens per response, stop token included
    "lr",
    "ppo_minibatches",     # optimizer steps this PPO step (fewer when target_approxkl stops early)
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


def _truncate_rows(path: Path, keep) -> None:
    """Rewrite a CSV/JSONL file keeping the lines for which keep(line) is True (header always kept), atomically."""
    from .checkpoint import write_text_atomic

    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    write_text_atomic(path, "".join(lines[:1] + [ln for ln in lines[1:] if keep(ln)]))


class MetricsLogger:
    """metrics.csv (one row per step), TensorBoard events under tb/, and samples.jsonl."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, names: tuple[str, ...] = METRIC_NAMES):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.names = names
        self.csv_path = self.out_dir / "metrics.csv"
        self.samples_path = self.out_dir / "samples.jsonl"
        if resume_step is not None:
            _truncate_rows(self.csv_path, lambda ln: int(float(ln.split(",", 1)[0])) <= resume_step)
            if self.samples_path.exists():
                kept = [ln for ln in self.samples_path.read_text().splitlines(keepends=True)
                        if json.loads(ln)["step"] <= resume_step]  # fmt: skip
                from .checkpoint import write_text_atomic

                write_text_atomic(self.samples_path, "".join(kept))
        new_file = not self.csv_path.exists()
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
        if new_file:
            self._csv.write(",".join(names) + "\n")
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
                    kls: list[float], reward_totals: list[float], echo: bool = True) -> None:  # fmt: skip
        """Append decoded samples to samples.jsonl (and print them): what the numbers in metrics.csv look like."""
        from tqdm.auto import tqdm

        with open(self.samples_path, "a", encoding="utf-8") as f:
            for prompt, response, score, kl, total in zip(prompts, responses, scores, kls, reward_totals):
                row = {"step": step, "prompt": prompt, "response": response, "score": score, "kl": kl, "reward_total": total}
                f.write(json.dumps(row) + "\n")
                if echo:
                    tqdm.write(f"--- step {step}  score {score:.3f}  kl {kl:.2f}  reward {total:.3f}\n"
                               f"> {prompt[:200]}\n{response[:400]}")  # fmt: skip

    def close(self) -> None:
        self._csv.close()
        self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv -> list of {name: float} rows (empty cells are dropped)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
