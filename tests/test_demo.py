"""`wprlhf demo` end to end on tiny models with tiny budgets: every phase's files, one PPO metrics row per step,
the win rate and its CI in the report, and the run-directory rules (--force, --resume)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from wprlhf.cli import main
from wprlhf.metrics import read_metrics

pytestmark = pytest.mark.learning  # every test here takes optimizer steps

TINY = {"eval_prompts": 3, "prompts_per_round": 4, "k": 2, "response_length": 6, "ppo_steps": 3, "batch_size": 4,
        "rm_epochs": 1, "rm_max_length": 64, "temperature": 1.0}  # fmt: skip


def test_demo_pipeline_on_tiny_models(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--policy", "tiny", "--reward-model", "tiny", "--config", str(config), "--out", str(out)]
    assert main(args) == 0

    state = json.loads((out / "loop_state.json").read_text())
    assert state["done"] == ["start", "1:sample", "1:label", "1:rm", "1:ppo", "1:eval"]
    for name in ("start_responses.jsonl", "round-1/responses.jsonl", "round-1/labels.jsonl", "round-1/rm/config.json",
                 "round-1/eval.json", "round-1/eval_pairs.jsonl", "ppo/policy/config.json", "report.html"):  # fmt: skip
        assert (out / name).exists(), name
    rows = read_metrics(out / "ppo" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    with open(out / "loop_metrics.csv", newline="") as f:
        (loop_row,) = list(csv.DictReader(f))
    win, lo, hi = (float(loop_row[k]) for k in ("win_rate", "win_rate_lo", "win_rate_hi"))
    assert 0 <= lo <= win <= hi <= 1
    html = (out / "report.html").read_text()
    assert f"{win:.1%}" in html and f"{lo:.1%}" in re.sub(r"\s+", " ", html)
    assert "the judge prefers the trained policy" in capsys.readouterr().err

    # A finished run is not overwritten by accident; --resume finds nothing left to do; --force starts over.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert read_metrics(out / "ppo" / "metrics.csv") == rows
    assert main(args + ["--force"]) == 0
