"""Reward models: the label types' losses against hand values, learning a separable toy set, normalisation folded
into the saved head, evaluation with a prompt bootstrap, baselines, `rm:DIR` as a PPO reward, and directories in
the format `rm train` has always written scoring as plain transformers does."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import learned, seed
from wprlhf.core import bootstrap_ci
from wprlhf.data import Comparison, split_by_prompt, write_comparisons
from wprlhf.files import write_json_atomic
from wprlhf.metrics import read_metrics
from wprlhf.rewards.reward_model import (
    BestOfK,
    Pairwise,
    RewardConfig,
    choice_credit,
    comparison_label,
    evaluate,
    load_reward_model,
    longer_wins,
    reward_fn_from_model,
    run_eval,
    score,
    story_windows,
    tfidf_logreg,
    train,
)


def strict_json(text: str):
    """json.loads as a strict parser (JavaScript's JSON.parse, jq) reads it: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_pairwise_loss_is_bradley_terry():
    """k = 2: -log sigmoid(r_best - r_other). Scores (1, 0), best 0 -> log(1 + e^-1) = 0.31326."""
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    best = torch.tensor([0, 1])
    loss, credit = Pairwise().loss(scores, best)
    # row 0: log(1+e^-1) = 0.313262; row 1: log(1+e^1) = 1.313262; mean 0.813262
    assert float(loss) == pytest.approx(0.813262, abs=1e-5)
    assert credit.tolist() == [1.0, 0.0]
    # a tie: target 1/2, -(log sigmoid(1) + log sigmoid(-1)) / 2 = (0.313262 + 1.313262) / 2; no credit
    loss, credit = Pairwise().loss(scores[:1], best[:1], torch.tensor([True]))
    assert float(loss) == pytest.approx(0.813262, abs=1e-5) and credit.numel() == 0


def test_a_comparison_of_strength_s_counts_as_s_copies_in_the_loss():
    """Weights 3 and 1 on rows of loss log(1+e^-2) = 0.126928 and log(1+e^1) = 1.313262:
    (3 x 0.126928 + 1.313262) / 4 = 0.423512, against the plain mean 0.720095; BestOfK weighs the same way."""
    scores, best, weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor([3.0, 1.0])
    assert float(Pairwise().loss(scores, best)[0]) == pytest.approx(0.720095, abs=1e-5)
    assert float(Pairwise().loss(scores, best, None, weight)[0]) == pytest.approx(0.423512, abs=1e-5)
    valid = torch.ones(2, 2, dtype=torch.bool)
    assert float(BestOfK().loss(scores, best, valid, None, weight)[0]) == pytest.approx(0.423512, abs=1e-5)
    # through a batch: the label type reads each comparison's strength only when weighted
    batch = [Comparison("p", ["a", "b"], 0, strength=3.0), Comparison("p", ["c", "d"], 0)]
    table = {("p", "a"): 2.0, ("p", "b"): 0.0, ("p", "c"): 0.0, ("p", "d"): 1.0}
    forward = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    assert float(Pairwise(weighted=True).batch_loss(forward, batch)[0]) == pytest.approx(0.423512, abs=1e-5)
    assert float(Pairwise().batch_loss(forward, batch)[0]) == pytest.approx(0.720095, abs=1e-5)


def test_best_of_k_at_k_2_is_pairwise():
    """Two label types, one likelihood: softmax over two scores is Bradley-Terry, ties included."""
    torch.manual_seed(0)
    scores = torch.randn(6, 2, dtype=torch.float64) * 3
    best = torch.tensor([0, 1, 1, 0, 1, 0])
    tie = torch.tensor([False, False, True, False, True, False])
    pair_loss, pair_credit = Pairwise().loss(scores, best, tie)
    k_loss, k_credit = BestOfK().loss(scores, best, torch.ones(6, 2, dtype=torch.bool), tie)
    assert float(pair_loss) == pytest.approx(float(k_loss), abs=1e-12)
    assert pair_credit.tolist() == k_credit.tolist() and len(pair_credit) == 4
    pairs = [Comparison("p", ["a", "b"], 0), Comparison("q", ["c", "d"], 1)]
    assert isinstance(comparison_label(pairs), Pairwise)
    assert isinstance(comparison_label(pairs + [Comparison("r", ["e", "f", "g"], 2)]), BestOfK)


def test_best_of_k_loss_and_padding_and_ties():
    """k = 3 padded to 4: softmax over the valid scores only; a tie's target is uniform."""
    scores = torch.tensor([[2.0, 0.0, 0.0, 99.0], [0.5, 0.5, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    best = torch.tensor([0, 0])
    tie = torch.tensor([False, True])
    loss, credit = BestOfK().loss(scores, best, valid, tie)
    # row 0: -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) = log(1.270671) = 0.239545; row 1 (tie, equal scores): log 2
    assert float(loss) == pytest.approx((0.239545 + 0.693147) / 2, abs=1e-5)
    assert credit.tolist() == [1.0]  # the tie is left out of accuracy


def test_choice_credit_by_hand():
    """The one tie rule: the best response alone on top 1, sharing the top with m others 1/(m+1), else 0."""
    scores = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [5.0, 5.0, 5.0], [4.0, 4.0, 1.0],
                           [0.0, 0.0, 9.0], [float("nan"), 1.0, 0.0]])  # fmt: skip
    valid = torch.tensor([[True, True, False]] * 3 + [[True] * 3] * 2 + [[True, True, False], [True, True, True]])
    best = torch.tensor([0, 0, 0, 2, 2, 0, 1])
    credit = choice_credit(scores, best, valid)
    # tie of 2; alone on top; beaten; tie of 3; beaten by two tied; the 9 is padding, a tie of 2; NaN never on top
    torch.testing.assert_close(credit, torch.tensor([0.5, 1.0, 0.0, 1 / 3, 0.0, 0.5, 1.0]))
    # the loss's credit is the same, over the rows that are not labelled ties
    tie = torch.tensor([False, False, False, True])
    _, credit = BestOfK().loss(scores[:4], best[:4], valid[:4], tie)
    torch.testing.assert_close(credit, torch.tensor([0.5, 1.0, 0.0]))


def _mixed_comparisons() -> list[Comparison]:
    """Word counts give the hand-computed credits 1/2, 1, 1/3, 0, 1/2 (and a labelled tie, left out): mean 7/15."""
    return [
        Comparison("p0", ["a b", "c d"], 1, prompt_id="0"),  # equal lengths: 1/2
        Comparison("p1", ["a", "b c"], 1, prompt_id="1"),  # longer: 1
        Comparison("p2", ["a", "b", "c"], 2, prompt_id="2"),  # three equal: 1/3
        Comparison("p3", ["x y", "z"], 1, prompt_id="3"),  # shorter: 0
        Comparison("p4", ["a b c", "d", "e f g"], 0, prompt_id="4"),  # ties with the third: 1/2
        Comparison("p5", ["a b c", "d"], 1, tie=True, prompt_id="5"),  # labelled tie: no right answer
    ]


def test_baselines_and_evaluate_count_ties_by_the_same_rule(monkeypatch):
    mixed = _mixed_comparisons()
    assert longer_wins(mixed) == pytest.approx(7 / 15)
    # evaluate with a stand-in reward model whose score is the word count: the same credits
    import wprlhf.rewards.reward_model as rm

    monkeypatch.setattr(rm, "score", lambda model, tok, prompts, responses, *args, **kw: torch.tensor(
        [float(len(r.split())) for r in responses]))  # fmt: skip
    result = evaluate(None, None, mixed, max_length=32)
    assert result["accuracy"] == pytest.approx(7 / 15) and result["n"] == 5 and result["ties"] == 1
    assert evaluate(None, None, mixed[5:], max_length=32).keys() == {"n", "ties", "loss"}  # only a tie: no accuracy
    assert evaluate(None, None, [], max_length=32) == {"n": 0, "ties": 0}


def _identical_pairs(n: int, start: int = 0) -> list[Comparison]:
    """Both responses the same text, A labelled the better: no scorer can be right, so every accuracy is 1/2."""
    subjects = ["cat", "ship", "storm", "clock", "garden", "robot", "dragon", "river"]
    out = []
    for i in range(start, start + n):
        story = f"a story about the {subjects[i % len(subjects)]} and the {subjects[(i * 3 + 1) % len(subjects)]}"
        out.append(Comparison(f"Write about thing {i}", [story, story], 0, labeler="toy", prompt_id=str(i)))
    return out


@pytest.mark.learning
def test_identical_responses_score_one_half_everywhere(tmp_path, capsys):
    """The issue's 40 identical pairs: training said 1.0 at loss ln 2, eval 0.0, the baselines 1.0 (argmax picks
    index 0 on a tie). Now every number is exactly 1/2, and every file written parses as strict JSON."""
    from wprlhf.cli import main

    data = tmp_path / "same.jsonl"
    write_comparisons(data, _identical_pairs(40))
    config = RewardConfig(data=str(data), model="tiny", max_length=32, epochs=1, batch_size=8, lr=1e-3,
                          val_fraction=0.25, eval_every=1, normalize_samples=20)  # fmt: skip
    held_out = train(config, tmp_path / "model", progress=False)
    rows = read_metrics(tmp_path / "model" / "metrics.csv")
    assert rows and all(r["accuracy"] == 0.5 and r["val_accuracy"] == 0.5 for r in rows)
    assert all(r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in rows)
    assert held_out["accuracy"] == 0.5 and held_out["n"] == 10
    assert held_out["baselines"] == {"always_first": 1.0, "majority_position": 1.0, "longer_wins": 0.5, "tfidf_logreg": 0.5}
    assert strict_json((tmp_path / "model" / "eval-heldout.json").read_text()) == held_out
    strict_json((tmp_path / "model" / "train_config.json").read_text())

    test = tmp_path / "test.jsonl"
    write_comparisons(test, _identical_pairs(12, start=40))
    capsys.readouterr()
    assert main(["rm", "eval", "--model", str(tmp_path / "model"), "--data", str(test)]) == 0
    printed = strict_json(capsys.readouterr().out)
    assert printed["accuracy"] == printed["accuracy_raw"] == 0.5 and printed["n"] == 12
    assert printed["baselines"] == {"always_first": 1.0, "majority_position": 1.0, "longer_wins": 0.5, "tfidf_logreg": 0.5}
    assert strict_json((tmp_path / "model" / "eval-test.json").read_text()) == printed


def test_bootstrap_ci_resamples_prompts():
    """All pairs of a prompt move together: one prompt all right, one all wrong -> CI spans 0..1."""
    lo, hi = bootstrap_ci([True] * 10 + [False] * 10, ["a"] * 10 + ["b"] * 10, n_boot=500)
    assert lo == 0.0 and hi == 1.0
    lo, hi = bootstrap_ci([True] * 20, [str(i) for i in range(20)], n_boot=200)
    assert lo == hi == 1.0


def test_longer_wins_baseline():
    pairs = [Comparison("p", ["short", "a much longer story"], 1), Comparison("p", ["long long long", "x"], 1)]
    assert longer_wins(pairs) == 0.5


def _toy_comparisons(n: int) -> list[Comparison]:
    """Separable: the response praising the prompt's subject always wins."""
    subjects = ["cat", "ship", "storm", "clock", "garden", "robot", "dragon", "river", "moon", "lamp"]
    out = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        good, bad = f"a good good good story about the {s}", f"bad bad bad {s} words"
        pair = [good, bad] if i % 2 else [bad, good]
        out.append(Comparison(f"Write about a {s} number {i}", pair, 0 if i % 2 else 1, labeler="toy", prompt_id=str(i)))
    return out


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    data = out / "train.jsonl"
    write_comparisons(data, _toy_comparisons(120))
    config = RewardConfig(data=str(data), model="tiny", max_length=32, epochs=3, batch_size=8, lr=3e-3,
                          val_fraction=0.2, eval_every=10, normalize_samples=100, warmup_ratio=0.1,
                          seed=seed(0))  # fmt: skip
    result = train(config, out / "model", progress=False)
    return out, result


@pytest.mark.learning
def test_reward_model_learns_separable_toy_set(toy_rm):
    out, result = toy_rm
    learned("held-out error rate (all pairs right)", 1 - result["accuracy"], 1e-9, upper=True)
    assert result["n"] >= 20
    rows = (out / "model" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,examples,loss")
    assert len(rows) - 1 == math.ceil(96 / 8) * 3  # one row per optimizer step


@pytest.mark.learning
def test_normalisation_is_folded_into_the_saved_head(toy_rm):
    """Plain transformers gives normalised rewards: mean ~0, std ~1 over the training responses."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = toy_rm
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    toy = _toy_comparisons(120)
    prompts = [c.prompt for c in toy for _ in c.responses]
    responses = [r for c in toy for r in c.responses]
    with torch.no_grad():
        enc = tokenizer(prompts, responses, truncation=True, max_length=32, padding=True, return_tensors="pt")
        plain = model(**enc).logits.squeeze(-1) - model.config.reward_offset
    learned("|mean| of normalised rewards", abs(float(plain.mean())), 0.3, upper=True)
    learned("|std - 1| of normalised rewards", abs(float(plain.std()) - 1.0), 0.3, upper=True)
    ours = score(*load_reward_model(out / "model"), prompts, responses, max_length=32)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=0)


@pytest.mark.learning
def test_rm_reward_spec_scores_in_ppo_shape(toy_rm):
    from wprlhf.rewards.spec import load_reward

    out, _ = toy_rm
    reward_fn = load_reward(f"rm:{out / 'model'}")
    scores = reward_fn(["Write about a cat", "Write about a cat"], ["a good good good story about the cat", "bad bad"])
    assert len(scores) == 2
    learned("reward gap, good story - bad", scores[0] - scores[1], 0)


@pytest.mark.learning
def test_rm_eval_cli_writes_eval_json(toy_rm, tmp_path, capsys):
    from wprlhf.cli import main

    out, _ = toy_rm
    test = tmp_path / "test.jsonl"
    write_comparisons(test, _toy_comparisons(30))
    assert main(["rm", "eval", "--model", str(out / "model"), "--data", str(test)]) == 0
    result = strict_json((out / "model" / "eval-test.json").read_text())
    assert set(result) >= {"accuracy", "n", "ci95", "clean", "baselines"}
    learned("test error rate (all pairs right)", 1 - result["accuracy"], 1e-9, upper=True)
    assert result["n"] == 30
    assert set(result["baselines"]) == {"always_first", "majority_position", "longer_wins", "tfidf_logreg"}
    assert 0 <= result["baselines"]["tfidf_logreg"] <= 1


@pytest.mark.learning
def test_rm_eval_of_nothing_to_score_is_an_error_not_nan(toy_rm, tmp_path, capsys):
    """A header-only file, or one of labelled ties only, has no accuracy: exit 2 naming the file, no JSON with
    NaN (which strict parsers reject)."""
    from wprlhf.cli import main

    out, _ = toy_rm
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,response_a,response_b,label\n")
    ties = tmp_path / "ties.jsonl"
    write_comparisons(ties, [Comparison(f"p{i}", ["one story", "another one"], 0, tie=True) for i in range(3)])
    for path, message in ((empty, "holds no comparisons"), (ties, "are all ties (3)")):
        code = main(["rm", "eval", "--model", str(out / "model"), "--data", str(path), "--out",
                     str(tmp_path / "e.json")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and str(path) in err and message in err and "Traceback" not in err
        assert not (tmp_path / "e.json").exists()
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic(tmp_path / "nan.json", {"accuracy": float("nan")})
    assert not (tmp_path / "nan.json").exists()
    assert tfidf_logreg([], _mixed_comparisons()) is None and longer_wins(_mixed_comparisons()[5:]) is None


def test_rm_train_refuses_bad_input(tmp_path, capsys):
    from wprlhf.cli import main

    assert main(["rm", "train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["rm", "eval", "--model", str(tmp_path / "nomodel"), "--data", "x.jsonl"]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.learning
def test_best_of_balanced_accuracy(toy_rm, tmp_path, capsys):
    """`rm eval --best-of`: top-karma story vs one other per prompt; the toy RM ranks 'good' stories first."""
    from wprlhf.cli import main

    out, _ = toy_rm
    rows = ["prompt_id,prompt,response_id,response,response_score,response_rank"]
    for i, s in enumerate(["cat", "ship", "storm", "clock", "garden", "robot"]):
        rows.append(f"p{i},Write about a {s},p{i}_r0,a good good good story about the {s},500,0")
        rows.append(f"p{i},Write about a {s},p{i}_r1,bad bad bad {s} words,3,1")
    data = tmp_path / "responses.csv"
    data.write_text("\n".join(rows) + "\n")
    assert main(["rm", "eval", "--model", str(out / "model"), "--data", str(data), "--best-of",
                 "--out", str(tmp_path / "b.json")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["n"] == 12
    learned("best-of balanced error rate (all right)", 1 - result["balanced_accuracy"], 1e-9, upper=True)


def test_story_windows_split_by_words_and_fold_a_short_tail():
    assert story_windows("a b c d e f g", 3) == ["a b c", "d e f g"]  # "g" alone (under 3 / 2 words) joins the last
    assert story_windows("a b c d e f g h", 3) == ["a b c", "d e f", "g h"]
    assert story_windows("a  b\nc", 3) == ["a  b\nc"]  # short: the text as it is
    assert story_windows("a b c d", 0) == ["a b c d"]


def _ending_comparisons(n: int) -> list[Comparison]:
    """Two stories per prompt, the same 20 filler words, told apart only by their last three words."""
    words = ["the", "old", "house", "stood", "near", "a", "quiet", "road", "where", "rain", "fell", "on"]
    out = []
    for i in range(n):
        filler = " ".join(words[(i + j) % len(words)] for j in range(20))
        good, bad = f"{filler} good good good", f"{filler} bad bad bad"
        pair = [good, bad] if i % 2 else [bad, good]
        out.append(Comparison(f"Story {i}", pair, 0 if i % 2 else 1, labeler="toy", prompt_id=str(i)))
    return out


@pytest.mark.learning
def test_windows_let_a_short_reward_model_read_a_story_to_its_end(tmp_path):
    """At max_length 16 the stories' endings are cut off: only scoring every 6-word window (and training on
    random windows) lets the model see what tells the pair apart."""
    data = tmp_path / "train.jsonl"
    write_comparisons(data, _ending_comparisons(120))
    config = RewardConfig(data=str(data), model="tiny", max_length=16, window_words=6, epochs=6, batch_size=8,
                          lr=3e-3, val_fraction=0.2, normalize_samples=100, warmup_ratio=0.1, seed=seed(0))  # fmt: skip
    result = train(config, tmp_path / "model", progress=False)
    learned("held-out error rate", 1 - result["accuracy"], 0.1 + 1e-9, upper=True)
    # The validation curve reads whole stories as `rm eval` does (it used to score only the opening: a tie here),
    # so its last point is the held-out accuracy, and `rm eval` on the validation comparisons says the same.
    rows = read_metrics(tmp_path / "model" / "metrics.csv")
    assert rows[-1]["val_accuracy"] == result["accuracy"]
    _, val_set = split_by_prompt(_ending_comparisons(120), 0.2, seed=seed(0))  # train's split (config.seed)
    write_comparisons(tmp_path / "val.jsonl", val_set)
    evaluated = run_eval(tmp_path / "model", str(tmp_path / "val.jsonl"), progress=False)
    assert evaluated["accuracy"] == result["accuracy"] and evaluated["n"] == result["n"]
    model, tokenizer = load_reward_model(tmp_path / "model")
    assert model.config.reward_window_words == 6  # saved with the model: every scorer reads whole stories
    held_out = _ending_comparisons(140)[120:]
    windows = score(model, tokenizer, ["Story 0"], [held_out[0].responses[0]], max_length=16)
    by_hand = score(model.__class__.from_pretrained(tmp_path / "model", reward_window_words=0), tokenizer,
                    ["Story 0"] * 4, story_windows(held_out[0].responses[0], 6), max_length=16)  # fmt: skip
    torch.testing.assert_close(windows, by_hand.mean().reshape(1), atol=1e-5, rtol=0)
    model.config.reward_window_words = 0  # the opening alone: both stories of a pair look the same, a tie
    assert evaluate(model, tokenizer, held_out, max_length=16)["accuracy"] == 0.5


def test_a_directory_in_the_format_rm_train_writes_scores_as_plain_transformers_does(tmp_path):
    """A reward-model directory as `rm train` has always saved one (before and after the trainer became one with
    the classifier's, issue 17): a plain transformers model whose config holds reward_window_words and
    reward_offset, its tokenizer, and train_config.json with max_length. Built by hand here, it scores as a slow
    reference reads it: each window alone, cut at the saved max_length, less the offset, averaged per story."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from wprlhf.models import load_reward_backbone

    model, tokenizer = load_reward_backbone("tiny", num_labels=1, seed=3)  # a head without bias: the offset counts
    model.config.reward_window_words = 6
    model.config.reward_offset = 0.25
    model.config.reward_normalization = {"mean": 0.1, "std": 2.0}
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "train_config.json").write_text(json.dumps({"model": "tiny", "max_length": 12, "window_words": 6}))
    first = "unbelievably extraordinary circumstances notwithstanding, everybody kept"
    second = "remarkably calm throughout while the lighthouse keeper"  # 6 words + a last one, too short alone
    prompts = ["Write about a storm", "Write about a cat", ""]
    responses = [f"{first} {second}", "a short one", "x y"]
    windows = [[first, second], ["a short one"], ["x y"]]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(plain_tokenizer(prompts[0], first)["input_ids"]) > 12  # the saved max_length cuts this window
    expected = []
    with torch.no_grad():
        for prompt, pieces in zip(prompts, windows):
            encoded = [plain_tokenizer(prompt, w, truncation="longest_first", max_length=12, return_tensors="pt")
                       for w in pieces]  # fmt: skip
            expected.append(sum(float(plain(**e).logits) - 0.25 for e in encoded) / len(encoded))
    assert reward_fn_from_model(tmp_path)(prompts, responses) == pytest.approx(expected, abs=1e-5)
    model, tokenizer = load_reward_model(tmp_path)
    assert score(model, tokenizer, prompts, responses, max_length=12).tolist() == pytest.approx(expected, abs=1e-5)
