"""The sentiment classifier: training on a toy set, evaluation and baselines, log-odds as a reward, head + tail
truncation, the CLI, and every bad input with its message. A tiny random BERT with MiniLM's tokenizer (seconds)."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

from tests.helpers import learned, seed
from wprlhf.cli import main
from wprlhf.errors import UserError
from wprlhf.metrics import CLASSIFIER_METRIC_NAMES, read_metrics
from wprlhf.rewards.classifier import (
    ClassifierConfig,
    binary_f1,
    encode,
    evaluate,
    load_classifier,
    load_labelled,
    log_odds,
    log_odds_reward,
    polarity_accuracy,
    run_eval,
    sign_credit,
    tfidf_logreg,
    train,
)
from wprlhf.rewards.judges import sentiment

GOOD = ["great", "wonderful", "superb", "delightful", "brilliant", "moving", "charming", "excellent"]
BAD = ["awful", "boring", "dreadful", "terrible", "tedious", "clumsy", "dull", "horrible"]
FILLER = ["the", "film", "plot", "cast", "was", "quite", "and", "really", "story", "acting"]


def toy_reviews(n: int, seed: int) -> list[tuple[str, int]]:
    """Short texts whose label is which word list they draw two words from: separable by a bag of words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(GOOD if label else BAD, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def strict_json(text: str):
    """json.loads as a strict parser (JavaScript's JSON.parse, jq) reads it: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def save_tiny_encoder(path, init_seed: int = 0):
    """A random 2-layer BERT (hidden 32, weights from `init_seed`) with the embedded MiniLM tokenizer, saved like a
    hub model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from wprlhf.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(init_seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), init_seed=seed(0))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_csv(folder / "train.csv", toy_reviews(64, seed=1))
    write_csv(folder / "test.csv", toy_reviews(24, seed=2))
    return folder


# lr and epochs far above fine-tuning's: a random tiny encoder has to learn the words from scratch.
TOY = {"max_length": 32, "epochs": 8, "batch_size": 8, "lr": 3e-3, "val_fraction": 0.25, "eval_every": 10,
       "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def trained(encoder, toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    config = ClassifierConfig(data=str(toy), model=str(encoder), seed=seed(0), **TOY)
    result = train(config, out, polarity=sentiment, progress=False)
    return out, result


@pytest.mark.learning
def test_training_learns_a_separable_toy_set(trained, encoder, toy):
    out, held_out = trained
    model, tokenizer = load_classifier(encoder)  # the untrained encoder with a fresh head
    texts, labels = load_labelled(toy / "test.csv")
    before = float(((log_odds(model, tokenizer, texts, 32) > 0).long() == torch.tensor(labels)).float().mean())
    after = run_eval(out, str(toy / "test.csv"), progress=False)["accuracy"]
    learned("test-set error rate", 1 - after, 0.1 + 1e-9, upper=True)
    learned("test accuracy gain over the untrained encoder", after - before, 0.2)
    learned("held-out error rate", 1 - held_out["accuracy"], 0.1 + 1e-9, upper=True)
    assert held_out["n"] == 16
    rows = read_metrics(out / "metrics.csv")
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",") == list(CLASSIFIER_METRIC_NAMES)
    assert len(rows) == 8 * 48 // 8 and rows[-1]["examples"] == 8 * 48
    learned("last validation-curve error rate", 1 - rows[-1]["val_accuracy"], 0.1 + 1e-9, upper=True)
    learned("training loss drop, first to last step", rows[0]["loss"] - rows[-1]["loss"], 0)
    # The curve's last point is the held-out evaluation of the same model: one function reads the texts for both.
    assert rows[-1]["val_accuracy"] == held_out["accuracy"] and rows[-1]["val_loss"] == held_out["loss"]
    assert strict_json((out / "eval-heldout.json").read_text())["accuracy"] == held_out["accuracy"]


@pytest.mark.learning
def test_saved_model_loads_in_plain_transformers(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.num_labels == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model.eval()(**tokenizer(["wonderful superb film", "dreadful tedious film"], return_tensors="pt",
                                      padding=True)).logits  # fmt: skip
    log_odds_of = (logits[:, 1] - logits[:, 0]).detach()
    learned("log-odds of a positive text", float(log_odds_of[0]), 0)
    learned("minus log-odds of a negative text", -float(log_odds_of[1]), 0)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_length"] == 32 and saved["train_examples"] == 48 and saved["val_examples"] == 16


@pytest.mark.learning
def test_log_odds_reward_follows_the_label_and_scores_the_whole_review(trained):
    out, _ = trained
    reward_fn = log_odds_reward(out, device="cpu")
    scores = reward_fn(["the film was", "the film was", ""], ["wonderful and superb", "dreadful and tedious",
                                                              "the film was wonderful and superb"])  # fmt: skip
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    learned("log-odds reward of a positive review", scores[0], 0)
    learned("minus log-odds reward of a negative review", -scores[1], 0)
    assert scores[0] == pytest.approx(scores[2], abs=1e-5)  # opening + continuation read as one text
    # log-odds is logit_pos - logit_neg = log(p_pos / p_neg), batched or not
    model, tokenizer = load_classifier(out)
    with torch.no_grad():
        probs = torch.softmax(model(**encode(tokenizer, ["the film was dreadful and tedious"], 32)).logits, -1)[0]
    assert scores[1] == pytest.approx(float(torch.log(probs[1] / probs[0])), abs=1e-4)
    alone = [log_odds(model, tokenizer, [t], 32).item() for t in ["dull plot", "a charming and moving story"]]
    batched = log_odds(model, tokenizer, ["dull plot", "a charming and moving story"], 32).tolist()
    assert batched == pytest.approx(alone, abs=1e-5)


@pytest.mark.learning
def test_eval_json_keys_baselines_and_ci(trained, toy, tmp_path):
    out, _ = trained
    path = tmp_path / "eval.json"
    result = run_eval(out, str(toy / "test.csv"), path, polarity=sentiment, progress=False)
    saved = strict_json(path.read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["f1"] == result["f1"]
    assert {"accuracy", "f1", "n", "ci95", "baselines"} <= set(saved)
    assert saved["n"] == 24 and 0 <= saved["ci95"][0] <= saved["accuracy"] <= saved["ci95"][1] <= 1
    # VADER knows these words; TF-IDF was fit on the recorded training file
    assert saved["baselines"]["vader"] >= 0.9 and saved["baselines"]["tfidf_logreg"] >= 0.9
    small = run_eval(out, str(toy / "test.csv"), tmp_path / "small.json", max_examples=5, progress=False)
    assert small["n"] == 5 and "vader" not in small["baselines"]
    # a directory resolves to its test file; the default output sits in the model directory
    run_eval(out, str(toy), progress=False)
    assert (out / f"eval-{toy.name}.json").exists()


def test_f1_by_hand():
    assert binary_f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert binary_f1([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert binary_f1([0, 0], [0, 0]) == 0.0
    # a tie predicted 1/2: TP 1 + 0.5, FP 0.5, FN 0.5 -> 3 / (3 + 0.5 + 0.5)
    assert binary_f1([1, 0.5, 0.5], [1, 1, 0]) == pytest.approx(3 / 4)


def test_a_score_of_exactly_zero_counts_one_half(encoder, tmp_path):
    """The one tie rule for a sign: log-odds (or VADER's compound, or TF-IDF's decision) exactly 0 is a coin flip
    between the classes, 1/2, not 'negative'. A head of zeros gives every text log-odds 0."""
    credit = sign_credit(torch.tensor([2.0, 0.0, -1.0, 0.0, -3.0]), torch.tensor([1, 1, 1, 0, 0]))
    assert credit.tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    model, tokenizer = load_classifier(encoder)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    texts, labels = ["a good film", "a fine film", "a great film", "a bad film"], [1, 1, 1, 0]
    result = evaluate(model, tokenizer, texts, labels, max_length=32)
    assert result["accuracy"] == 0.5 and result["loss"] == pytest.approx(math.log(2))
    assert result["f1"] == pytest.approx(2 * 1.5 / (2 * 1.5 + 0.5 + 1.5))  # each text half positive
    no_words = lambda prompts, texts: [0.0 if "film" in t else 0.9 for t in texts]  # noqa: E731
    assert polarity_accuracy(no_words, texts + ["superb"], labels + [1]) == pytest.approx((4 * 0.5 + 1) / 5)
    assert polarity_accuracy(no_words, [], []) is None and tfidf_logreg(texts, [1] * 4, texts, labels) is None


def test_long_texts_keep_head_and_tail(encoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    words = [f"w{i}" for i in range(40)]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    batch = encode(tokenizer, [" ".join(words), "short"], max_length=18)
    assert batch["input_ids"].shape == (2, 18)
    row = batch["input_ids"][0].tolist()
    assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    # 16 tokens of budget: the first 4 and the last 12
    assert row[1:-1] == ids[:4] + ids[-12:]
    assert batch["attention_mask"][1].sum() == 3 and batch["attention_mask"][0].all()


def test_labels_and_html(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("Fine.<br /><br />Really fine", "1"), ("Bad", "0.0"), ("Meh", 0)])
    texts, labels = load_labelled(path)
    assert texts == ["Fine.\n\nReally fine", "Bad", "Meh"] and labels == [1, 0, 0]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "ok", "label": 1}\n{"text": "no", "label": 0}\n')
    assert load_labelled(jsonl) == (["ok", "no"], [1, 0])


@pytest.mark.parametrize("name, rows, header, message", [
    ("none.csv", None, None, "does not exist"),
    ("nolabel.csv", [("good", "1")], ("text", "sentiment"), "lacks column(s) label"),
    ("notext.csv", [("good", "1")], ("review", "label"), "lacks column(s) text"),
    ("three.csv", [("good", "1"), ("bad", "2")], ("text", "label"), "row 2 (line 3): label '2' is not 0 or 1"),
    ("words.csv", [("good", "pos")], ("text", "label"), "label 'pos' is not 0 or 1"),
    ("empty.csv", [], ("text", "label"), "holds no examples"),
    ("blank.csv", [("  ", "1")], ("text", "label"), "text is empty"),
])  # fmt: skip
def test_bad_data_fails_with_a_clear_message(tmp_path, name, rows, header, message):
    path = tmp_path / name
    if rows is not None:
        write_csv(path, rows, header)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labelled(path)


@pytest.mark.learning
def test_training_needs_both_labels_and_sane_settings(tmp_path, encoder):
    one = write_csv(tmp_path / "one.csv", [("good film", 1), ("great film", 1)])
    with pytest.raises(UserError, match="only label 1"):
        train(ClassifierConfig(data=str(one), model=str(encoder)), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="needs --data"):
        train(ClassifierConfig(model=str(encoder)), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="val_fraction"):
        ClassifierConfig(val_fraction=1.0)
    with pytest.raises(UserError, match="causal-LM backbones support num_labels=1 only"):
        train(ClassifierConfig(data=str(write_csv(tmp_path / "two.csv", [("a b", 1), ("c d", 0)])), model="tiny"),
              tmp_path / "out2", progress=False)  # fmt: skip
    with pytest.raises(UserError, match="has no config.json"):
        log_odds_reward(tmp_path / "nowhere")


@pytest.mark.learning
def test_cli_eval_of_an_empty_file_is_an_error(trained, tmp_path, capsys):
    out, _ = trained
    empty = write_csv(tmp_path / "empty.csv", [])
    code = main(["classifier", "eval", "--model", str(out), "--data", str(empty), "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert code == 2 and f"{empty} holds no examples" in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.learning
def test_cli_train_then_eval(tmp_path, encoder, toy, capsys):
    out = tmp_path / "clf"
    args = ["classifier", "train", "--data", toy / "train.csv", "--model", encoder, "--out", out, "--max-length", 32,
            "--epochs", 2, "--batch-size", 8, "--lr", 3e-3, "--max-examples", 24, "--val-fraction", 0.2]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert json.loads((out / "train_config.json").read_text())["train_examples"] == 24
    assert (out / "model.safetensors").exists() and (out / "eval-heldout.json").exists()
    assert main([str(a) for a in args]) == 2 and "is not empty" in capsys.readouterr().err
    assert main([str(a) for a in args + ["--force"]]) == 0
    capsys.readouterr()
    code = main(["classifier", "eval", "--model", str(out), "--data", str(toy / "test.csv"), "--out",
                 str(tmp_path / "e.json"), "--max-examples", "10"])  # fmt: skip
    assert code == 0
    printed = strict_json(capsys.readouterr().out)
    assert printed["n"] == 10 and set(printed["baselines"]) == {"majority_class", "vader", "tfidf_logreg"}
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 10


@pytest.mark.parametrize("argv, message", [
    (["classifier", "train", "--data", "{tmp}/missing.csv", "--out", "{tmp}/o"], "missing.csv does not exist"),
    (["classifier", "train", "--data", "{tmp}/bad.csv", "--out", "{tmp}/o"], "lacks column(s) label"),
    (["classifier", "train", "--out", "{tmp}/o"], "needs --data"),
    (["classifier", "eval", "--model", "{tmp}/nomodel", "--data", "{tmp}/bad.csv"], "has no config.json"),
])  # fmt: skip
def test_cli_errors_exit_2(tmp_path, capsys, argv, message):
    write_csv(tmp_path / "bad.csv", [("good", "1")], ("text", "stars"))
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_a_directory_in_the_format_classifier_train_writes_scores_as_plain_transformers_does(tmp_path, toy):
    """`tests.helpers.save_tiny_classifier` writes what `classifier train` has always saved (a two-label model
    with id2label, its tokenizer, train_config.json with max_length): the log-odds reward reads it as plain
    transformers does, text by text, and `classifier eval` evaluates it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.helpers import save_tiny_classifier

    path = save_tiny_classifier(tmp_path / "clf")
    prompts, responses = ["the film was", "", "a dull"], ["wonderful and superb", "dreadful tedious film", "plot"]
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["the film was wonderful and superb", "dreadful tedious film", "a dull plot"]  # the reviews read whole
    with torch.no_grad():
        logits = [plain(**plain_tokenizer(text, return_tensors="pt")).logits[0] for text in texts]
    expected = [float(pair[1] - pair[0]) for pair in logits]
    assert log_odds_reward(path, device="cpu")(prompts, responses) == pytest.approx(expected, abs=1e-5)
    result = run_eval(path, str(toy / "test.csv"), tmp_path / "eval.json", progress=False)
    assert result["n"] == 24 and result["max_length"] == 64 and 0 <= result["accuracy"] <= 1
