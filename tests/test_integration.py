"""The embedded SmolLM2-135M-Instruct end to end: loading from the GGUF cache, chat template, sampling, a PPO
step, and the real prompt data when ../shared/data is present. Slower than unit tests (tens of seconds)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import learned, seed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from wprlhf.models import load_policy

    return load_policy("smollm2")


def test_smollm2_tokenizer_and_config(smollm2):
    from wprlhf.models import stop_token_ids

    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token == "<empty_output>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)
    assert tokenizer.padding_side == "left"


def test_smollm2_writes_english_in_its_chat_turn(smollm2):
    from wprlhf.generation import GenerationConfig, decode_responses, encode_prompts, sample
    from wprlhf.models import stop_token_ids

    model, tokenizer = smollm2
    prompts = ["Write one sentence about the sea.", "[WP] The moon sends Earth a formal complaint."]
    queries, query_mask = encode_prompts(tokenizer, prompts)
    assert "<|im_start|>assistant" in tokenizer.decode(queries[0][query_mask[0]])
    config = GenerationConfig(max_new_tokens=48, greedy=True)
    gen = sample(model, queries, query_mask, config, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    texts = decode_responses(tokenizer, gen.responses, gen.response_mask)
    words = " ".join(texts).lower().split()
    assert len(words) > 10 and sum(w in ("the", "a", "of", "and", "to") for w in words) >= 2, texts
    # A finished row's mask ends on its stop token; every later position is padding.
    for row in range(2):
        n = int(gen.response_mask[row].sum())
        if gen.finished[row]:
            assert int(gen.responses[row, n - 1]) in stop_token_ids(tokenizer)
            assert (gen.responses[row, n:] == tokenizer.pad_token_id).all()


@pytest.mark.learning
def test_smollm2_ppo_step(smollm2, tmp_path):
    """Two PPO steps on the real model: finite losses, a KL under half the run's kl_target, the policy saved and
    reloadable."""
    from transformers import AutoModelForCausalLM

    from wprlhf.methods.ppo import PPOConfig, train
    from wprlhf.metrics import read_metrics
    from wprlhf.rewards.spec import length

    model, tokenizer = smollm2
    config = PPOConfig(policy="smollm2", steps=2, batch_size=2, num_minibatches=1, ppo_epochs=1, response_length=12,
                       log_samples=0, seed=seed(0))  # fmt: skip
    train(config, ["Tell a story about a fox.", "Describe a storm at sea."], length, tmp_path / "run",
          policy=model, tokenizer=tokenizer, progress=False)  # fmt: skip
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(r["value_loss"])) for r in rows)
    learned("max |KL| over 2 steps (nats)", max(abs(r["kl"]) for r in rows), config.kl_target / 2, upper=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    assert reloaded.config.num_hidden_layers == 30


def test_real_fan_prompts_load(shared_data):
    from wprlhf.data import load_prompts

    prompts = load_prompts(shared_data / "writing_prompts" / "fan_prompts.csv")
    assert len(prompts) == 600 and sum(p.startswith("[WP]") for p in prompts) >= 500  # tags normalised
