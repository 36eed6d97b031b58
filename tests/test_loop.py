"""Simulated labelers (Bradley-Terry noise around a hidden judge) and the iterative loop on tiny models: every
phase writes its files, labels accumulate across rounds, and a killed loop resumes after its last phase."""

from __future__ import annotations

import json
import math

import pytest
import torch

from wprlhf.data import load_comparisons
from wprlhf.errors import UserError
from wprlhf.evals.measures import distinct_n, repetition_rate, scored_win_rate
from wprlhf.evals.sides import sample_side, side_kl
from wprlhf.generation import GenerationConfig, generation_config
from wprlhf.metrics import read_metrics
from wprlhf.pipelines.loop import STATE_FILE, LoopConfig, run
from wprlhf.rewards.judges import SimulatedLabeler, agreement, sentiment
from wprlhf.rewards.spec import load_reward
from tests.helpers import json_numbers, same_numbers


def test_sentiment_orders_obvious_texts():
    good, bad = sentiment(["p", "p"], ["What a wonderful, happy, lovely day.", "A horrible, sad and awful day."])
    assert good > 0.5 and bad < -0.5


def test_weighted_judge_spec():
    texts = ["I love it.", "I hate it."]
    base = sentiment(["p"] * 2, texts)
    doubled = load_reward("sim:2*sentiment", what="judge")(["p"] * 2, texts)
    summed = load_reward("sentiment+0.5*sentiment", what="judge")(["p"] * 2, texts)
    assert doubled == pytest.approx([2 * s for s in base])
    assert summed == pytest.approx([1.5 * s for s in base])


def test_one_resolver_reads_reward_judge_and_labeler_specs(tmp_path):
    """`--reward`, `--judge` and `--labeler sim:` share one grammar: built-ins, user code, weighted sums."""
    from wprlhf.rewards.spec import length, vowels

    texts = ["I love it, a lovely long day.", "I hate it."]
    assert load_reward("vowels")(["p"] * 2, texts) == vowels(["p"] * 2, texts)
    assert load_reward("sim:sentiment", what="judge")(["p"] * 2, texts) == sentiment(["p"] * 2, texts)
    assert load_reward("sim:sentiment").spec == "sentiment" and load_reward(" length+vowels ").spec == "length+vowels"
    mixed = load_reward("length+0.5*sentiment")(["p"] * 2, texts)
    assert mixed == pytest.approx([a + 0.5 * b for a, b in zip(length(["p"] * 2, texts), sentiment(["p"] * 2, texts))])
    user = tmp_path / "my+reward*v2.py"  # a whole SPEC's path may hold the sum's '+' and '*'
    user.write_text("def fn(prompts, responses):\n    return [1.0] * len(responses)\n")
    assert load_reward(f"{user}:fn")(["p"], ["x"]) == [1.0]
    (tmp_path / "plain.py").write_text(user.read_text())
    assert load_reward(f"2*{tmp_path / 'plain.py'}:fn+vowels")(["p"], ["a"]) == [3.0]
    with pytest.raises(UserError, match="unknown reward 'colour'"):
        load_reward("colour")


def test_a_negative_weight_makes_repetition_a_loop_penalty():
    """`repetition` is graded: a longer loop costs more, prose that never repeats a 4-gram costs nothing."""
    texts = ["She lit the candle and waited for the voice to speak again before dawn came.",
             "and then he ran and then he ran and then he ran away",
             "the end of the end of the end of the end of the end of the end"]  # fmt: skip
    assert load_reward("-2*repetition")(["p"] * 3, texts) == pytest.approx([0.0, -2 * 5 / 10, -2 * 11 / 14])
    story_then_loop = load_reward("1.2*story+-2*repetition")(["p"] * 3, texts)
    assert story_then_loop[:2] == pytest.approx([1.2, 1.2 - 1.0])


@pytest.mark.parametrize("spec, message", [("colour", "unknown judge 'colour'"), ("x*sentiment", "is not a number"),
                                           ("sim:", "empty judge spec")])  # fmt: skip
def test_bad_judge_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward(spec, what="judge")


def test_bradley_terry_choice_frequencies():
    """P(pick A) = sigmoid((sA - sB) / T): 2,000 draws land within 4 standard errors of it."""
    labeler = SimulatedLabeler(judge=lambda p, r: [0.0] * len(r), temperature=0.5, seed=3)
    draws = [labeler.choose([0.3, 0.0]) for _ in range(2000)]
    expected = 1 / (1 + math.exp(-0.3 / 0.5))
    share = draws.count(0) / len(draws)
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(draws))
    assert SimulatedLabeler(judge=sentiment, temperature=0).choose([0.1, 0.9, 0.5]) == 1


def test_labelers_disagree_on_close_calls_only():
    scores = {"clear-good": 1.0, "clear-bad": -1.0, "close-a": 0.01, "close-b": 0.0}
    judge = lambda prompts, responses: [scores[r] for r in responses]  # noqa: E731
    labeler = SimulatedLabeler(judge=judge, name="sim:toy", temperature=0.05, labelers=5, seed=0)
    clear = labeler.label(["p"] * 20, [["clear-bad", "clear-good"]] * 20)
    close = labeler.label(["p"] * 20, [["close-a", "close-b"]] * 20)
    assert {c.labeler for c in clear} == {f"sim:toy#{j}" for j in range(5)}
    assert all(c.best == 1 for c in clear) and agreement(clear) == 1.0
    assert 0.3 < agreement(close) < 0.8


def test_win_rate_counts_ties_as_half():
    result = scored_win_rate([2, 1, 3, 1], [1, 1, 1, 2], ["a", "b", "c", "d"])
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert result["win_rate_lo"] <= result["win_rate"] <= result["win_rate_hi"]


def test_distinct_and_repetition():
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n([""], 2) == 0.0
    assert repetition_rate(["the cat sat down and the cat sat down", "one two three four five one two three"]) == 0.5


def test_kl_of_a_policy_to_itself_is_zero_and_to_another_positive(tiny, tokenizer):
    from wprlhf.models import load_policy, make_reference

    config = GenerationConfig(max_new_tokens=6, temperature=1.0)
    prompts = ["Write about a cat.", "A storm comes."]
    side = sample_side("tiny", tiny, tokenizer, prompts, config, seed=1)
    same = side_kl(side, tiny, make_reference(tiny), tokenizer, prompts, config)
    assert same == pytest.approx([0.0, 0.0], abs=1e-4)
    other, _ = load_policy("tiny", seed=5)
    kls = side_kl(side, tiny, make_reference(other), tokenizer, prompts, config)
    assert len(side.texts) == 2 and sum(kls) / 2 > 0.1


def _config(**overrides):
    base = dict(policy="tiny", reward_model="tiny", labeler="sim:sentiment", rounds=2, k=2, prompts_per_round=4,
                eval_prompts=2, ppo_steps=2, response_length=6, rm_epochs=1, rm_max_length=64, temperature=1.0)  # fmt: skip
    return LoopConfig(**{**base, **overrides})


@pytest.mark.learning
def test_loop_runs_rounds_and_resumes(tmp_path):
    ppo_file = tmp_path / "ppo.json"
    ppo_file.write_text(json.dumps({"batch_size": 4, "num_minibatches": 1, "ppo_epochs": 1, "log_samples": 0}))
    out = tmp_path / "loop"
    config = _config(ppo_config=str(ppo_file), min_response_length=6)  # fixed-length responses in every phase
    rows = run(config, out)
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["labels"] for r in rows] == [4, 8]  # labels accumulate: round 2's model sees both rounds
    for r in (1, 2):
        labels = list(load_comparisons(out / f"round-{r}" / "labels.jsonl"))
        assert len(labels) == 4 and all(len(c.responses) == 2 and c.labeler == "sim:sentiment" for c in labels)
        assert (out / f"round-{r}" / "rm" / "config.json").exists()
        # every label so far, whatever rm train's own subsampling default is
        assert json.loads((out / f"round-{r}" / "rm" / "train_config.json").read_text())["max_examples"] == 0
        result = json.loads((out / f"round-{r}" / "eval.json").read_text())
        assert 0 <= result["win_rate_lo"] <= result["win_rate"] <= result["win_rate_hi"] <= 1
        assert result["n"] == 4  # 2 held-out prompts x 2 samples
    ppo_rows = read_metrics(out / "ppo" / "metrics.csv")
    assert [r["step"] for r in ppo_rows] == [1, 2, 3, 4]  # one PPO run, continued: 2 steps a round
    assert json.loads((out / "ppo" / "config.json").read_text())["min_response_length"] == 6
    assert generation_config(config).min_new_tokens == 6  # what label sampling and evaluation use
    assert all(-1 <= r["judge_mean"] <= 1 for r in ppo_rows)  # VADER compound, logged beside the RM reward
    pairs = [json.loads(line) for line in (out / "round-2" / "eval_pairs.jsonl").open()]
    assert len(pairs) == 4 and {"start", "new", "judge_start", "judge_new", "reward_new", "kl"} <= set(pairs[0])
    assert json.loads((out / "round-2" / "eval.json").read_text())["sides"]["new"]["distinct_2"]["mean"] > 0
    state = json.loads((out / STATE_FILE).read_text())
    assert set(state["timings_s"]) == set(state["done"])
    held_out = (out / "eval_prompts.txt").read_text().split("\n")[:2]
    trained = {json.loads(line)["prompt"] for r in (1, 2) for line in (out / f"round-{r}" / "responses.jsonl").open()}
    assert not trained & set(held_out)
    same_numbers("loop_tiny", json_numbers({"ppo": ppo_rows, **{f"round-{r}": json.loads((out / f"round-{r}" / "eval.json")
                                           .read_text()) for r in (1, 2)}}))  # fmt: skip

    with pytest.raises(UserError, match="--resume"):
        run(config, out)
    # A loop killed during round 2's evaluation redoes only that phase.
    state = json.loads((out / STATE_FILE).read_text())
    state["done"].remove("2:eval")
    (out / STATE_FILE).write_text(json.dumps(state))
    stamp = (out / "round-2" / "rm" / "model.safetensors").stat().st_mtime_ns
    again = run(config, out, resume=True)
    assert [r["round"] for r in again] == [1, 2] and again[1]["labels"] == 8
    assert (out / "round-2" / "rm" / "model.safetensors").stat().st_mtime_ns == stamp


def test_loop_config_errors():
    with pytest.raises(UserError, match="--judge"):
        LoopConfig(labeler="web", db="x.db")
    with pytest.raises(UserError, match="sim:SPEC"):
        LoopConfig(labeler="sentiment")
    with pytest.raises(UserError, match="min_response_length"):
        LoopConfig(response_length=32, min_response_length=48)


@pytest.mark.learning
def test_loop_waits_for_web_labels(tmp_path):
    """With labeler 'web', a round's samples are queued in the database and the loop goes on once people (here a
    thread using the store, as the page does) have labelled them."""
    import threading

    from wprlhf.labeling.store import Store

    db = tmp_path / "labels.db"
    stop = threading.Event()

    def person():
        store = Store(db)
        while not stop.is_set():
            item = store.next_for("alice")
            if item is None:
                stop.wait(0.05)
                continue
            store.label(item["id"], "alice", 1)

    worker = threading.Thread(target=person, daemon=True)
    worker.start()
    try:
        rows = run(_config(labeler="web", judge="sentiment", db=str(db), rounds=1, poll_s=0.05), tmp_path / "web")
    finally:
        stop.set()
        worker.join(5)
    labels = list(load_comparisons(tmp_path / "web" / "round-1" / "labels.jsonl"))
    assert rows[0]["labels"] == 4 and len(labels) == 4
    assert all(c.labeler == "alice" and c.best == 1 for c in labels)


def test_pairs_questions_ask_every_pair_once():
    from wprlhf.pipelines.loop import questions

    prompts, asked = questions(["p", "q"], [["a", "b", "c"], ["d", "e"]], "pairs")
    assert prompts == ["p", "p", "p", "q"] and asked == [["a", "b"], ["a", "c"], ["b", "c"], ["d", "e"]]
    assert questions(["p"], [["a", "b", "c"]], "best-of-k") == (["p"], [["a", "b", "c"]])
    with pytest.raises(UserError, match="questions"):
        _config(questions="triples")


# ----------------------------------------------------------------------------------------------------------
# a policy that only ever writes empty responses (issue 16, item 4): legal, and it must flow through every phase


@pytest.fixture(scope="module")
def silent_policy(tmp_path_factory):
    """A `tiny` policy whose first token is always <|im_end|>, saved as a policy directory: every token embeds
    alike and no layer adds anything, so the last hidden state is one fixed vector, and the output head gives
    <|im_end|> a logit of 50 on it and every other token 0 (probability of anything else < 1e-16)."""
    from wprlhf.models import load_policy

    policy, tokenizer = load_policy("tiny", seed=0)
    with torch.no_grad():
        embeddings = policy.get_input_embeddings().weight
        embeddings.copy_(embeddings[:1].expand_as(embeddings))
        for layer in policy.model.layers:  # residual branches off: hidden state = the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = policy.model.norm(embeddings[:1])[0]
        head = policy.get_output_embeddings().weight
        head.zero_()
        head[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 50 * hidden / hidden.norm() ** 2
    path = tmp_path_factory.mktemp("silent") / "policy"
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sample_cli_writes_empty_responses(silent_policy, tmp_path, capsys):
    from wprlhf.cli import main

    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--policy", str(silent_policy), "-k", "2", "--max-prompts", "3", "--max-new-tokens", "4",
                 "--temperature", "1.0", "--out", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(row["responses"] == ["", ""] for row in rows)


def test_empty_responses_are_labelled_and_stored(tmp_path):
    """A simulated labeler compares an empty response like any other, and the comparison round-trips to JSONL."""
    from wprlhf.data import write_comparisons

    for spec in ("sentiment", "relevance"):
        labeler = SimulatedLabeler(load_reward(spec, what="judge"), temperature=0)
        labels = labeler.label(["Write a happy story."] * 2, [["", "A wonderful, happy day."], ["", ""]])
        assert [c.responses for c in labels] == [["", "A wonderful, happy day."], ["", ""]]
        assert labels[0].best == 1 or spec == "relevance"  # VADER: "" is neutral (0), the happy text positive
    path = write_comparisons(tmp_path / "c.jsonl", labels)
    assert list(load_comparisons(path)) == labels


@pytest.mark.learning
def test_loop_runs_on_a_policy_that_writes_only_empty_responses(silent_policy, tmp_path):
    """It died with a raw ValueError when the labeler built its first comparison of empty responses."""
    ppo_file = tmp_path / "ppo.json"
    ppo_file.write_text(json.dumps({"batch_size": 4, "num_minibatches": 1, "ppo_epochs": 1, "log_samples": 0}))
    out = tmp_path / "loop"
    config = _config(policy=str(silent_policy), rounds=1, ppo_steps=1, response_length=4, ppo_config=str(ppo_file))
    rows = run(config, out)
    samples = [json.loads(line) for line in (out / "round-1" / "responses.jsonl").open()]
    assert samples and all(r == "" for s in samples for r in s["responses"])
    labels = list(load_comparisons(out / "round-1" / "labels.jsonl"))
    assert len(labels) == 4 and all(c.responses == ["", ""] for c in labels)
    assert len(rows) == 1 and rows[0]["labels"] == 4
    assert all(math.isfinite(rows[0][k]) for k in ("score_mean", "kl", "eval_kl", "win_rate"))
    assert all(math.isfinite(r["score_mean"]) for r in read_metrics(out / "ppo" / "metrics.csv"))


def test_loop_checks_every_size_and_its_ppo_settings_before_sampling(tmp_path):
    with pytest.raises(UserError, match="rm_max_length must be >= 16, got 8; set --rm-max-length to 16 or more"):
        _config(rm_max_length=8)
    with pytest.raises(UserError, match="labelers must be >= 1, got 0; set --labelers to 1 or more"):
        _config(labelers=0)
    ppo_file = tmp_path / "ppo.json"
    ppo_file.write_text(json.dumps({"num_minibatches": 0}))
    with pytest.raises(UserError, match="num_minibatches must be >= 1, got 0; set --num-minibatches"):
        run(_config(ppo_config=str(ppo_file)), tmp_path / "loop")
    assert not (tmp_path / "loop" / "start_responses.jsonl").exists()
