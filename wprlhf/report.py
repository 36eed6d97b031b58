"""An offline HTML report (plots embedded, before/after samples, win rates, config, timings) from a run's files.

`write_report(run_dir)` reads what a `wprlhf loop` or `wprlhf ppo` run directory holds and writes one
self-contained page, RUN_DIR/report.html, with every plot embedded as a data URI and also saved beside it as a
PNG (report-overoptimisation.png, ...). The page loads nothing from anywhere (its Content-Security-Policy
forbids it), so it opens the same on a machine with no network and no model. Optional files that are missing
are skipped and listed at the bottom; every string from a model, a user or a config file is HTML-escaped.

Reads files only: no torch, no models (STYLE.md: report -> metrics).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .files import iter_jsonl, write_bytes_atomic
from .metrics import read_metrics, smooth

# One colour per quantity, the same in every plot.
COLORS = {"reward": "tab:blue", "judge": "tab:green", "kl": "tab:red", "kl_coef": "tab:purple",
          "entropy": "tab:orange", "response_length": "tab:brown", "start": "tab:gray"}  # fmt: skip
PHASES = ("sample", "label", "rm", "ppo", "eval")  # a loop round's phases, in order (loop.py)
MAX_PAIRS = 24  # before/after rows shown; the rest are counted


# ==========================================================================================================
# reading a run directory


@dataclass
class Run:
    """What a run directory holds; every field but `steps` may be empty."""

    path: Path
    kind: str  # "loop" or "ppo"
    steps: list[dict[str, float]]  # ppo metrics.csv rows
    rounds: list[dict] = field(default_factory=list)  # loop_metrics.csv rows, each merged with round-N/eval.json
    rm_evals: dict[int, dict] = field(default_factory=dict)  # round -> round-N/rm/eval-heldout.json
    pairs: list[dict] = field(default_factory=list)  # the last evaluated round's eval_pairs.jsonl
    pairs_round: int | None = None
    samples: list[dict] = field(default_factory=list)  # ppo samples.jsonl (plain PPO runs)
    loop_config: dict = field(default_factory=dict)
    ppo_config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # loop_state.json
    notes: list[str] = field(default_factory=list)  # optional files missing or unreadable


def _read_json(path: Path, notes: list[str], root: Path):
    if not path.exists():
        notes.append(f"{path.relative_to(root)} is missing")
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        notes.append(f"{path.relative_to(root)} is unreadable ({err})")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path.relative_to(root)} is not a JSON object; skipped")
        return None
    return obj


def _read_jsonl(path: Path, notes: list[str], root: Path) -> list[dict]:
    if not path.exists():
        notes.append(f"{path.relative_to(root)} is missing")
        return []

    def skip(n: int, _problem: str) -> None:
        notes.append(f"{path.relative_to(root)} line {n} is not a JSON object; skipped")

    return [row for _, row in iter_jsonl(path, skip)]


def load_run(run_dir: str | Path) -> Run:
    """Read a `wprlhf loop --out` or `wprlhf ppo --out` directory; UserError if there is nothing to report."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory {root} does not exist; give the --out of a `wprlhf ppo` or `wprlhf loop` run")
    notes: list[str] = []
    markers = ("loop_metrics.csv", "loop_state.json", "loop_config.json", "ppo/metrics.csv")
    loop = not (root / "metrics.csv").exists() and any((root / m).exists() for m in markers)
    ppo_dir = root / "ppo" if loop else root
    metrics = ppo_dir / "metrics.csv"
    steps = read_metrics(metrics) if metrics.exists() else []
    rounds = read_metrics(root / "loop_metrics.csv") if (root / "loop_metrics.csv").exists() else []
    if not steps and not rounds:
        raise UserError(f"{root} has no metrics to report (no rows in {metrics.relative_to(root)}); give the --out "
                        "of a `wprlhf ppo` or `wprlhf loop` run that finished at least one step")  # fmt: skip
    if not steps:
        notes.append(f"{metrics.relative_to(root)} is missing or empty")
    elif not any("judge_mean" in r for r in steps):
        notes.append("judge scores during PPO: this run logged no judge_mean (plain PPO runs have no hidden judge), "
                     "so the over-optimisation plot's judge panel is empty")  # fmt: skip
    run = Run(path=root, kind="loop" if loop else "ppo", steps=steps, notes=notes)
    run.ppo_config = _read_json(ppo_dir / "config.json", notes, root) or {}
    if not loop:
        run.samples = _read_jsonl(ppo_dir / "samples.jsonl", notes, root)
        return run

    run.loop_config = _read_json(root / "loop_config.json", notes, root) or {}
    run.state = _read_json(root / "loop_state.json", notes, root) or {}
    by_round = {int(r["round"]): dict(r) for r in rounds if _finite(r.get("round"))}
    numbers = sorted(int(p.name.split("-", 1)[1]) for p in root.glob("round-*") if re.fullmatch(r"round-\d+", p.name))
    for r in numbers:
        round_dir = root / f"round-{r}"
        if (round_dir / "eval.json").exists() or r in by_round:
            evaluated = _read_json(round_dir / "eval.json", notes, root) or {}
            by_round[r] = {**evaluated, **by_round.get(r, {}), "round": r}
        if (round_dir / "rm").is_dir():
            rm_eval = _read_json(round_dir / "rm" / "eval-heldout.json", notes, root)
            if rm_eval:
                run.rm_evals[r] = rm_eval
    run.rounds = [by_round[r] for r in sorted(by_round)]
    if run.rounds:
        last = run.rounds[-1]["round"]
        run.pairs = _read_jsonl(root / f"round-{last}" / "eval_pairs.jsonl", notes, root)
        run.pairs_round = last
    return run


# ==========================================================================================================
# numbers and text


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, digits: int = 3) -> str:
    """A number for the page: 'n/a' for missing or NaN, ints as ints, floats with `digits` significant digits."""
    if not _finite(x):
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.{digits}g}"


def pct(x) -> str:
    return f"{x:.1%}" if _finite(x) else "n/a"


def duration(seconds) -> str:
    if not _finite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def esc(x) -> str:
    """Escape any value (model text, prompts, config values, file names) for HTML text or attributes."""
    return html.escape(str(x), quote=True)


def _series(steps: list[dict], name: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[name]) for r in steps if _finite(r.get(name)) and _finite(r.get("step"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _quarter_change(values: list[float]) -> tuple[float, float]:
    """Mean of the last quarter of a run minus mean of the first, and that difference in standard errors
    (Welch's t), so that a handful of noisy steps cannot raise the alarm."""
    q = max(2, len(values) // 4)
    first, last = values[:q], values[-q:]
    diff = sum(last) / q - sum(first) / q

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    se = math.sqrt(var(first) / q + var(last) / q)
    return diff, diff / se if se > 0 else 0.0


# ==========================================================================================================
# plots (matplotlib's Agg canvas directly: no display, no global pyplot state)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _plot_steps(ax, steps, values, color, label):
    """Per-step curve; a long run gets its raw values faint and a smoothed line on top."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-4 * max(abs(lo), abs(hi)):
        # A constant series (entropy of a tiny run, length at its cap) drawn flat, not as noise in the 6th digit.
        pad = 0.01 * abs(hi) or 0.5
        ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False)
    if len(values) > 30:
        ax.plot(steps, values, "-", color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(values), "-", color=color, linewidth=2, label=label)
    else:
        ax.plot(steps, values, "-", marker="o", color=color, linewidth=2, markersize=3.5, label=label)


def _percent_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


# ----------------------------------------------------------------------------------------------------------
# over-optimisation: the proxy and the judge against √KL, one figure for this report, `wprlhf stories` and
# `wprlhf compare`


@dataclass
class Curve:
    """One policy (a labelled point) or one training run's steps (a line) on the over-optimisation plot.

    kl: KL to the start policy in nats per response (k1 summed over a response's tokens, as every evaluation and
    metrics.csv's `kl` measure it). proxy: the training reward minus the start policy's mean under the same reward
    on the same prompts (reward units). judge: the judge's score minus the start policy's (judge units). One value
    each per point or step; NaN where not measured. Measuring each score from the start policy's own mean on the
    prompts it was scored on is what puts every curve on one scale: an evaluated policy is scored on the eval
    prompts, a training step on its batch of train prompts, and the start policy sits at (0, 0) for both.
    A curve's name is its policy's: a policy's point and its training steps' line share it, and so their colour.
    """

    name: str
    kl: Sequence[float]
    proxy: Sequence[float]
    judge: Sequence[float]
    steps: bool = False
    """A training run's steps, in order (drawn as a line), rather than one evaluated policy (a labelled point)."""


def over_optimisation_xy(curve: Curve, score: str) -> tuple[list[float], list[float]]:
    """One panel's points of a curve, in order: x = √KL (√nats, KL per response), y = its `score` ('proxy' or
    'judge'), wherever both are finite; the rest are left out, never drawn. A KL below zero is drawn at 0: the
    mean of k1 is an estimate, which noise takes below zero near the start, while the KL itself never is."""
    pairs = [(math.sqrt(max(kl, 0.0)), y) for kl, y in zip(curve.kl, getattr(curve, score))
             if _finite(kl) and _finite(y)]  # fmt: skip
    return [x for x, _ in pairs], [y for _, y in pairs]


def _mean(stat) -> float:
    return stat["mean"] if isinstance(stat, dict) and _finite(stat.get("mean")) else math.nan


def curves_from_sides(sides: dict[str, dict], baseline: str = "start") -> list[Curve]:
    """One point per side of a `judge_sides` report (the 'sides' of `wprlhf stories`' eval/report.json and of
    `wprlhf compare`'s report.json) but the baseline: its mean 'kl' (to the baseline, the start policy), its mean
    'reward' (the training reward) and 'judge' scores less the baseline side's on the same prompts. A side with no
    KL (a human story) has no place on the x axis and is left out."""
    base = sides.get(baseline, {})
    return [Curve(name, [_mean(side.get("kl"))], [_mean(side.get("reward")) - _mean(base.get("reward"))],
                  [_mean(side.get("judge")) - _mean(base.get("judge"))])
            for name, side in sides.items() if name != baseline and _finite(_mean(side.get("kl")))]  # fmt: skip


def curve_from_steps(name: str, rows: list[dict[str, float]], judge_start: float | None = None) -> Curve:
    """A training run's steps from its metrics.csv rows: `kl` (to the run's reference, nats per response), and
    `score_mean` (the reward it trained on, as given) and `judge_mean` (a hidden judge of the same samples), each
    less its value at the first step that logged it, whose batch the run's start policy sampled (a step's samples
    come before its update). judge_start replaces the judge's start value for rows that do not begin at the start
    policy (a later loop round's)."""

    def relative(key: str, start: float | None = None) -> list[float]:
        values = [row.get(key, math.nan) for row in rows]
        start = next((v for v in values if _finite(v)), math.nan) if start is None else start
        return [v - start if _finite(v) and _finite(start) else math.nan for v in values]

    return Curve(name, [row.get("kl", math.nan) for row in rows], relative("score_mean"),
                 relative("judge_mean", judge_start), steps=True)  # fmt: skip


def _policy_colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per policy name: fixed for the methods the pipelines name, so a method looks the same in every
    run's plot, and the colour cycle (less grey, the start's) for the rest."""
    fixed = {"sft": "tab:blue", "ppo": "tab:green", "rloo": "tab:red", "grpo": "tab:purple", "dpo": "tab:brown"}
    spare = [c for c in ("tab:orange", "tab:olive", "tab:cyan", "tab:pink", "black", "goldenrod", "navy", "teal")
             if c not in fixed.values()]  # fmt: skip
    out: dict[str, str] = {}
    for name in dict.fromkeys(names):
        out[name] = fixed.get(name) or spare[sum(n not in fixed for n in out) % len(spare)]
    return out


OVER_OPTIMISATION_PANELS = (
    ("proxy", "proxy: the training reward", "training reward − the start policy's\n(reward units)",
     "no training reward measured"),
    ("judge", "judge (never trained on)", "judge score − the start policy's\n(judge units)", "no judge score logged"),
)  # fmt: skip


def plot_over_optimisation(curves: Sequence[Curve], note: str = "") -> bytes | None:
    """The over-optimisation plot of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization"): the
    proxy (the training reward, left) and the judge (never trained on, right) against d = √KL to the start policy,
    the distance their laws are written in. Scores are measured from the start policy's (`Curve`), so the start
    sits at (0, 0) in both panels; each evaluated policy is a labelled point and each training run's steps a line
    in its policy's colour. A proxy that keeps climbing while the judge flattens or falls is being gamed.

    x in √nats (KL in nats per response; the top axis reads KL itself). Non-finite values are left out, never
    drawn (`over_optimisation_xy`). note: a line under the panels. Returns the PNG, or None when no curve has a
    point to place (no finite KL beside a finite score)."""
    import numpy as np

    if not any(over_optimisation_xy(c, score)[0] for c in curves for score, *_ in OVER_OPTIMISATION_PANELS):
        return None
    colors = _policy_colors([c.name for c in curves])
    fig = _figure(11, 5.2 if note else 4.9)
    left = fig.add_subplot(1, 2, 1)
    for i, (score, title, ylabel, missing) in enumerate(OVER_OPTIMISATION_PANELS):
        ax = left if i == 0 else fig.add_subplot(1, 2, 2, sharex=left)
        drawn = lines = False
        for curve in curves:
            xs, ys = over_optimisation_xy(curve, score)
            if not xs:
                continue
            drawn, lines, color = True, lines or curve.steps, colors[curve.name]
            if curve.steps:
                ax.plot(xs, ys, "-", marker="o", markersize=2.5, linewidth=1.2, alpha=0.75, color=color,
                        label=f"{curve.name}: each training step")  # fmt: skip
            else:
                ax.plot(xs, ys, "o", markersize=7, color=color, zorder=3)
                ax.annotate(curve.name, (xs[0], ys[0]), textcoords="offset points", xytext=(6, 5), fontsize=8,
                            color=color)  # fmt: skip
        ax.plot([0], [0], "*", markersize=13, color=COLORS["start"], zorder=4)
        ax.annotate("start", (0, 0), textcoords="offset points", xytext=(6, 6), fontsize=8, color=COLORS["start"])
        ax.axhline(0, color="0.6", linestyle="--", linewidth=0.8)
        if not drawn:
            ax.text(0.5, 0.7, missing, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
        elif lines:  # the points are named where they stand; only the steps' lines need a legend
            ax.legend(fontsize=7.5, loc="best", frameon=False)
        ax.set_title(title, fontsize=10.5)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("√KL to the start policy (√nats; KL per response)", fontsize=9)
        top = ax.secondary_xaxis("top", functions=(np.square, lambda kl: np.sqrt(np.maximum(kl, 0.0))))
        top.set_xlabel("KL (nats per response)", fontsize=8)
        top.tick_params(labelsize=7.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    left.set_xlim(left=min(-0.05 * left.get_xlim()[1], left.get_xlim()[0]))  # the start's star clear of the edge
    fig.suptitle("Over-optimisation (Gao et al. 2022): the proxy and the judge against √KL to the start policy",
                 fontsize=11)  # fmt: skip
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return _png(fig)


def write_over_optimisation(curves: Sequence[Curve], path: Path, note: str = "") -> Path | None:
    """`plot_over_optimisation` written to path; None, and no file (one from an earlier run removed, so it cannot
    pass for this one's), when there is nothing to place."""
    data = plot_over_optimisation(curves, note)
    if data is None:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path


def plot_run_over_optimisation(run: Run) -> bytes | None:
    """`plot_over_optimisation` of a `wprlhf ppo` or `wprlhf loop` run: its PPO steps (KL to the PPO reference,
    the start policy) and, for a loop, each round's policy on held-out prompts (eval_kl, and judge_new less
    judge_start; no proxy score of the start policy is logged there). A loop retrains its reward model every round,
    so its steps are a line per round, each round's proxy measured from the round's first step (its reward
    model's score of the start policy is never logged) and the judge, the same all run, from the run's first."""
    curves: list[Curve] = []
    per_round = run.loop_config.get("ppo_steps")
    note = ""
    if run.kind == "loop" and isinstance(per_round, int) and per_round > 0 and run.steps:
        judge_start = next((r["judge_mean"] for r in run.steps if _finite(r.get("judge_mean"))), None)
        by_round: dict[int, list[dict]] = {}
        for row in run.steps:
            if _finite(row.get("step")):
                by_round.setdefault(math.ceil(row["step"] / per_round), []).append(row)
        curves += [curve_from_steps(f"round {r}", rows, judge_start) for r, rows in sorted(by_round.items())]
        note = ("Each round trains on a new reward model: its steps' training reward is measured from the round's "
                "first step, the judge's from the run's first.")  # fmt: skip
    elif run.steps:
        curves.append(curve_from_steps("ppo", run.steps))
    for row in run.rounds:
        judge = row.get("judge_new", math.nan) - row.get("judge_start", math.nan) \
            if _finite(row.get("judge_new")) and _finite(row.get("judge_start")) else math.nan  # fmt: skip
        curves.append(Curve(f"round {fmt(row['round'])}", [row.get("eval_kl", math.nan)], [math.nan], [judge]))
    return plot_over_optimisation(curves, note)


def plot_training(run: Run) -> bytes | None:
    """Six small panels in real units: reward, judge, KL, β, entropy, response length per PPO step."""
    from matplotlib.ticker import MaxNLocator

    panels = [("score_mean", "proxy reward", "score (reward-model units)", COLORS["reward"]),
              ("judge_mean", "judge score", "score (judge units)", COLORS["judge"]),
              ("kl", "KL to start policy", "nats per response", COLORS["kl"]),
              ("kl_coef", "β (kl_coef)", "penalty per nat", COLORS["kl_coef"]),
              ("entropy", "policy entropy", "nats per token", COLORS["entropy"]),
              ("response_length", "response length", "tokens", COLORS["response_length"])]  # fmt: skip
    panels = [p for p in panels if _series(run.steps, p[0])[1]]
    if not panels:
        return None
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = _figure(11, 3.1 * rows)
    for i, (name, title, unit, color) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = _series(run.steps, name)
        _plot_steps(ax, steps, values, color, title)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_rm_accuracy(run: Run) -> bytes | None:
    """Reward-model held-out accuracy per round with its 95% CI, beside the baselines and chance."""
    rounds = sorted(run.rm_evals)
    if not rounds:
        return None
    labels = {r["round"]: r.get("labels") for r in run.rounds}
    fig = _figure(10, 4.2)
    ax = fig.add_subplot()
    acc = [run.rm_evals[r].get("accuracy", float("nan")) for r in rounds]
    ci = [run.rm_evals[r].get("ci95") or [None, None] for r in rounds]
    lower = [a - lo if _finite(a) and _finite(lo) else 0 for a, (lo, _) in zip(acc, ci)]
    upper = [hi - a if _finite(a) and _finite(hi) else 0 for a, (_, hi) in zip(acc, ci)]
    ax.errorbar(rounds, acc, yerr=[lower, upper], fmt="o-", color=COLORS["reward"], capsize=5, linewidth=2,
                markersize=7, label="reward model (95% CI)")  # fmt: skip
    for r, a in zip(rounds, acc):
        if _finite(a):
            ax.annotate(pct(a), (r, a), textcoords="offset points", xytext=(9, 4), fontsize=8, color=COLORS["reward"])
    for key, label, marker in (("longer_wins", "baseline: longer response wins", "s"),
                               ("tfidf_logreg", "baseline: TF-IDF + logistic regression", "D")):  # fmt: skip
        points = [(r, run.rm_evals[r].get("baselines", {}).get(key)) for r in rounds]
        points = [(r, v) for r, v in points if _finite(v)]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle="--", color="0.45" if key == "longer_wins" else "0.2",
                    markersize=6, linewidth=1, label=label)  # fmt: skip
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1.2, label="chance (pairs)")
    ax.set_xticks(rounds, [f"round {r}" + (f"\n{fmt(labels[r])} labels" if labels.get(r) else "") for r in rounds])
    ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    ax.set_ylim(0, 1.05)
    _percent_axis(ax)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Reward model: accuracy on held-out comparisons", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8.5, frameon=False)
    fig.tight_layout()
    return _png(fig)


def plot_win_rate(run: Run) -> bytes | None:
    """Judge win rate of each round's policy over the start policy with its 95% CI band; mean judge scores."""
    rows = [r for r in run.rounds if _finite(r.get("win_rate"))]
    if not rows:
        return None
    x = [r["round"] for r in rows]
    wr = [r["win_rate"] for r in rows]
    lo = [r.get("win_rate_lo", w) if _finite(r.get("win_rate_lo")) else w for r, w in zip(rows, wr)]
    hi = [r.get("win_rate_hi", w) if _finite(r.get("win_rate_hi")) else w for r, w in zip(rows, wr)]
    fig = _figure(11, 4.8)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.fill_between(x, lo, hi, color=COLORS["judge"], alpha=0.18, linewidth=0, label="95% CI (prompt bootstrap)")
    ax.errorbar(x, wr, yerr=[[w - a for w, a in zip(wr, lo)], [b - w for w, b in zip(wr, hi)]], fmt="o-",
                color=COLORS["judge"], capsize=5, linewidth=2, markersize=7, label="win rate vs start")  # fmt: skip
    for r, w in zip(x, wr):
        ax.annotate(pct(w), (r, w), textcoords="offset points", xytext=(9, 4), fontsize=8, color=COLORS["judge"])
    ax.axhline(0.5, color="0.3", linestyle="--", linewidth=1.2, label="50%: no better than the start")
    ax.set_ylim(0, 1.05)
    _percent_axis(ax)
    ax.set_ylabel("judge prefers this round's policy")
    ax.set_title("Judge win rate over the start policy", fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=2, frameon=False)

    scored = [r for r in rows if _finite(r.get("judge_new"))]
    if scored:
        ax2.plot([r["round"] for r in scored], [r["judge_new"] for r in scored], "o-", color=COLORS["judge"],
                 linewidth=2, markersize=7, label="this round's policy")  # fmt: skip
    start = [r for r in rows if _finite(r.get("judge_start"))]
    if start:
        ax2.plot([r["round"] for r in start], [r["judge_start"] for r in start], "s--", color=COLORS["start"],
                 linewidth=1.5, markersize=6, label="start policy (same prompts)")  # fmt: skip
    ax2.set_ylabel("mean judge score (judge units)")
    ax2.set_title("Mean judge score on held-out prompts", fontsize=11)
    if scored or start:
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=2, frameon=False)
    for a in (ax, ax2):
        a.set_xticks(x, [f"round {r}" for r in x])
        a.set_xlim(x[0] - 0.5, x[-1] + 0.5)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ==========================================================================================================
# the page

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #f5f6f8;
       margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 2px; } h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid #e2e5ea; } h3 { font-size: 16px; margin: 20px 0 6px; }
.sub { color: #5c6675; margin: 0 0 18px; font-size: 14px; }
.summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 12px; margin: 16px 0; }
.card { border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 14px; background: #fafbfc; }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #5c6675; }
.card .value { font-size: 24px; font-weight: 600; margin: 2px 0; }
.card .detail { font-size: 13px; color: #3c4656; }
.card.good { border-left: 4px solid #2ca02c; } .card.bad { border-left: 4px solid #d62728; }
.card.neutral { border-left: 4px solid #9aa3af; }
.warn { background: #fff4e5; border: 1px solid #f5c27a; border-radius: 6px; padding: 8px 12px; }
figure { margin: 12px 0 4px; } figure img { width: 100%; height: auto; border: 1px solid #eceef1; }
figcaption { font-size: 13px; color: #5c6675; margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 8px 0; }
th, td { border-bottom: 1px solid #e6e8ec; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums;
     white-space: nowrap; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, "SF Mono", Menlo, Consolas,
        monospace; font-size: 12.5px; max-height: 16em; overflow-y: auto; }
.samples td:nth-child(2) { width: 30%; } .samples td:nth-child(3) { width: 50%; }
.pairs td { width: 34%; } .pairs td.prompt { width: 24%; } .pairs td.num { width: auto; }
.win { background: #eef8ee; } .scores { font-size: 12px; color: #5c6675; margin-top: 4px; white-space: nowrap; }
.kv td:first-child { width: 30%; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
.kv td { overflow-wrap: anywhere; } .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; }
.notes { font-size: 13px; color: #5c6675; }
@media (max-width: 800px) { .cols { grid-template-columns: 1fr; } }
"""


def _card(label: str, value: str, detail: str = "", tone: str = "neutral") -> str:
    return (f'<div class="card {tone}"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
            f'<div class="detail">{esc(detail)}</div></div>')  # fmt: skip


def _summary(run: Run) -> str:
    cards = []
    judged = [r for r in run.rounds if _finite(r.get("win_rate"))]
    final = judged[-1] if judged else run.rounds[-1] if run.rounds else {}
    if _finite(final.get("win_rate")):
        lo, hi = final.get("win_rate_lo"), final.get("win_rate_hi")
        tone = "good" if _finite(lo) and lo > 0.5 else "bad" if _finite(hi) and hi < 0.5 else "neutral"
        n = f", n = {fmt(final['n'])}" if _finite(final.get("n")) else ""
        judge = f", judge {final['judge']}" if final.get("judge") else ""
        cards.append(_card("Judge win rate, final vs start", pct(final["win_rate"]),
                           f"95% CI {pct(lo)} – {pct(hi)} (round {final['round']}{n}{judge})", tone))  # fmt: skip
    last = run.steps[-1] if run.steps else {}
    if _finite(final.get("eval_kl")) or _finite(last.get("kl")):
        value = final.get("eval_kl") if _finite(final.get("eval_kl")) else last.get("kl")
        where = "on held-out prompts" if _finite(final.get("eval_kl")) else f"at PPO step {fmt(last.get('step'))}"
        detail = f"nats per response to the start policy, {where}"
        if _finite(final.get("eval_kl")) and _finite(last.get("kl")):
            detail += f"; last PPO batch {fmt(last['kl'])}"
        if _finite(last.get("kl_coef")):
            detail += f"; β = {fmt(last['kl_coef'])}"
        cards.append(_card("Final KL", f"{fmt(value)} nats", detail))
    if run.rm_evals:
        r = max(run.rm_evals)
        rm = run.rm_evals[r]
        ci = rm.get("ci95") or [None, None]
        base = rm.get("baselines") or {}
        parts = [f"95% CI {pct(ci[0])} – {pct(ci[1])}"] if _finite(ci[0]) else []
        baselines = [f"{name} {pct(base[key])}" for key, name in (("longer_wins", "longer wins"),
                     ("tfidf_logreg", "TF-IDF")) if _finite(base.get(key))]  # fmt: skip
        if baselines:
            parts.append("baselines: " + ", ".join(baselines))
        # Better than the baselines only when the whole CI is above the best of them.
        best = max([v for v in base.values() if _finite(v)], default=None)
        acc, lo = rm.get("accuracy"), ci[0]
        tone = "neutral"
        if best is not None and _finite(acc):
            tone = "good" if _finite(lo) and lo > best else "bad" if acc < best else "neutral"
        cards.append(_card(f"Reward-model accuracy (round {r})", pct(rm.get("accuracy")),
                           "; ".join(parts + [f"n = {fmt(rm.get('n'))}"]), tone))  # fmt: skip
    new_d2 = final.get("distinct_2", (final.get("new") or {}).get("distinct_2"))
    start_d2 = final.get("start_distinct_2", (final.get("start") or {}).get("distinct_2"))
    if _finite(new_d2):
        tone = "bad" if _finite(start_d2) and new_d2 < 0.8 * start_d2 else "neutral"
        cards.append(_card("Distinct-2 (diversity)", fmt(new_d2),
                           f"start policy {fmt(start_d2)}; share of distinct word pairs in held-out samples", tone))  # fmt: skip
    rewards = _series(run.steps, "score_mean")[1]
    if rewards:
        cards.append(_card("Proxy reward", f"{fmt(rewards[0])} → {fmt(rewards[-1])}",
                           f"mean reward-model score, PPO step {fmt(run.steps[0].get('step'))} → "
                           f"{fmt(run.steps[-1].get('step'))}"))  # fmt: skip
    judge = _series(run.steps, "judge_mean")[1]
    if judge:
        cards.append(_card("Judge score during PPO", f"{fmt(judge[0])} → {fmt(judge[-1])}",
                           "mean true score of the same training samples"))  # fmt: skip
    warning = ""
    if len(judge) >= 12 and len(rewards) >= 12:
        (d_reward, t_reward), (d_judge, t_judge) = _quarter_change(rewards), _quarter_change(judge)
        if t_reward > 2 and t_judge < -2:
            warning = (f'<p class="warn">Possible reward hacking: from the first to the last quarter of PPO steps the '
                       f"proxy reward rose by {fmt(d_reward)} while the judge score fell by {fmt(-d_judge)} "
                       "(both more than two standard errors). See the over-optimisation plot.</p>")  # fmt: skip
    return f'<div class="summary">{"".join(cards)}</div>{warning}'


def _figure_html(data: bytes, alt: str, caption: str, file_name: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(caption)} '
            f"(also saved as {esc(file_name)})</figcaption></figure>")  # fmt: skip


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """header and cells are already-escaped HTML."""
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)  # fmt: skip
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _rounds_table(run: Run) -> str:
    cols = [("round", "round", fmt), ("labels", "labels", fmt), ("rm_accuracy", "RM accuracy", pct),
            ("win_rate", "win rate", pct), ("win_rate_lo", "CI low", pct), ("win_rate_hi", "CI high", pct),
            ("judge_new", "judge (new)", fmt), ("judge_start", "judge (start)", fmt), ("eval_kl", "KL (nats)", fmt),
            ("distinct_2", "distinct-2", fmt), ("start_distinct_2", "distinct-2 (start)", fmt),
            ("agreement", "labeler agreement", fmt)]  # fmt: skip
    cols = [c for c in cols if any(_finite(r.get(c[0])) for r in run.rounds)]
    rows = [[esc(f(r.get(key))) for key, _, f in cols] for r in run.rounds]
    return _table([esc(c[1]) for c in cols], rows, numeric=set(range(len(cols))))


def _text_cell(text, scores: list[tuple[str, object]]) -> str:
    line = " · ".join(f"{esc(name)} {esc(fmt(value))}" for name, value in scores if _finite(value))
    return f'<div class="text">{esc(text)}</div>' + (f'<div class="scores">{line}</div>' if line else "")


def _pairs_section(run: Run) -> str:
    rows = []
    for p in run.pairs[:MAX_PAIRS]:
        js, jn = p.get("judge_start"), p.get("judge_new")
        start_cls = new_cls = ""
        if _finite(js) and _finite(jn) and js != jn:
            start_cls, new_cls = (' class="win"', "") if js > jn else ("", ' class="win"')
        start = _text_cell(p.get("start", ""), [("reward", p.get("reward_start")), ("judge", js)])
        new = _text_cell(p.get("new", ""), [("reward", p.get("reward_new")), ("judge", jn), ("KL", p.get("kl"))])
        rows.append(f'<tr><td class="prompt"><div class="text">{esc(p.get("prompt", ""))}</div></td>'
                    f"<td{start_cls}>{start}</td><td{new_cls}>{new}</td></tr>")  # fmt: skip
    more = f"<p class=\"notes\">{len(run.pairs) - MAX_PAIRS} more in round-{run.pairs_round}/eval_pairs.jsonl.</p>" \
        if len(run.pairs) > MAX_PAIRS else ""  # fmt: skip
    return (f"<p>The same held-out prompts answered by the start policy and by the policy after round "
            f"{esc(run.pairs_round)}. Rewards are round {esc(run.pairs_round)}'s reward model on both sides; "
            "the judge's preferred response is shaded green; KL is in nats per response.</p>"
            '<table class="pairs"><thead><tr><th>prompt</th><th>start policy</th><th>final policy</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{more}")  # fmt: skip


def _samples_section(run: Run) -> str:
    """Plain PPO runs: the samples logged at the first and the last logged step (prompts differ between steps)."""
    steps = sorted({s.get("step") for s in run.samples if _finite(s.get("step"))})
    if not steps:
        return ""
    rows = []
    for step in [steps[0]] + ([steps[-1]] if steps[-1] != steps[0] else []):
        rows += [[esc(fmt(step)), f'<div class="text">{esc(s.get("prompt", ""))}</div>',
                  _text_cell(s.get("response", ""), []), esc(fmt(s.get("score"))), esc(fmt(s.get("kl")))]
                 for s in run.samples if s.get("step") == step][: MAX_PAIRS // 2]  # fmt: skip
    return (
        "<p>Samples logged during training at the first and the last logged PPO step (from samples.jsonl; "
        "prompts differ between steps).</p>"
        + _table(["step", "prompt", "response", "score", "KL (nats)"], rows, numeric={0, 3, 4}, cls="samples")
    )


def _config_table(config: dict) -> str:
    rows = [[esc(k), esc(json.dumps(v) if isinstance(v, (dict, list)) else v)] for k, v in config.items()]
    return _table(["field", "value"], rows, cls="kv")


def _timings_section(run: Run) -> str:
    parts = []
    timings = run.state.get("timings_s") or {}
    if timings:
        by_round: dict[str, dict[str, float]] = {}
        for phase, seconds in timings.items():
            r, _, name = str(phase).rpartition(":")
            by_round.setdefault(r or "", {})[name] = seconds
        rows = []
        for r in sorted(by_round, key=lambda k: (k != "", int(k) if k.isdigit() else 0, k)):
            phases = by_round[r]
            if r == "":  # "start": sampling the start policy's held-out responses, once
                rows += [[esc(f"{name} (sample start policy)" if name == "start" else name),
                          *[esc(duration(s)) if name == "start" and p == "sample" else "" for p in PHASES],
                          esc(duration(s))] for name, s in phases.items()]  # fmt: skip
                continue
            cells = [esc(duration(phases[p])) if p in phases else "" for p in PHASES]
            rows.append([esc(f"round {r}"), *cells, esc(duration(sum(v for v in phases.values() if _finite(v))))])
        totals = [sum(by_round[r].get(p, 0.0) for r in by_round if r) for p in PHASES]
        totals[0] += by_round.get("", {}).get("start", 0.0)
        rows.append(["<b>all</b>", *[f"<b>{esc(duration(t))}</b>" for t in totals],
                     f"<b>{esc(duration(run.state.get('elapsed_s')))}</b>"])  # fmt: skip
        parts.append(
            "<h3>Loop phases</h3>"
            + _table(
                ["", "sample", "label", "reward model", "PPO", "evaluate", "total"], rows, numeric=set(range(1, 7))
            )
        )
    inside = [(name, sum(_series(run.steps, key)[1])) for key, name in
              (("time_generate", "generate (rollout)"), ("time_score", "score (reward_fn)"), ("time_train", "train (PPO updates)"))
              if _series(run.steps, key)[1]]  # fmt: skip
    if inside:
        total = sum(s for _, s in inside)
        rows = [[esc(name), esc(duration(s)), esc(pct(s / total) if total else "n/a")] for name, s in inside]
        rows.append(["<b>total</b>", f"<b>{esc(duration(total))}</b>", ""])
        parts.append(
            f"<h3>Inside PPO ({len(run.steps)} steps)</h3>" + _table(["", "time", "share"], rows, numeric={1, 2})
        )
    return "".join(parts)


def render_html(run: Run, figures: list[tuple[str, bytes, str, str]]) -> str:
    """The page; figures are (file name, PNG bytes, title, caption) in order."""
    name = run.path.resolve().name
    kind = "iterative loop (wprlhf loop)" if run.kind == "loop" else "PPO run (wprlhf ppo)"
    steps = f"{len(run.steps)} PPO steps" if run.steps else "no PPO steps"
    rounds = f", {len(run.rounds)} round(s) evaluated" if run.rounds else ""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [
        f"<h1>wprlhf report: {esc(name)}</h1>",
        f'<p class="sub">{esc(kind)} · {esc(steps)}{esc(rounds)} · generated {esc(when)}</p>',
        _summary(run),
    ]
    for file_name, data, title, caption in figures:
        body.append(f"<h2>{esc(title)}</h2>" + _figure_html(data, title, caption, file_name))
        if file_name.endswith("win_rate.png") and run.rounds:
            body.append(_rounds_table(run))
    if run.pairs:
        body.append("<h2>Before and after: held-out prompts</h2>" + _pairs_section(run))
    elif run.samples:
        body.append("<h2>Samples</h2>" + _samples_section(run))
    if run.loop_config or run.ppo_config:
        configs = []
        if run.loop_config:
            configs.append("<div><h3>loop_config.json</h3>" + _config_table(run.loop_config) + "</div>")
        if run.ppo_config:
            where = "ppo/config.json" if run.kind == "loop" else "config.json"
            configs.append(f"<div><h3>{esc(where)}</h3>" + _config_table(run.ppo_config) + "</div>")
        body.append('<h2>Configuration</h2><div class="cols">' + "".join(configs) + "</div>")
    timings = _timings_section(run)
    if timings:
        body.append("<h2>Timings</h2>" + timings)
    if run.notes:
        body.append('<h2>Not in this report</h2><ul class="notes">' +
                    "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>")  # fmt: skip
    # The policy allows inline styles and data: images only, so nothing on the page can reach a network.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>wprlhf report: {esc(name)}</title>\n<style>{CSS}</style></head>\n"
            f"<body><main>\n{chr(10).join(body)}\n</main></body></html>\n")  # fmt: skip


# ==========================================================================================================
# entry point


# (file name suffix, plot function, heading, caption), in page order
PLOTS = (
    ("overoptimisation", plot_run_over_optimisation, "Over-optimisation: the proxy and the judge against √KL",
     ("As Gao et al. 2022 plot it: the training reward (left) and the judge (right), each measured from the start "
      "policy's score, against the square root of the KL to the start policy (nats per response; the top axis "
      "reads the KL itself). Where the proxy keeps climbing while the judge flattens or falls, the policy is "
      "exploiting the reward model.")),
    ("training", plot_training, "Training curves",
     ("Per PPO step, in real units: β is the KL penalty coefficient (adaptive KL moves it towards the target); "
      "entropy falling fast or length pinned at the limit are signs of collapse.")),
    ("rm_accuracy", plot_rm_accuracy, "Reward model accuracy",
     ("Held-out comparisons of each round's reward model (trained on all labels so far), with the bootstrap 95% "
      "CI, against two baselines that read no meaning.")),
    ("win_rate", plot_win_rate, "Judge win rate: final vs start",
     ("Left: how often the judge prefers the policy after each round to the start policy on the same held-out "
      "prompts (ties count half), shaded 95% CI. Right: the judge's mean scores.")),
)  # fmt: skip


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run (default RUN_DIR/report.html) and its plots as PNGs beside it; returns the
    HTML path. Raises UserError if run_dir is missing or holds no metrics."""
    run = load_run(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: the report is an HTML page; give a file name ending in .html")
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, plot, title, caption in PLOTS:
        data = plot(run)
        if data is None:
            continue
        file_name = f"{out.stem}-{name}.png"
        write_bytes_atomic(out.parent / file_name, data)
        figures.append((file_name, data, title, caption))
    write_bytes_atomic(out, render_html(run, figures).encode("utf-8"))
    return out
