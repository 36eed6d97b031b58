"""The GPU reward-model recipe's code path (docs/scaling.md, "A reward model on a GPU"; issue 38, item 3), on a
tiny random decoder instead of a hub backbone of 0.5-1B parameters.

A hub decoder arrives as a causal LM (no sequence-classification head) whose tokenizer often has no pad token, or
one that is its EOS. `rm train --model DIR` must give it a fresh scalar head, a pad token, right padding and the
pad id in its config, and save a directory that plain transformers scores the same whether a text is batched with
longer ones or alone: the head reads the last token that is not padding.
"""

from __future__ import annotations

import json

import pytest
import torch

from wprlhf.data import Comparison, write_comparisons

# Hand-made comparisons, 12 prompts: the better story of each is the longer, kinder one, in alternating positions.
STORIES = [
    ("cat", "The cat sailed home at dawn and shared the fish with every gull on the pier.", "Cat. Fish. Gone."),
    ("ship", "The old ship hummed as the crew mended her sails under a kind, slow moon.", "Ship sank. The end."),
    ("moon", "The moon wrote letters to the tide, and the tide, at last, wrote back.", "Moon was there."),
    ("robot", "The robot learned to bake bread and left a warm loaf at each neighbour's door.", "Beep."),
    ("storm", "After the storm the village gathered to rebuild the bridge, singing as they worked.", "Rain."),
    ("clock", "The clockmaker fixed time itself, one patient gear at a time, and smiled.", "Tick tock."),
]
PAIRS = [Comparison(f"Write a story about a {topic}, take {i}.", [good, bad] if i % 2 else [bad, good],
                    0 if i % 2 else 1, prompt_id=f"{topic}-{i}")
         for i in range(2) for topic, good, bad in STORIES]  # fmt: skip


@pytest.fixture(scope="module")
def hub_decoder(tmp_path_factory):
    """A save_pretrained directory shaped like a hub decoder (Qwen2.5's architecture, 2 layers of 32): a causal LM
    with no sequence-classification head, its weights in bf16 as Qwen2.5 ships them, and the SmolLM2 tokenizer with
    its pad token removed."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from wprlhf.models import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.pad_token = None  # as GPT-2 and Llama tokenizers ship (SmolLM2's own pad is its EOS)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("decoder") / "lm"
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    return path


@pytest.fixture(scope="module")
def runs(hub_decoder, tmp_path_factory):
    """`wprlhf rm train` on the decoder with the recipe's flags (bf16 autocast, one window) at a toy size on the
    CPU, with and without --gradient-checkpointing: {checkpointing: (output directory, exit status, forwards of
    the first decoder layer with autograd on)}. Validation and scoring run without autograd and are not counted."""
    from wprlhf.cli import main
    from wprlhf.rewards import reward_model

    root = tmp_path_factory.mktemp("rm")
    write_comparisons(root / "pairs.jsonl", PAIRS)
    fresh_head, result = reward_model.fresh_head, {}
    for checkpointed in (True, False):
        calls = []

        def counting_head(*args, **kwargs):
            model, tokenizer = fresh_head(*args, **kwargs)
            # The layer's first module, before it runs: transformers checkpoints a layer's forward (inside the
            # layer's own hooks), and torch stops a recompute once it has what the backward needs.
            first = model.model.layers[0].input_layernorm
            first.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
            return model, tokenizer

        out = root / f"model-{checkpointed}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reward_model, "fresh_head", counting_head)
            code = main(["rm", "train", "--model", str(hub_decoder), "--data", str(root / "pairs.jsonl"), "--out",
                         str(out), "--device", "cpu", "--mixed-precision", "bf16", "--max-length", "48",
                         "--window-words", "0", "--max-examples", "0", "--batch-size", "4", "--epochs", "2",
                         "--lr", "1e-3", "--val-fraction", "0.25", "--eval-every", "2", "--normalize-samples", "8",
                         *(["--gradient-checkpointing"] if checkpointed else [])])  # fmt: skip
        result[checkpointed] = out, code, sum(calls)
    return result


@pytest.fixture(scope="module")
def trained(runs):
    """The recipe's run: (output directory, exit status), trained with gradient checkpointing."""
    return runs[True][:2]


def test_rm_train_on_a_hub_shaped_decoder_saves_a_plain_transformers_reward_model(trained):
    """The output loads with AutoModelForSequenceClassification / AutoTokenizer alone: a Qwen2 sequence classifier
    with one output, a pad id in its config that is the tokenizer's, right padding; held-out numbers are finite."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, code = trained
    assert code == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.config.num_labels == 1
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # a distinct pad (models.PAD_CANDIDATES)
    assert tokenizer.padding_side == "right"
    # fp32 weights trained under bf16 autocast, not the bf16 the checkpoint came in (AdamW would round updates away)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["mixed_precision"] == "bf16" and saved["gradient_checkpointing"] is True
    held_out = json.loads((out / "eval-heldout.json").read_text())
    assert held_out["n"] >= 1 and 0 <= held_out["accuracy"] <= 1 and torch.isfinite(torch.tensor(held_out["loss"]))


def test_the_trained_decoder_scores_a_padded_batch_as_each_text_alone(trained):
    """Plain transformers, the saved tokenizer's padding: texts of different lengths in one batch get the scores
    each gets alone (the head reads each row's last real token, not a pad), and every score is finite."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from wprlhf.rewards.reward_model import load_reward_model, score

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [c.prompt for c in PAIRS[:3] for _ in c.responses]
    responses = [r for c in PAIRS[:3] for r in c.responses]
    with torch.no_grad():
        batch = tokenizer(prompts, responses, padding=True, return_tensors="pt")
        assert (batch["attention_mask"] == 0).any()  # the batch is padded
        batched = model(**batch).logits.squeeze(-1)
        alone = torch.cat([model(**tokenizer(p, r, return_tensors="pt")).logits.squeeze(-1)
                           for p, r in zip(prompts, responses)])  # fmt: skip
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert batched.std() > 0  # the scores differ between texts: no constant head hides a padding error
    # wprlhf's own scoring is plain transformers' less the offset a bias-free head keeps (fold_normalization).
    ours = score(*load_reward_model(out), prompts, responses, max_length=48)
    torch.testing.assert_close(ours, batched - model.config.reward_offset, atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_update(runs):
    """With --gradient-checkpointing the layers run twice a training forward (once more in the backward pass), and
    the run is the same: every step's loss and the saved weights agree with the run that kept its activations."""
    from safetensors.torch import load_file

    from wprlhf.metrics import read_metrics

    (with_dir, with_code, with_calls), (without_dir, without_code, without_calls) = runs[True], runs[False]
    assert with_code == without_code == 0
    steps = len(read_metrics(without_dir / "metrics.csv"))
    assert without_calls == steps and with_calls == 2 * steps  # no silent no-op: the model trains in eval mode
    for a, b in zip(read_metrics(with_dir / "metrics.csv"), read_metrics(without_dir / "metrics.csv"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    saved = [load_file(d / "model.safetensors") for d in (with_dir, without_dir)]
    for name, weight in saved[0].items():
        torch.testing.assert_close(weight, saved[1][name], atol=1e-6, rtol=0)
