"""`wprlhf rm table`: reward models and baselines on the karma test prompts, plain and length-debiased.

Two test splits of the same held-out prompts (those of comparisons_test, which no shared training pair has):
- plain: comparisons_test itself (at most 20 pairs a prompt, lengths as they come);
- debiased: every qualifying pair of those prompts rebuilt from prompt_responses with the data README's pair rule
  (`karma_pairs`, no per-prompt cap) and kept only where the two stories' lengths are within LENGTH_MATCHED_RATIO
  (longest / shortest in words). The pairs already have a >= 2x vote ratio, so this is LitBench's (Fein et al.
  2025) debiasing by length and margin; the data has no timestamps to debias by time.

Every model and baseline is scored by one path (`scorer_credit`), so a row differs from another only in its scorer.
Models are compared with TF-IDF, and with the first model given, by a paired bootstrap of the per-comparison
difference in credit that resamples prompts (`bootstrap_ci`): two CIs that overlap can still hide a clear
difference, and the pairs of one prompt are not independent.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from ..core import bootstrap_ci
from ..data import Comparison, karma_pairs_of, load_comparisons, load_responses, prompt_key
from ..errors import UserError
from ..files import write_json_atomic, write_text_atomic
from ..rewards.reward_model import (LENGTH_MATCHED_RATIO, RewardConfig, accuracy_ci, group_of, load,
                                    read_train_config, resolve_comparisons, score, scorer_credit, tfidf_scorer,
                                    word_count)  # fmt: skip

TEST_FILE = "comparisons_test.csv"
TRAIN_FILE = "comparisons_train.csv.gz"
LENGTH, TFIDF = "longer wins (words)", "TF-IDF logistic regression"
SCORES_FILE = "rm_table_scores.json"


def karma_test_splits(data_dir: str | Path, max_length_ratio: float = LENGTH_MATCHED_RATIO) -> dict[str, list[Comparison]]:
    """{'plain': comparisons_test, 'debiased': all length-matched qualifying pairs of its prompts}, both with
    Reddit meta lines cleaned (they leak karma). Raises UserError when data_dir lacks a file it needs."""
    data_dir = Path(data_dir)
    for name in (TEST_FILE, TRAIN_FILE):
        if not (data_dir / name).exists():
            raise UserError(f"{data_dir} has no {name}: rm table needs the karma data's directory "
                            "(../shared/data/writing_prompts, or one of that layout)")  # fmt: skip
    plain = list(load_comparisons(data_dir / TEST_FILE))
    debiased = karma_pairs_of(plain, load_responses(data_dir), max_pairs_per_prompt=None,
                              max_length_ratio=max_length_ratio)  # fmt: skip
    return {"plain": plain, "debiased": debiased}


def model_command(model_dir: Path, trained: dict) -> str:
    """The `wprlhf rm train` line that made a model: its saved settings that differ from RewardConfig's defaults."""
    defaults = dataclasses.asdict(RewardConfig())
    flags = []
    for name, default in defaults.items():
        value = trained.get(name, default)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"--no-{name.replace('_', '-')}" if value is False else f"{flag} {value}")
    return " ".join(["wprlhf rm train", *flags, "--out", model_dir.name])


def _check_unseen(model_dir: Path, trained: dict, test_keys: set[str]) -> None:
    """A UserError when the model trained on a test prompt (its table row would flatter it) or its training data
    cannot be found to check."""
    if not (model_dir / "config.json").exists():
        raise UserError(f"reward model directory {model_dir} has no config.json; train one with "
                        f"`wprlhf rm train --out {model_dir}`")  # fmt: skip
    source = trained.get("data")
    if not source or not Path(source).exists():
        raise UserError(f"{model_dir}: its training data ({source or 'not recorded'}) cannot be read to check that "
                        "it never saw a test prompt; run rm table where that path resolves")  # fmt: skip
    pairs_per_prompt = trained.get("pairs_per_prompt", RewardConfig.pairs_per_prompt)
    seen = {prompt_key(c.prompt) for c in resolve_comparisons(source, keep_meta=True, pairs_per_prompt=pairs_per_prompt)}
    overlap = seen & test_keys
    if overlap:
        raise UserError(f"{model_dir} trained on {len(overlap)} of the {len(test_keys)} test prompts (its data: "
                        f"{source}), so its row would flatter it; train it on pairs of other prompts "
                        "(comparisons_train holds none of them)")  # fmt: skip


def _row(name: str, command: str, credits: dict[str, np.ndarray], splits: dict[str, list[Comparison]]) -> dict:
    row: dict = {"name": name, "command": command}
    for split, comparisons in splits.items():
        accuracy, ci95 = accuracy_ci(credits[split], [group_of(c) for c in comparisons])
        row[split] = {"accuracy": accuracy, "ci95": ci95, "n": len(comparisons)}
    return row


def _paired(a: np.ndarray, b: np.ndarray, comparisons: list[Comparison]) -> dict:
    """Mean of a - b (credits on the same comparisons) with its prompt-bootstrap 95% CI."""
    diff = a - b
    lo, hi = bootstrap_ci(diff.tolist(), [group_of(c) for c in comparisons])
    return {"diff": float(diff.mean()), "ci95": [lo, hi]}


def build(models: list[str | Path], data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Score every model and baseline on both splits; write rm_table.json, rm_table.md and rm_table.csv to out_dir.

    Returns {'splits': {name: {n, prompts, rule}}, 'rows': [...]}, a row per baseline (length, TF-IDF fit on
    comparisons_train) and per model: accuracy, ci95 and n on each split, and for a model vs_tfidf and
    vs_first (paired bootstrap of the credit difference over prompts), then the first model ensembled with TF-IDF
    (both standardised, equal weights): whether ensembling helps, measured. Raises UserError on a model that
    trained on a test prompt, or one that is not a reward model directory.
    """
    splits = karma_test_splits(data_dir)
    for name, comparisons in splits.items():
        if not comparisons:
            raise UserError(f"the {name} test split of {data_dir} is empty: no pair of its test prompts qualifies")
    test_keys = {prompt_key(c.prompt) for c in splits["plain"]}
    train = list(load_comparisons(Path(data_dir) / TRAIN_FILE))
    baselines = {LENGTH: (word_count, "baseline: the longer story (in words) wins"),
                 TFIDF: (tfidf_scorer(train), f"baseline: fit on {TRAIN_FILE} ({len(train)} pairs)")}
    credits: dict[str | int, dict[str, np.ndarray]] = {}
    rows = []
    for name, (scorer, command) in baselines.items():
        if scorer is not None:  # TF-IDF cannot be fit on a training file too small to hold a shared term
            credits[name] = {s: scorer_credit(scorer, c).numpy() for s, c in splits.items()}
            rows.append(_row(name, command, credits[name], splits))
    texts = sorted({(c.prompt, r) for cs in splits.values() for c in cs for r in c.responses})
    index = {t: i for i, t in enumerate(texts)}
    for model_dir in map(Path, models):  # every model is checked before any is scored
        _check_unseen(model_dir, read_train_config(model_dir), test_keys)
    first = None

    def add_row(name: str, command: str, flat: np.ndarray) -> tuple[dict, int]:
        """A scorer of the distinct texts (flat, in `texts` order) as a row, with its paired differences; returns
        the row and its key in `credits` (its position: two models may share a directory name)."""
        key = len(rows)
        credits[key] = {s: scorer_credit(lambda pairs: flat[[index[p] for p in pairs]], c).numpy()
                        for s, c in splits.items()}  # fmt: skip
        row = _row(name, command, credits[key], splits)
        for split, comparisons in splits.items():
            if TFIDF in credits:
                row[split]["vs_tfidf"] = _paired(credits[key][split], credits[TFIDF][split], comparisons)
            if first is not None:
                row[split]["vs_first"] = _paired(credits[key][split], credits[first][split], comparisons)
        rows.append(row)
        return row, key

    for model_dir in map(Path, models):
        flat = _model_scores(model_dir, texts, progress)
        row, key = add_row(model_dir.name, model_command(model_dir, read_train_config(model_dir)), flat)
        row["train_minutes"] = _train_minutes(model_dir)
        if first is None:
            first, first_name, first_flat = key, model_dir.name, flat
    if first is not None and TFIDF in credits:  # ensembling, measured: the first model and TF-IDF, equal weights
        both = (_standard(first_flat) + _standard(np.asarray(baselines[TFIDF][0](texts), dtype=np.float64))) / 2
        add_row(f"{first_name} + TF-IDF", f"ensemble: the mean of {first_name}'s and TF-IDF's scores, each "
                "standardised", both)  # fmt: skip
    table = {"splits": {s: {"n": len(c), "prompts": len({group_of(x) for x in c})} for s, c in splits.items()},
             "length_ratio": LENGTH_MATCHED_RATIO, "data": str(data_dir), "rows": rows}  # fmt: skip
    table["splits"]["plain"]["rule"] = f"{TEST_FILE} as shipped (<= 20 pairs a prompt)"
    table["splits"]["debiased"]["rule"] = (f"all qualifying pairs of the same prompts from prompt_responses, "
                                           f"longest/shortest <= {LENGTH_MATCHED_RATIO} in words")  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "rm_table.json", table)
    write_text_atomic(out_dir / "rm_table.md", markdown(table))
    _write_csv(out_dir / "rm_table.csv", rows)
    return table


def _model_scores(model_dir: Path, texts: list[tuple[str, str]], progress: bool) -> np.ndarray:
    """The model's score (float64) of each (prompt, story), from SCORES_FILE beside the model when it holds these
    very texts (a fingerprint of them and of the weights), else scored (`reward_model.score`, every window) and
    saved there: a table of several models reruns in seconds once each has been scored."""
    digest = hashlib.sha256()
    for prompt, response in texts:
        digest.update(f"{len(prompt)}:{prompt}{len(response)}:{response}".encode())
    for name in sorted(p.name for p in model_dir.glob("*.safetensors")):
        stat = (model_dir / name).stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    key, cached = digest.hexdigest(), model_dir / SCORES_FILE
    if cached.exists():
        try:
            saved = json.loads(cached.read_text())
            if saved.get("key") == key and len(saved["scores"]) == len(texts):
                return np.asarray(saved["scores"], dtype=np.float64)
        except (ValueError, KeyError, TypeError):  # a damaged cache is scored again, never trusted
            pass
    model, tokenizer, trained = load(model_dir, 1, "auto", "reward model", "rm train")
    flat = score(model, tokenizer, [p for p, _ in texts], [r for _, r in texts], trained.get("max_length", 256),
                 progress=progress).double().numpy()  # fmt: skip
    if not np.isfinite(flat).all():
        raise UserError(f"{model_dir} gave non-finite scores to test stories; retrain it (`wprlhf rm train`)")
    write_json_atomic(cached, {"key": key, "scores": flat.tolist()})
    return flat


def _standard(scores: np.ndarray) -> np.ndarray:
    """Scores shifted and scaled to mean 0 and standard deviation 1 over the texts scored (a constant: all 0)."""
    spread = scores.std()
    return (scores - scores.mean()) / (spread if spread > 0 else 1.0)


def _train_minutes(model_dir: Path) -> float | None:
    """Minutes of the training loop (metrics.csv's last elapsed_s), None when it was not recorded."""
    metrics = model_dir / "metrics.csv"
    if not metrics.exists():
        return None
    with metrics.open() as f:
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(f) if r.get("elapsed_s")]
    return round(elapsed[-1] / 60, 1) if elapsed else None


def _cell(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(entry: dict | None) -> str:
    if entry is None:
        return ""
    lo, hi = entry["ci95"]
    return f"{100 * entry['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def markdown(table: dict) -> str:
    """The table as Markdown: accuracy % [95% CI] on each split, and each model's paired difference to TF-IDF."""
    splits = table["splits"]
    lines = [f"Plain: {splits['plain']['n']} pairs over {splits['plain']['prompts']} prompts ({splits['plain']['rule']}). "
             f"Debiased: {splits['debiased']['n']} pairs over {splits['debiased']['prompts']} prompts "
             f"({splits['debiased']['rule']}).", "",
             "| scorer | plain % [CI] | debiased % [CI] | vs TF-IDF, plain (points) | vs TF-IDF, debiased | "
             "train min | command |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in table["rows"]:
        minutes = row.get("train_minutes")
        lines.append(f"| {row['name']} | {_cell(row['plain'])} | {_cell(row['debiased'])} | "
                     f"{_diff(row['plain'].get('vs_tfidf'))} | {_diff(row['debiased'].get('vs_tfidf'))} | "
                     f"{'' if minutes is None else minutes} | `{row['command']}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    """One line per (scorer, split): accuracy, its CI, n, and a model's paired difference to TF-IDF."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["name", "split", "accuracy", "lo", "hi", "n", "vs_tfidf", "vs_tfidf_lo", "vs_tfidf_hi", "command"])
    for row in rows:
        for split in ("plain", "debiased"):
            e, v = row[split], row[split].get("vs_tfidf") or {"diff": "", "ci95": ["", ""]}
            writer.writerow([row["name"], split, e["accuracy"], *e["ci95"], e["n"], v["diff"], *v["ci95"], row["command"]])
    write_text_atomic(path, out.getvalue())
