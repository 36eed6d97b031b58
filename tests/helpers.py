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
