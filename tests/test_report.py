"""The HTML report: built from synthetic run directories (a loop run, a plain PPO run, broken ones), it is offline,
escapes model text, embeds its plots and saves them as PNGs, shows the win rate with its CI, and skips what a
run did not write."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from wprlhf.errors import UserError
from wprlhf.metrics import METRIC_NAMES
from wprlhf.report import (Curve, curve_from_steps, curves_from_sides, over_optimisation_xy, plot_over_optimisation,
                           write_over_optimisation, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HACK = "<script>alert(1)</script>"


def _write_metrics(path, steps, judge=True):
    """A PPO metrics.csv with the real header: the proxy reward climbs all run, the judge peaks then falls."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_NAMES)
        writer.writeheader()
        for s in range(1, steps + 1):
            row = {"step": s, "episodes": 4 * s, "score_mean": 0.1 * s, "kl": 0.3 * s, "kl_coef": 0.2 - 0.005 * s,
                   "entropy": 2.5 - 0.05 * s, "response_length": 20 + s, "time_generate": 1.5, "time_score": 0.25,
                   "time_train": 2.0}  # fmt: skip
            if judge:
                row["judge_mean"] = 0.05 * s if s <= steps // 3 else 0.05 * steps // 3 - 0.04 * (s - steps // 3)
            writer.writerow(row)


def _write_samples(path):
    rows = [{"step": step, "prompt": f"Prompt {i} & friends", "response": HACK if step == 20 and i == 0 else f"story {i}",
             "score": 0.1 * step, "kl": 0.2, "rlhf_reward": 0.1} for step in (1, 20) for i in range(2)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROUNDS = [  # round, labels, rm_accuracy, win_rate, lo, hi
    (1, 40, 0.58, 0.552, 0.431, 0.667),
    (2, 80, 0.64, 0.625, 0.514, 0.736),
]


@pytest.fixture()
def loop_dir(tmp_path):
    run = tmp_path / "loop"
    _write_metrics(run / "ppo" / "metrics.csv", steps=24)
    (run / "ppo" / "config.json").write_text(json.dumps({"policy": "tiny", "kl_coef": 0.2, "reward": HACK}))
    _write_samples(run / "ppo" / "samples.jsonl")
    (run / "loop_config.json").write_text(json.dumps({"policy": "tiny", "rounds": 2, "ppo_steps": 12}))
    timings = {"start": 3.0, **{f"{r}:{p}": 10.0 * r for r in (1, 2) for p in ("sample", "label", "rm", "ppo", "eval")}}
    (run / "loop_state.json").write_text(json.dumps({"done": list(timings), "timings_s": timings, "elapsed_s": 153.0}))
    with open(run / "loop_metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "labels", "agreement", "rm_accuracy", "reward_mean", "kl", "kl_coef", "eval_kl",
                         "judge_new", "judge_start", "win_rate", "win_rate_lo", "win_rate_hi", "distinct_2",
                         "start_distinct_2", "elapsed_s"])  # fmt: skip
        for r, labels, acc, wr, lo, hi in ROUNDS:
            writer.writerow([r, labels, "nan", acc, 1.2, 3.4, 0.19, 3.1, 0.3, 0.1, wr, lo, hi, 0.71, 0.83, 70.0 * r])
    for r, labels, acc, wr, lo, hi in ROUNDS:
        rd = run / f"round-{r}"
        (rd / "rm").mkdir(parents=True)
        (rd / "eval.json").write_text(json.dumps({"round": r, "win_rate": wr, "win_rate_lo": lo, "win_rate_hi": hi,
                                                  "n": 24, "judge": "sim:sentiment", "new": {"distinct_2": 0.71},
                                                  "start": {"distinct_2": 0.83}}))  # fmt: skip
        heldout = {"accuracy": acc, "n": 30, "ci95": [acc - 0.1, acc + 0.1]}
        if r == 2:  # round 1's file predates baselines: both shapes must work
            heldout["baselines"] = {"longer_wins": 0.53, "tfidf_logreg": 0.61}
        (rd / "rm" / "eval-heldout.json").write_text(json.dumps(heldout))
    pairs = [{"prompt": "A dragon opens a bakery.", "start": "Once upon a time.", "new": HACK, "judge_start": 0.1,
              "judge_new": 0.9, "reward_start": -0.5, "reward_new": 2.5, "kl": 4.2},
             {"prompt": "The moon <b>files</b> a complaint.", "start": "It was dark & cold.", "new": "Bright.",
              "judge_start": 0.4, "judge_new": 0.2, "reward_start": 0.1, "reward_new": 0.3, "kl": 1.1}]  # fmt: skip
    (run / "round-2" / "eval_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return run


def _assert_pngs(out, html):
    names = re.findall(r"also saved as ([\w.-]+\.png)", html)
    assert names, "no plot was saved"
    assert html.count('src="data:image/png;base64,') == len(names)
    for name in names:
        data = (out.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    return names


def _assert_offline(html):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html and "@import" not in html and "url(" not in html


@pytest.mark.learning
def test_loop_report_is_offline_escaped_and_complete(loop_dir):
    out = write_report(loop_dir)
    assert out == loop_dir / "report.html"
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html.lower()  # the page runs nothing, and model text cannot make it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "The moon &lt;b&gt;files&lt;/b&gt; a complaint." in html and "dark &amp; cold" in html
    _assert_offline(html)
    names = _assert_pngs(out, html)
    assert set(names) == {"report-overoptimisation.png", "report-training.png", "report-rm_accuracy.png",
                          "report-win_rate.png"}  # fmt: skip
    # The final round's win rate and CI in the summary, and every round's in the table.
    assert "62.5%" in html and "95% CI 51.4% – 73.6%" in html
    for _, _, _, wr, lo, hi in ROUNDS:
        assert all(f"{x:.1%}" in html for x in (wr, lo, hi))
    assert "longer wins 53.0%" in html and "TF-IDF 61.0%" in html  # RM accuracy against its baselines
    assert "0.71" in html and "start policy 0.83" in html  # distinct-2 now and at the start
    assert "Possible reward hacking" in html  # reward climbs while the judge falls, over 24 steps
    assert "2 min 33 s" in html  # elapsed time of the loop
    assert "kl_coef" in html and "ppo_steps" in html  # both configs


@pytest.mark.learning
def test_report_to_another_file(loop_dir, tmp_path):
    out = write_report(loop_dir, tmp_path / "elsewhere" / "r.html")
    assert out.exists() and (tmp_path / "elsewhere" / "r-win_rate.png").exists()
    assert not (loop_dir / "report.html").exists()
    with pytest.raises(UserError, match=r"\.html"):
        write_report(loop_dir, tmp_path / "r.png")


@pytest.mark.learning
def test_plain_ppo_run(tmp_path):
    run = tmp_path / "ppo"
    _write_metrics(run / "metrics.csv", steps=5, judge=False)
    _write_samples(run / "samples.jsonl")  # no config.json: skipped and named
    out = write_report(run)
    html = out.read_text(encoding="utf-8")
    _assert_offline(html)
    names = _assert_pngs(out, html)
    assert set(names) == {"report-overoptimisation.png", "report-training.png"}
    assert "logged no judge_mean" in html
    assert "&lt;script&gt;alert(1)" in html and "<script" not in html.lower()
    assert "config.json is missing" in html
    assert "Prompt 0 &amp; friends" in html


@pytest.mark.learning
def test_loop_run_missing_optional_files(loop_dir):
    """A loop killed early: no eval pairs, no RM evaluation, a corrupt round file, no state."""
    (loop_dir / "round-2" / "eval_pairs.jsonl").unlink()
    (loop_dir / "round-1" / "rm" / "eval-heldout.json").unlink()
    (loop_dir / "round-2" / "eval.json").write_text("{not json")
    (loop_dir / "loop_state.json").unlink()
    (loop_dir / "loop_metrics.csv").unlink()
    (loop_dir / "loop_config.json").write_text("[1, 2]")
    html = write_report(loop_dir).read_text(encoding="utf-8")
    assert "round-2/eval.json is unreadable" in html and "loop_config.json is not a JSON object" in html
    assert "Before and after" not in html
    assert "55.2%" in html  # round 1's win rate, from its eval.json alone


def test_missing_or_empty_run_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics"):
        write_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("step,reward_mean\n1,lots\n")
    with pytest.raises(UserError, match="metrics.csv"):
        write_report(bad)


def test_over_optimisation_plots_scores_from_the_start_against_the_root_of_the_kl(tmp_path):
    """Gao et al. 2022's axes: x = √KL to the start (nats per response), y = a score less the start policy's;
    whatever is missing or not finite is left out, and nothing to place gives no figure."""
    sides = {"start": {"kl": {"mean": 0.0}, "reward": {"mean": 1.0}, "judge": {"mean": 0.5}},
             "ppo": {"kl": {"mean": 9.0}, "reward": {"mean": 3.0}, "judge": {"mean": 0.25}},
             "dpo": {"kl": {"mean": -0.04}, "judge": {"mean": 0.75}},  # no training reward; k1 a hair below zero
             "human-top": {"reward": {"mean": 2.0}, "judge": {"mean": 2.0}}}  # no KL: no place on the axis
    points = curves_from_sides(sides)
    assert [c.name for c in points] == ["ppo", "dpo"] and not any(c.steps for c in points)
    assert over_optimisation_xy(points[0], "proxy") == ([3.0], [2.0])
    assert over_optimisation_xy(points[0], "judge") == ([3.0], [-0.25])
    assert over_optimisation_xy(points[1], "proxy") == ([], [])
    assert over_optimisation_xy(points[1], "judge") == ([0.0], [0.25])  # a KL estimate below zero sits at 0
    nan, inf = float("nan"), float("inf")
    rows = [{"step": 1, "kl": 0.0, "score_mean": 0.5, "judge_mean": nan},
            {"step": 2, "kl": 4.0, "score_mean": 1.5, "judge_mean": 0.2},
            {"step": 3, "kl": inf, "score_mean": 2.0, "judge_mean": 0.1},
            {"step": 4, "kl": 16.0, "score_mean": 2.5}]  # fmt: skip
    steps = curve_from_steps("ppo", rows)
    assert steps.steps and over_optimisation_xy(steps, "proxy") == ([0.0, 2.0, 4.0], [0.0, 1.0, 2.0])
    assert over_optimisation_xy(steps, "judge") == ([2.0], [0.0])  # from the first step that logged a judge score
    later = curve_from_steps("round 2", rows[1:], judge_start=0.1)  # a later loop round: the run's judge start
    assert over_optimisation_xy(later, "judge") == ([2.0], [pytest.approx(0.1)])
    path = write_over_optimisation([*points, steps], tmp_path / "over_optimisation.png", note="a note")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert plot_over_optimisation([]) is None
    no_kl = [Curve("ppo", [nan], [1.0], [1.0]), curve_from_steps("ppo", [{"step": 1, "score_mean": 1.0}])]
    assert plot_over_optimisation(no_kl) is None
    assert write_over_optimisation(no_kl, path) is None and not path.exists()  # an earlier figure is not left


def test_report_imports_no_torch():
    code = "import sys, wprlhf.report; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.learning
def test_cli_report(loop_dir, tmp_path, capsys):
    from wprlhf.cli import main

    assert main(["report", str(loop_dir)]) == 0
    assert (loop_dir / "report.html").exists() and "report.html" in capsys.readouterr().err
    assert main(["report", str(loop_dir), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
