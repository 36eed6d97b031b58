"""Named PPO tasks: openings, control prefixes, the signed rewards and judges, and `wprlhf ppo --task` end to end
on `tiny` with a tiny random classifier (seconds)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from tests.helpers import save_tiny_classifier
from wprlhf.cli import main
from wprlhf.errors import UserError
from wprlhf.methods.onpolicy_config import PPOConfig, check_resumable
from wprlhf.methods.sft import encode_examples
from wprlhf.metrics import read_metrics
from wprlhf.models import load_tokenizer
from wprlhf.pipelines.sentiment import (
    CONTROLS,
    builtin_openings,
    control_prompts,
    controlled,
    load_openings,
    load_task,
    sft_stories,
    split_control,
)
from wprlhf.rewards.classifier import join_review, load_classifier, log_odds, log_odds_reward
from wprlhf.rewards.judges import sentiment

TINY_RUN = ["--policy", "tiny", "--batch-size", "4", "--num-minibatches", "2", "--ppo-epochs", "1",
            "--response-length", "6", "--log-samples", "2", "--sample-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("clf"))


def write_reviews(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ openings


def test_shipped_openings():
    openings = builtin_openings()
    assert len(openings) >= 90 and len(set(openings)) == len(openings)
    assert all(3 <= len(o.split()) <= 14 and "<" not in o for o in openings)
    assert load_openings(None) == openings == load_openings("")


def test_openings_from_reviews(tmp_path):
    reviews = [("What a ride this movie turned out to be, from start to end.<br /><br />Loved it.", 1),
               ("Dull.<br />Nothing happens in it at all", 0),  # first line too short: left out
               ("What a ride this movie turned out to be, again and again", 1),  # same opening: kept once
               ("I expected very little and got even less than that from it", 0)]  # fmt: skip
    folder = tmp_path / "imdb"
    folder.mkdir()
    write_reviews(folder / "imdb_train.csv", reviews)
    expected = ["What a ride this movie turned out to", "I expected very little and got even less"]
    assert load_openings(folder) == expected  # a directory resolves to its imdb_train.csv
    assert load_openings(folder / "imdb_train.csv") == expected
    txt = tmp_path / "openings.txt"
    txt.write_text("The film begins\n\nMy uncle said\n")
    assert load_openings(txt) == ["The film begins", "My uncle said"]


@pytest.mark.parametrize("name, content, message", [
    ("none.csv", None, "does not exist"),
    ("none.txt", None, "openings file .* does not exist"),
    ("prompts.csv", "prompt\nA dragon\n", "has no 'text' column"),
    ("short.csv", "text,label\nBad.,0\n", "gives no review openings"),
    ("blank.txt", "\n\n", "gives no review openings"),
])  # fmt: skip
def test_bad_opening_sources(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_openings(path)


# ------------------------------------------------------------------------------------------------ control


def test_control_prompts_give_every_opening_each_prefix_in_turn():
    prompts = control_prompts(["The film", "My aunt"])
    assert prompts == ["[negative] The film", "[neutral] The film", "[positive] The film",
                       "[negative] My aunt", "[neutral] My aunt", "[positive] My aunt"]  # fmt: skip
    assert split_control("[neutral] My aunt") == ("[neutral]", "My aunt")
    with pytest.raises(UserError, match="does not start with one of"):
        split_control("My aunt")


def test_controlled_signs_a_score_by_its_prefix():
    def score(prompts, responses):  # a known positive-sentiment score that also sees the stripped prompt
        return [len(r) - 3 + (0.5 if p == "x" else 0.0) for p, r in zip(prompts, responses)]

    fn = controlled(score)
    prompts = ["[positive] x", "[negative] x", "[neutral] x", "[neutral] y", "[negative] y"]
    got = fn(prompts, ["ab", "ab", "ab", "abcde", "a"])
    # scores: 2 - 3 + 0.5 = -0.5 three times (x, -x, -|x|), then 5 - 3 = 2 (neutral: -2), then 1 - 3 = -2 (negated)
    assert got == [-0.5, 0.5, -0.5, -2.0, 2.0]
    assert fn([], []) == []


# ------------------------------------------------------------------------------------------------ tasks


@pytest.mark.learning
def test_positive_reviews_task(classifier_dir, tokenizer):
    from wprlhf.generation import encode_prompts

    task = load_task("positive-reviews", classifier_dir)
    assert task.prompts == builtin_openings() and task.chat_template is False
    prompts, responses = task.prompts[:3], ["it was wonderful, a delight.", "a dull, tedious mess.", ", sadly."]
    scores = task.reward_fn(prompts, responses)
    model, tok = load_classifier(classifier_dir)
    expected = log_odds(model, tok, [join_review(p, r) for p, r in zip(prompts, responses)], 64).tolist()
    assert scores == pytest.approx(expected, abs=1e-5) and len({round(s, 3) for s in scores}) == 3
    assert join_review("The film was", ", sadly.") == "The film was, sadly."
    judged = task.judge_fn(["The film was"], ["wonderful, a delight."])
    assert judged == pytest.approx(sentiment([""], ["The film was wonderful, a delight."])) and judged[0] > 0.5
    # plain continuation: the queries are the prompt's own tokens, no chat template around them
    queries, mask = encode_prompts(tokenizer, prompts, None, chat_template=task.chat_template)
    decoded = [tokenizer.decode(q[m]) for q, m in zip(queries, mask)]
    assert decoded == prompts and not any("<|im_start|>" in d for d in decoded)


@pytest.mark.learning
def test_sentiment_control_reward_and_judge_flip_with_the_prefix(classifier_dir):
    task = load_task("sentiment-control", classifier_dir)
    openings = builtin_openings()
    assert len(task.prompts) == 3 * len(openings) and task.chat_template is False
    assert {p.split(" ", 1)[0] for p in task.prompts} == set(CONTROLS)
    assert all(task.prompts[3 * i + j] == f"{c} {o}" for i, o in enumerate(openings) for j, c in enumerate(CONTROLS))
    base = log_odds_reward(classifier_dir)
    opening, responses = openings[0], ["a dull, tedious mess.", "it was wonderful, a delight."]
    for response in responses:
        x = base([opening], [response])[0]
        assert abs(x) > 1e-3
        got = task.reward_fn([f"[positive] {opening}", f"[negative] {opening}", f"[neutral] {opening}"], [response] * 3)
        assert got == pytest.approx([x, -x, -abs(x)], abs=1e-5)
    v = sentiment([""], [join_review("The film was", "awful, boring and terrible.")])[0]
    assert v < -0.5
    judged = task.judge_fn(["[positive] The film was", "[negative] The film was", "[neutral] The film was"],
                           ["awful, boring and terrible."] * 3)  # fmt: skip
    assert judged == pytest.approx([v, -v, -abs(v)])


@pytest.mark.parametrize("name, classifier, message", [
    ("negative-reviews", "x", "unknown task 'negative-reviews'; choose one of positive-reviews, sentiment-control"),
    ("positive-reviews", "", "needs --classifier DIR"),
    ("sentiment-control", "{tmp}/nothing", "has no config.json"),
])  # fmt: skip
def test_bad_tasks(tmp_path, name, classifier, message):
    with pytest.raises(UserError, match=message):
        load_task(name, classifier.format(tmp=tmp_path))


# ------------------------------------------------------------------------------------------------ sft --task

SFT_REVIEWS = [("What a ride this movie turned out to be. Loved every minute of it, truly.", 1),
               ("I expected very little and got even less than that from it. Awful.", 0),
               ("Short.", 1),  # no continuation after its opening: left out
               ("A gentle, funny film about two sisters and a farm, with a great score.", 1)]  # fmt: skip


def test_sft_stories_prefix_each_opening_with_its_label(tmp_path):
    data = write_reviews(tmp_path / "reviews.csv", SFT_REVIEWS)
    stories = sft_stories("sentiment-control", data)
    assert [(s.prompt, s.response) for s in stories] == [
        ("[positive] What a ride this movie turned out to", " be. Loved every minute of it, truly."),
        ("[negative] I expected very little and got even less", " than that from it. Awful."),
        ("[positive] A gentle, funny film about two sisters and", " a farm, with a great score.")]  # fmt: skip
    assert len({s.prompt_id for s in stories}) == 3 and all(s.rank == 0 for s in stories)
    assert [s.prompt for s in sft_stories("positive-reviews", data)] == [
        "What a ride this movie turned out to", "A gentle, funny film about two sisters and"]  # fmt: skip


def test_sft_task_examples_tokenize_as_ppo_continues_them(tmp_path):
    """Prompt tokens then continuation tokens, nothing between: the boundary PPO samples across."""
    tokenizer = load_tokenizer("tiny")
    story = sft_stories("sentiment-control", write_reviews(tmp_path / "r.csv", SFT_REVIEWS))[0]
    (example,) = encode_examples(tokenizer, [story.prompt], [story.response], 64, chat_template=False, separator="")
    assert example.prompt_ids == tokenizer(story.prompt)["input_ids"]
    assert tokenizer.decode(example.prompt_ids + example.response_ids) == story.prompt + story.response + tokenizer.eos_token


@pytest.mark.parametrize("name, data, message", [
    ("happy-reviews", "{data}", "unknown task 'happy-reviews'"),
    ("sentiment-control", "", "learns from labelled reviews: pass --data"),
    ("sentiment-control", "{tmp}/missing.csv", "missing.csv"),
])  # fmt: skip
def test_sft_stories_bad_input(tmp_path, name, data, message):
    data = data.format(data=write_reviews(tmp_path / "r.csv", SFT_REVIEWS), tmp=tmp_path)
    with pytest.raises(UserError, match=message):
        sft_stories(name, data)


@pytest.mark.learning
def test_sft_task_cli_trains_on_control_prefixed_reviews(tmp_path, capsys):
    data = write_reviews(tmp_path / "reviews.csv", SFT_REVIEWS * 3)
    out = tmp_path / "sft"
    argv = ["sft", "--task", "sentiment-control", "--policy", "tiny", "--data", data, "--out", out,
            "--batch-size", 2, "--gradient-accumulation-steps", 1, "--max-length", 48, "--val-fraction", 0.3,
            "--n-samples", 1, "--sample-tokens", 4]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "sentiment-control" and config["chat_template"] is False
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].split(" ", 1)[0] in ("[positive]", "[negative]") for s in samples)
    assert (out / "policy" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ ppo --task


@pytest.mark.learning
def test_ppo_task_run_writes_judge_and_resumes(tmp_path, classifier_dir, capsys):
    out = tmp_path / "run"
    argv = ["ppo", *TINY_RUN, "--task", "sentiment-control", "--classifier", classifier_dir, "--out", out,
            "--checkpoint-every", "1"]  # fmt: skip
    assert main([str(a) for a in argv + ["--steps", "2"]]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2] and all("judge_mean" in r and "score_mean" in r for r in rows)
    assert all(-1 <= r["judge_mean"] <= 1 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "sentiment-control" and config["classifier"] == str(classifier_dir)
    assert config["chat_template"] is False and config["reward"] == "task:sentiment-control"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].split(" ", 1)[0] in CONTROLS for s in samples)
    assert (out / "report.html").exists() and (out / "policy" / "model.safetensors").exists()
    # the same flags resume: the task's changes to the config are made the same way again
    assert main([str(a) for a in argv + ["--steps", "3", "--resume"]]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


@pytest.mark.learning
def test_ppo_task_with_review_data(tmp_path, classifier_dir, capsys):
    reviews = [("This one kept me guessing until the very last scene", 1),
               ("Two hours of my life that I will never get back", 0)]
    data = write_reviews(tmp_path / "reviews.csv", reviews)
    out = tmp_path / "run"
    argv = ["ppo", *TINY_RUN, "--task", "positive-reviews", "--classifier", classifier_dir, "--prompts", data,
            "--steps", "1", "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    prompts = {json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()}
    assert prompts <= {"This one kept me guessing until the very", "Two hours of my life that I will"}


@pytest.mark.parametrize("extra, message", [
    (["--task", "happy-reviews", "--classifier", "{clf}"], "unknown task 'happy-reviews'"),
    (["--task", "positive-reviews"], "needs --classifier DIR"),
    (["--classifier", "{clf}"], "--classifier is the reward of a --task"),
    (["--task", "positive-reviews", "--classifier", "{clf}", "--reward", "length"], "drop --reward"),
    (["--task", "positive-reviews", "--classifier", "{tmp}/none"], "has no config.json"),
])  # fmt: skip
def test_ppo_task_errors_exit_2(tmp_path, classifier_dir, capsys, extra, message):
    argv = ["ppo", *TINY_RUN, "--steps", "1", "--out", str(tmp_path / "run")]
    argv += [a.format(clf=classifier_dir, tmp=tmp_path) for a in extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_checkpoints_from_before_the_task_fields_still_resume():
    config = PPOConfig(policy="tiny")
    saved = dataclasses.asdict(config)
    del saved["task"], saved["classifier"]
    check_resumable(saved, config)  # no error: missing fields ran with their defaults
    with pytest.raises(UserError, match="task: '' -> 'positive-reviews'"):
        check_resumable(saved, dataclasses.replace(config, task="positive-reviews"))
