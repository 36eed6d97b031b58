"""`wprlhf rm table`: the length-debiased test split's rules on hand-made pairs, one scoring path for models and
baselines, the paired bootstrap, and a model that saw a test prompt refused."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from wprlhf.cli import main
from wprlhf.data import karma_pairs, load_responses
from wprlhf.errors import UserError
from wprlhf.evals.rm_table import build, model_command, karma_test_splits
from wprlhf.rewards.reward_model import RewardConfig, resolve_comparisons, train

# Test prompt t0 (words, karma) per story: A 100/400, B 110/90, C 200/12, D 105/1. Qualifying by karma (gap >= 20,
# ratio >= 2): A>B, A>C, A>D, B>C, B>D; C>D fails (gap 11). Length ratio <= 1.25 drops A>C (2.0) and B>C (1.82).
STORIES = {"t0": [(100, 400), (110, 90), (200, 12), (105, 1)]}
DEBIASED_T0 = {("t0", 0, 1), ("t0", 0, 3), ("t0", 1, 3)}


def _story(prompt_id: str, r: int, words: int) -> str:
    """`words` words, the first naming the story ('t0x2': story 2 of t0); the better two stories of a prompt say
    'bright', the worse two 'dull' (a bag of words can learn it)."""
    word = "bright" if r < 2 else "dull"
    return " ".join([f"{prompt_id}x{r}", *(f"{word}{i % 7}" if i % 2 else word for i in range(words - 1))])


def _story_of(text: str) -> int:
    return int(text.split()[0].rsplit("x", 1)[1])


def _pair_row(c, rows):
    (a, b), (ra, rb) = c.responses, (rows[c.responses[0]], rows[c.responses[1]])
    return {"prompt_id": c.prompt_id, "prompt": c.prompt, "response_a_id": ra["response_id"], "response_a": a,
            "response_b_id": rb["response_id"], "response_b": b, "score_a": ra["response_score"],
            "score_b": rb["response_score"], "label": c.best}  # fmt: skip


@pytest.fixture
def karma_dir(tmp_path):
    """prompt_responses (2 test prompts, 8 train prompts x 4 stories) and the two pair files cut from it."""
    root = tmp_path / "wp"
    root.mkdir()
    stories = dict(STORIES, t1=[(90, 300), (95, 100), (100, 10), (98, 2)])
    for p in range(8):
        stories[f"s{p}"] = [(60 + p, 500), (62, 120), (58, 5), (61, 1)]
    rows = [{"prompt_id": pid, "prompt": f"[WP] prompt {pid}", "response_id": f"{pid}_r{r}",
             "response": _story(pid, r, words), "response_score": karma, "response_rank": r}
            for pid, group in stories.items() for r, (words, karma) in enumerate(group)]  # fmt: skip
    with open(root / "prompt_responses.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by_text = {row["response"]: row for row in rows}
    pairs = karma_pairs(load_responses(root))
    for name, keep, opener in (("comparisons_test.csv", "t", open), ("comparisons_train.csv.gz", "s", gzip.open)):
        with opener(root / name, "wt", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(_pair_row(pairs[0], by_text)))
            w.writeheader()
            w.writerows(_pair_row(c, by_text) for c in pairs if c.prompt_id.startswith(keep))
    return root


def test_the_debiased_split_keeps_every_qualifying_length_matched_pair_of_the_test_prompts_only(karma_dir):
    splits = karma_test_splits(karma_dir)
    assert {c.prompt_id for c in splits["plain"]} == {"t0", "t1"}
    got = {(c.prompt_id, _story_of(c.responses[c.best]), _story_of(c.responses[1 - c.best]))
           for c in splits["debiased"]}  # fmt: skip
    assert {g for g in got if g[0] == "t0"} == DEBIASED_T0
    assert {c.prompt_id for c in splits["debiased"]} <= {"t0", "t1"}  # never a training prompt


@pytest.fixture
def tiny_rm(karma_dir, tmp_path):
    config = RewardConfig(data=str(karma_dir / "comparisons_train.csv.gz"), model="tiny", max_length=32, epochs=2,
                          batch_size=8, lr=1e-3, max_examples=0, val_fraction=0.0, eval_every=100,
                          normalize_samples=8, pair_weight="strength", seed=0)  # fmt: skip
    train(config, tmp_path / "rm", progress=False)
    return tmp_path / "rm"


def test_the_table_scores_models_and_baselines_on_both_splits_with_paired_differences(karma_dir, tiny_rm, tmp_path):
    out = tmp_path / "table"
    main(["rm", "table", "--model", str(tiny_rm), "--model", str(tiny_rm), "--data", str(karma_dir), "--out", str(out)])
    table = json.loads((out / "rm_table.json").read_text())
    names = [r["name"] for r in table["rows"]]
    assert names == ["longer wins (words)", "TF-IDF logistic regression", "rm", "rm", "rm + TF-IDF"]
    tfidf, first, again = table["rows"][1], table["rows"][2], table["rows"][3]
    # TF-IDF learns bright-vs-dull from the training prompts: every test pair has a bright winner and a dull loser
    # except those between two bright or two dull stories (A>B and C>D types), which it gets by chance or not.
    assert tfidf["debiased"]["accuracy"] > 0.5
    for split in ("plain", "debiased"):
        assert table["splits"][split]["n"] == first[split]["n"] > 0
        vs = first[split]["vs_tfidf"]
        assert vs["diff"] == pytest.approx(first[split]["accuracy"] - tfidf[split]["accuracy"])
        assert vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]
        # the same model against itself: a difference of exactly 0, CI included
        assert again[split]["vs_first"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert first["command"].startswith("wprlhf rm train") and "--pair-weight strength" in first["command"]
    assert "--data" in first["command"] and "--model tiny" in first["command"]
    assert "| rm |" in (out / "rm_table.md").read_text()
    assert len((out / "rm_table.csv").read_text().splitlines()) == 1 + 2 * len(names)
    # The scores are kept beside the model; a damaged copy is scored again, never trusted.
    assert (tiny_rm / "rm_table_scores.json").exists()
    (tiny_rm / "rm_table_scores.json").write_text('{"key": "x", "scores": [NaN')
    again = build([tiny_rm], karma_dir, tmp_path / "again", progress=False)
    assert again["rows"][2]["debiased"] == {k: v for k, v in first["debiased"].items() if k != "vs_first"}


def test_a_model_that_trained_on_a_test_prompt_is_refused(karma_dir, tmp_path):
    config = RewardConfig(data=str(karma_dir / "comparisons_test.csv"), model="tiny", max_length=16, epochs=1,
                          batch_size=8, max_examples=8, val_fraction=0.0, normalize_samples=4, seed=0)  # fmt: skip
    train(config, tmp_path / "leaky", progress=False)
    with pytest.raises(UserError, match="trained on 2 of the 2 test prompts"):
        build([tmp_path / "leaky"], karma_dir, tmp_path / "table", progress=False)
    assert not (tmp_path / "table").exists()  # refused before anything was written
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no config.json"):
        build([tmp_path / "empty"], karma_dir, tmp_path / "table", progress=False)


def test_model_command_lists_only_settings_that_differ_from_the_defaults(tmp_path):
    command = model_command(tmp_path / "best", {"data": "pairs.csv", "lr": RewardConfig().lr, "epochs": 2,
                                                "keep_meta": True})  # fmt: skip
    assert command == "wprlhf rm train --data pairs.csv --epochs 2 --keep-meta --out best"


def test_more_pairs_are_rebuilt_from_the_training_prompts_only(karma_dir):
    shipped = resolve_comparisons(str(karma_dir), keep_meta=False)
    assert len(shipped) == 40 and {c.prompt_id[0] for c in shipped} == {"s"}  # 8 prompts x 5 qualifying pairs
    every = resolve_comparisons(str(karma_dir), keep_meta=False, pairs_per_prompt=0)
    assert sorted((c.prompt_id, c.responses[c.best]) for c in every) == sorted(
        (c.prompt_id, c.responses[c.best]) for c in shipped)  # all of them: the shipped cap of 20 cut none here
    capped = resolve_comparisons(str(karma_dir), keep_meta=False, pairs_per_prompt=2)
    assert len(capped) == 16 and {c.prompt_id[0] for c in capped} == {"s"}
    with pytest.raises(UserError, match="--data must be a directory"):
        resolve_comparisons(str(karma_dir / "comparisons_test.csv"), keep_meta=False, pairs_per_prompt=0)
