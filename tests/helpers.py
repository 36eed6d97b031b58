"""Small helpers shared by tests (import as `from tests.helpers import close, mask_of, t`)."""

import torch


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(actual, expected, atol=1e-6):
    """Assert a tensor (or number) equals nested literals, compared in float64 with a small absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def save_tiny_classifier(path):
    """An untrained tiny two-label BERT with the MiniLM tokenizer, saved as `wprlhf classifier train` saves one:
    its log-odds are arbitrary but fixed, which is all the wiring tests need. Returns path."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from wprlhf.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head large enough that log-odds differ clearly between texts
        model.classifier.weight.mul_(50)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "train_config.json").write_text(json.dumps({"max_length": 64}))
    return path


def assert_same_runs(whole, split, steps: int) -> None:
    """A run in one go (directory `whole`) and one killed and resumed (`split`): the same metrics row for row (but
    times) and the same final policy weights."""
    import pytest
    from safetensors.torch import load_file

    from wprlhf.metrics import read_metrics

    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_split] == list(range(1, steps + 1))
    skip = {"time_generate", "time_score", "time_train", "episodes_per_s", "elapsed_s"}
    for a, b in zip(rows_whole, rows_split):
        for key in a.keys() - skip:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    wa, wb = (load_file(run / "policy" / "model.safetensors") for run in (whole, split))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def toy_comparisons(n: int):
    """n pairs on prompts about cats or ships, the better one alternating between A and B."""
    from wprlhf.data import Comparison

    return [Comparison(prompt=f"prompt {i} about {'cats' if i % 2 else 'ships'}",
                       responses=[f"a tale of {i} words " * (1 + i % 3), f"short {i}"], best=i % 2)
            for i in range(n)]  # fmt: skip
