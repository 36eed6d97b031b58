"""`wprlhf compare` end to end on `tiny` with tiny budgets: every method trained from the same comparisons and judged
against the start policy on prompts none of them trained on; resume and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wprlhf.data import load_comparisons, load_prompts
from wprlhf.errors import UserError
from wprlhf.metrics import read_metrics
from wprlhf.pipelines.compare import CompareConfig, over_optimisation_curves, run
from tests.helpers import json_numbers, same_numbers

pytestmark = pytest.mark.learning  # every method takes optimizer steps

TINY = dict(policy="tiny", reward_model="tiny", labeler="vowels", judge="vowels", eval_prompts=6, n_comparisons=8,
            budget=16, batch_size=8, response_length=6, methods="ppo,rloo,grpo,dpo,best-of-2,best-of-4",
            mixed_precision="no")  # fmt: skip


def test_every_method_on_the_same_preferences_and_budget(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about the {i}th {thing}.\n" for i in range(12)
                               for thing in ("cat", "storm")))  # fmt: skip
    config = CompareConfig(**TINY, prompts=str(prompts))
    report = run(config, tmp_path / "run")
    out = tmp_path / "run"
    train, held_out = load_prompts(out / "prompts" / "train.txt"), load_prompts(out / "prompts" / "eval.txt")
    assert not set(train) & set(held_out) and len(held_out) >= 5
    comparisons = load_comparisons(out / "comparisons.jsonl")
    assert len(comparisons) == 8 and all(c.prompt in train for c in comparisons)
    # The budget: 16 responses each. PPO, RLOO and GRPO: 2 steps of 8; DPO: 8 pairs = 16 responses, one epoch.
    for method in ("ppo", "rloo", "grpo"):
        assert [r["episodes"] for r in read_metrics(out / method / "metrics.csv")] == [8, 16], method
    assert read_metrics(out / "dpo" / "metrics.csv")[-1]["pairs"] == 8
    assert set(report["sides"]) == {"start", "ppo", "rloo", "grpo", "dpo", "best-of-2", "best-of-4"}
    for name in report["sides"]:
        if name != "start":
            win = report["win_rates"][f"{name} vs start"]
            assert 0 <= win["win_rate_lo"] <= win["win_rate"] <= win["win_rate_hi"] <= 1
    # Best-of-n's KL is the closed form; a trained policy's is measured (and it did move).
    assert report["sides"]["best-of-4"]["kl"]["mean"] == pytest.approx(1.386294 - 0.75, abs=1e-5)
    assert all(report["sides"][m]["kl"]["mean"] != 0 for m in ("ppo", "rloo", "grpo", "dpo"))
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 7 and "train minutes" in table
    assert (out / "over_optimisation.png").read_bytes().startswith(b"\x89PNG")
    # Over-optimisation: every method a point with the reward model's score beside the judge's, and the steps of
    # the methods that log KL per step a line.
    assert all(report["sides"][name]["reward"]["lo"] <= report["sides"][name]["reward"]["mean"]
               <= report["sides"][name]["reward"]["hi"] for name in report["sides"])  # fmt: skip
    curves = over_optimisation_curves(report, out)
    assert {c.name for c in curves if not c.steps} == set(report["sides"]) - {"start"}
    assert [c.name for c in curves if c.steps] == ["ppo", "rloo", "grpo"]
    assert all(len(c.kl) == 2 for c in curves if c.steps)  # 2 steps each
    assert json.loads((out / "report.json").read_text())["budget"] == 16
    same_numbers("compare_tiny", json_numbers({"report": json.loads((out / "report.json").read_text()),
                                               **{m: read_metrics(out / m / "metrics.csv") for m in ("ppo", "rloo", "grpo", "dpo")}}))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == held_out and all(set(s) == {"prompt", *report["sides"]} for s in samples)
    # A finished run is not overwritten, and a resume with other settings is refused.
    with pytest.raises(UserError, match="--resume"):
        run(config, out)
    with pytest.raises(UserError, match="budget"):
        run(CompareConfig(**{**TINY, "budget": 32}, prompts=str(prompts)), out, resume=True)


def test_a_comparisons_file_is_kept_to_train_prompts(tmp_path):
    """Comparisons of held-out prompts are dropped (no method learns on the judge's prompts); a file with none of
    the train prompts is refused, before any training."""
    from wprlhf.data import Comparison, write_comparisons

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about the {i}th cat.\n" for i in range(16)))
    data = tmp_path / "labels.jsonl"
    write_comparisons(data, [Comparison(f"Tell me about the {i}th cat.", ["a b", "c d"], i % 2) for i in range(16)])
    config = CompareConfig(**{**TINY, "methods": "dpo", "eval_prompts": 4}, prompts=str(prompts), comparisons=str(data))
    run(config, tmp_path / "run")
    kept = {c.prompt for c in load_comparisons(tmp_path / "run" / "comparisons.jsonl")}
    assert kept == set(load_prompts(tmp_path / "run" / "prompts" / "train.txt")) and len(kept) == 12
    write_comparisons(data, [Comparison("A prompt nobody gave.", ["a", "b"], 0)])
    with pytest.raises(UserError, match="no comparison is of a train prompt"):
        run(dataclasses.replace(config, comparisons=str(data)), tmp_path / "other")


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="unknown method 'sft'"):
        CompareConfig(methods="ppo,sft")
    with pytest.raises(UserError, match="best-of-N"):
        CompareConfig(methods="best-of-1")
    with pytest.raises(UserError, match="multiple of 4"):
        CompareConfig(batch_size=6)


def test_eval_prompts_from_a_file_and_a_trained_reward_model(tmp_path):
    """The writing task's set-up: eval prompts from another run's split (a repost of one in --prompts is dropped
    from training), a reward model already trained on the comparisons used as it is (no rm/ phase), relevance
    reported; a run stored before a config field existed resumes with that field's default."""
    from wprlhf.data import Comparison, write_comparisons
    from wprlhf.rewards.reward_model import RewardConfig
    from wprlhf.rewards.reward_model import train as rm_train

    prompts, held = tmp_path / "prompts.txt", tmp_path / "eval.txt"
    prompts.write_text("".join(f"Tell me about the {i}th cat.\n" for i in range(10)) + "TELL me about the 0th CAT!\n")
    held.write_text("Tell me about the 0th cat.\n" + "".join(f"Tell me about the {i}th dog.\n" for i in range(5)))
    data = tmp_path / "labels.jsonl"
    write_comparisons(
        data, [Comparison(f"Tell me about the {i}th cat.", ["a e i o", "x y z"], 0) for i in range(1, 10)]
    )
    rm_train(RewardConfig(data=str(data), model="tiny", val_fraction=0.0, mixed_precision="no"), tmp_path / "rm")
    config = CompareConfig(**{**TINY, "methods": "grpo,best-of-2", "eval_prompts": 5,
                              "reward_model": f"rm:{tmp_path / 'rm'}"}, prompts=str(prompts), eval_file=str(held),
                           comparisons=str(data), relevance=True)  # fmt: skip
    out = tmp_path / "run"
    report = run(config, out)
    train, evals = load_prompts(out / "prompts" / "train.txt"), load_prompts(out / "prompts" / "eval.txt")
    assert evals == ["Tell me about the 0th cat."] + [f"Tell me about the {i}th dog." for i in range(4)]
    assert train == [f"Tell me about the {i}th cat." for i in range(1, 10)]  # the eval prompt and its repost gone
    assert not (out / "rm").exists() and "rm" not in json.loads((out / "compare_state.json").read_text())["done"]
    assert -1 <= report["sides"]["grpo"]["relevance"]["mean"] <= 1 and "relevance" in (out / "table.md").read_text()
    # An older run's config lacks the newer fields: it resumes as if it had their defaults.
    state = json.loads((out / "compare_state.json").read_text())
    del state["config"]["relevance"]
    (out / "compare_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="relevance"):
        run(config, out, resume=True)
    run(dataclasses.replace(config, relevance=False), out, resume=True)


def test_a_missing_trained_reward_model_fails_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about the {i}th cat.\n" for i in range(16)))
    missing = {**TINY, "reward_model": f"rm:{tmp_path / 'nowhere'}"}
    with pytest.raises(UserError, match="needs --comparisons"):
        CompareConfig(**missing, prompts=str(prompts))
    with pytest.raises(UserError, match="judge is the --reward-model"):
        CompareConfig(**{**missing, "judge": missing["reward_model"]}, prompts=str(prompts), comparisons="c.jsonl")
    with pytest.raises(UserError, match="nowhere"):
        run(CompareConfig(**missing, prompts=str(prompts), comparisons=str(prompts)), tmp_path / "run")
    assert not (tmp_path / "run" / "prompts").exists()
