"""`wprlhf task-eval`: held-out openings, the paired start/trained comparison, per-control means, the JSON it
writes and its bad inputs. `tiny` policies and a tiny random classifier (seconds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.helpers import json_numbers, same_numbers, save_tiny_classifier
from wprlhf.cli import main
from wprlhf.errors import UserError
from wprlhf.evals.sides import sample_side, side_kl, side_logprobs
from wprlhf.generation import GenerationConfig, generate
from wprlhf.pipelines.sentiment import CONTROLS, builtin_openings, evaluate_task, heldout_openings, opening, summary

SHORT = ["--n", "5", "--response-length", "6", "--min-response-length", "2"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("clf"))


def save_tiny_policy(path, seed):
    from wprlhf.models import load_policy

    model, tokenizer = load_policy("tiny", seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, classifier_dir):
    """A `wprlhf ppo --task` run as the evaluation sees it: policy/ (tiny with other weights than its start) and
    the run's config.json naming task, start policy, classifier and the review directory it trained on."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_policy(run / "policy", seed=1)
    reviews = run / "reviews"
    reviews.mkdir()
    write_reviews(reviews / "imdb_train.csv", ["We trained on this review of a film about trains and rain"])
    write_reviews(reviews / "imdb_test.csv", [f"Test review {i} of a film about the sea, seen twice" for i in range(9)])
    config = {"task": "positive-reviews", "policy": "tiny", "classifier": str(classifier_dir), "chat_template": False,
              "prompts": str(reviews)}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    return run


def write_reviews(path, texts):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((t, i % 2) for i, t in enumerate(texts))
    return path


def cis(tree):
    """Every {mean, lo, hi} in a nested result."""
    if isinstance(tree, dict):
        if {"mean", "lo", "hi"} <= tree.keys():
            yield tree
        for value in tree.values():
            yield from cis(value)


def assert_paired(block):
    assert set(block) == {"start", "trained", "diff"}
    assert block["diff"]["mean"] == pytest.approx(block["trained"]["mean"] - block["start"]["mean"], abs=1e-9)


# ------------------------------------------------------------------------------------------------ openings


def test_heldout_openings_come_from_the_test_file_less_training_openings(tmp_path):
    folder = tmp_path / "imdb"
    folder.mkdir()
    write_reviews(folder / "imdb_train.csv", ["A film about a dog and his very old boat, told slowly"])
    test = [f"Review number {i} of a film I saw last week with friends" for i in range(6)]
    test.insert(3, "A film about a dog and his very old boat, and more")  # opens like a training review
    write_reviews(folder / "imdb_test.csv", test)
    openings, source, from_test = heldout_openings(folder, 100)
    assert source == str(folder / "imdb_test.csv") and from_test
    assert openings == [f"Review number {i} of a film I saw" for i in range(6)]
    drawn, _, _ = heldout_openings(folder, 3, seed=1)
    assert len(drawn) == 3 and drawn == [o for o in openings if o in drawn]  # a draw, in the file's order
    assert heldout_openings(folder, 3, seed=1)[0] == drawn
    assert heldout_openings(None, 4)[1:] == ("builtin", False)
    assert set(heldout_openings("", 4)[0]) <= set(builtin_openings())
    # the file itself is read like any other source: all its openings, no test split known
    whole = heldout_openings(folder / "imdb_test.csv", 100)
    assert whole == ([opening(t) for t in test], str(folder / "imdb_test.csv"), False)
    with pytest.raises(UserError, match="must be >= 1"):
        heldout_openings(folder, 0)


def test_a_side_feeds_plain_text_when_asked(tokenizer, tiny):
    prompts = ["The film opens on a beach", "I wanted to like it"]
    config = GenerationConfig(max_new_tokens=5, temperature=1.0)
    plain = sample_side("tiny", tiny, tokenizer, prompts, config, seed=3, chat_template=False)
    assert plain.texts == generate(tiny, tokenizer, prompts, config, seed=3, chat_template=False)
    assert side_kl(plain, tiny, tiny, tokenizer, prompts, config, chat_template=False) == [0.0, 0.0]
    # Read as plain text, the sampled ids have other log-probs than under the chat template.
    lp = [side_logprobs(plain, tiny, tokenizer, prompts, config, chat_template=c) for c in (False, True)]
    assert not np.allclose(lp[0], lp[1])
    templated = sample_side("tiny", tiny, tokenizer, prompts, config, seed=3)
    assert templated.texts == generate(tiny, tokenizer, prompts, config, seed=3, chat_template=True) != plain.texts


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.mark.learning
def test_the_start_policy_against_itself_differs_by_nothing(tmp_path, classifier_dir):
    policy = save_tiny_policy(tmp_path / "same", seed=0)  # the very weights of `tiny` with seed 0
    result = evaluate_task("positive-reviews", str(policy), "tiny", classifier_dir, n_openings=4, response_length=5,
                           min_response_length=1)  # fmt: skip
    for key in ("reward", "positive_prob", "vader"):
        assert result[key]["diff"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
        assert result[key]["start"] == result[key]["trained"]
    assert all(s["start"] == s["trained"] for s in result["samples"])
    assert abs(result["kl"]["mean"]) < 1e-3  # the k1 estimate of a policy against itself, up to float error


@pytest.mark.learning
def test_task_eval_positive_reviews_writes_beside_the_run(run_dir, capsys):
    assert main(["task-eval", "--policy", str(run_dir / "policy"), *SHORT]) == 0  # task, start, classifier: the run's
    result = json.loads((run_dir / "task-eval.json").read_text())
    assert result["task"] == "positive-reviews" and result["start"] == "tiny" and result["n"] == 5
    assert result["n_samples"] == 5 and result["openings_from_test_split"]
    assert result["openings_source"] == str(run_dir / "reviews" / "imdb_test.csv")
    assert all(s["opening"].startswith("Test review") for s in result["samples"])
    assert result["generation"] == {"response_length": 6, "min_response_length": 2, "temperature": 0.7,
                                    "greedy": False, "chat_template": False}  # fmt: skip
    for key in ("reward", "positive_prob", "vader"):
        assert_paired(result[key])
    assert all(0 <= result["positive_prob"][side]["mean"] <= 1 for side in ("start", "trained"))
    assert all(c["lo"] - 1e-9 <= c["mean"] <= c["hi"] + 1e-9 for c in cis(result))
    assert result["kl"]["mean"] > 0  # other weights than the start's
    assert len(result["samples"]) == 5
    sample = result["samples"][0]
    assert {"opening", "start", "trained", "kl", "reward_start", "reward_trained", "positive_prob_start",
            "positive_prob_trained", "vader_start", "vader_trained"} <= sample.keys()  # fmt: skip
    same_numbers("task_eval_positive", json_numbers(result))
    out = capsys.readouterr().out
    assert "positive-reviews" in out and "KL to start" in out and "P(positive)" in out


@pytest.mark.learning
def test_task_eval_sentiment_control(tmp_path, classifier_dir, capsys):
    policy = save_tiny_policy(tmp_path / "trained", seed=1)
    folder = tmp_path / "imdb"
    folder.mkdir()
    write_reviews(folder / "imdb_test.csv", [f"Film number {i} was shown to us in a cold hall" for i in range(7)])
    out = tmp_path / "eval.json"
    argv = ["task-eval", "--task", "sentiment-control", "--policy", policy, "--start", "tiny", "--classifier",
            classifier_dir, "--prompts", folder, "--out", out, *SHORT]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and result["n_samples"] == 15
    assert result["openings_source"] == str(folder / "imdb_test.csv") and result["openings_from_test_split"]
    assert set(result["by_control"]) == set(CONTROLS)
    for block in result["by_control"].values():
        assert {"trained", "start", "vader_trained", "vader_start", "kl"} <= block.keys()
        assert 0 <= block["trained"]["mean"] <= 1 and -1 <= block["vader_trained"]["mean"] <= 1
    gap = result["gap_positive_minus_negative"]
    assert_paired(gap)
    by = result["by_control"]
    for side in ("start", "trained"):  # the mean gap is the gap of the means: one sample per opening and control
        assert gap[side]["mean"] == pytest.approx(by["[positive]"][side]["mean"] - by["[negative]"][side]["mean"])
    means = [by[c]["trained"]["mean"] for c in CONTROLS]
    assert result["neutral_between"] == (means[0] < means[1] < means[2])
    assert_paired(result["reward"]) and assert_paired(result["vader"])
    assert all(c["lo"] - 1e-9 <= c["mean"] <= c["hi"] + 1e-9 for c in cis(result))
    assert [s["control"] for s in result["samples"][:3]] == list(CONTROLS) and len(result["samples"]) == 15
    assert "[neutral]" in capsys.readouterr().out
    assert "signed by control" in summary(result)
    same_numbers("task_eval_control", json_numbers(result))


@pytest.mark.parametrize("argv, message", [
    (["--policy", "{tmp}/nothing/policy", "--task", "positive-reviews", "--classifier", "{clf}"], "does not exist"),
    (["--policy", "{tmp}/nothing/policy", "--task", "positive-reviews", "--classifier", "{clf}", "--out", "{out}"],
     "does not exist"),
    (["--policy", "{run}/policy", "--task", "happy-reviews", "--out", "{out}"], "unknown task 'happy-reviews'"),
    (["--policy", "tiny", "--task", "positive-reviews", "--out", "{out}"], "needs --classifier DIR"),
    (["--policy", "tiny", "--classifier", "{clf}", "--out", "{out}"], "needs --task"),
    (["--policy", "{run}/policy", "--classifier", "{tmp}", "--out", "{out}"], "has no config.json"),
    (["--policy", "tiny", "--task", "positive-reviews", "--classifier", "{clf}"], "give --out"),
    (["--policy", "{run}/policy", "--n", "0", "--out", "{out}"], "must be >= 1"),
])  # fmt: skip
def test_task_eval_errors_exit_2(tmp_path, run_dir, classifier_dir, capsys, argv, message):
    out = tmp_path / "eval.json"
    code = main(["task-eval", *(a.format(tmp=tmp_path, clf=classifier_dir, run=run_dir, out=out) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
