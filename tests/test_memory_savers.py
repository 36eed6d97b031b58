"""Memory savers as PPO options on the tiny model: LoRA (reference = adapters off, one copy of the base weights)
learns, resumes and exports a plain model; gradient checkpointing gives the same update; bf16 autocast runs;
8-bit AdamW where bitsandbytes is installed."""

from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch

from tests.test_ppo import LEARNING, PROMPTS, _first_last, _one_update
from wprlhf.metrics import read_metrics
from wprlhf.models import load_policy
from wprlhf.ppo import PPOConfig, PPOTrainer, policy_forward, train
from wprlhf.rewards import vowels


def _step(trainer, tokenizer):
    queries = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:4]]
    responses = [torch.tensor([100 + n, 200, 300, 400][:n]) for n in (4, 2, 3, 1)]
    return trainer.step(queries, responses, [1.0, -1.0, 0.5, 0.0])


def test_lora_reference_is_the_policy_with_adapters_off(tokenizer):
    policy, _ = load_policy("tiny")
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = PPOTrainer(
        PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, lr=1e-2, lora_r=4), policy, tokenizer
    )
    assert trainer.reference is None  # no second copy of the weights
    trained = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    stats = _step(trainer, tokenizer)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy == reference
    stats = _step(trainer, tokenizer)
    assert stats["kl"] != pytest.approx(0.0, abs=1e-4)  # the adapters moved the policy ...
    with trainer.policy.disable_adapter():  # ... but not the base weights the reference reads
        for name, value in trainer.policy.get_base_model().state_dict().items():
            if "lora_" not in name:
                key = name.replace(".base_layer", "")
                torch.testing.assert_close(value, base[key], atol=0, rtol=0)


def test_lora_learns_vowel_reward(tmp_path):
    config = PPOConfig(**{**LEARNING, "lora_r": 16, "lora_alpha": 32.0})
    train(config, PROMPTS, vowels, tmp_path / "lora", progress=False)
    rows = read_metrics(tmp_path / "lora" / "metrics.csv")
    first, last = _first_last(rows, "reward_mean")
    se = (statistics.variance(first) / 5 + statistics.variance(last) / 5) ** 0.5
    gain = statistics.mean(last) - statistics.mean(first)
    assert gain > 3 * se, f"reward {statistics.mean(first):.3f} -> {statistics.mean(last):.3f}, se {se:.4f}"
    assert statistics.mean(_first_last(rows, "kl")[1]) < 20


def test_lora_resumes_and_exports_a_plain_merged_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    base = dict(LEARNING, steps=4, batch_size=8, num_minibatches=2, checkpoint_every=2, lora_r=4)
    whole = train(PPOConfig(**base), PROMPTS, vowels, tmp_path / "whole", progress=False)
    train(PPOConfig(**{**base, "steps": 2}), PROMPTS, vowels, tmp_path / "split", progress=False)
    assert (tmp_path / "split" / "checkpoints" / "step-000002" / "policy" / "adapter_model.safetensors").exists()
    train(PPOConfig(**base), PROMPTS, vowels, tmp_path / "split", resume=True, progress=False)
    a, b = (read_metrics(tmp_path / run / "metrics.csv") for run in ("whole", "split"))
    assert [r["reward_mean"] for r in a] == pytest.approx([r["reward_mean"] for r in b], rel=1e-5)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "policy")  # no peft needed to load it
    assert not hasattr(exported, "peft_config")
    q, qm = torch.tensor([tokenizer("A story")["input_ids"]]), None
    qm = torch.ones_like(q, dtype=torch.bool)
    r, rm = torch.tensor([[100, 200, 300]]), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        merged = policy_forward(exported, q, qm, r, rm, 0.7)[0]
        adapted = policy_forward(whole.policy, q, qm, r, rm, 0.7)[0]
        with whole.policy.disable_adapter():
            start = policy_forward(whole.policy, q, qm, r, rm, 0.7)[0]
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, start, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_update(tokenizer):
    plain = _one_update(tokenizer)
    checkpointed = _one_update(tokenizer, gradient_checkpointing=True)
    torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=0)


def test_gradient_checkpointing_recomputes_in_training_and_samples_with_the_kv_cache(tokenizer):
    """transformers turns the KV cache off in checkpointed layers in train mode: sampling must not see that mode,
    training must (or nothing is recomputed)."""
    from wprlhf.models import checkpointing

    samples = {}
    for flag in (False, True):
        policy, _ = load_policy("tiny")
        trainer = PPOTrainer(PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, gradient_checkpointing=flag,
                                       response_length=6, stop_at_eos=False), policy, tokenizer)  # fmt: skip
        samples[flag] = trainer.generate(PROMPTS[:4])[2].responses
        if flag:
            layers = [m for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
            assert layers and not any(m.training for m in layers)
            with checkpointing(trainer.model):
                assert all(m.training for m in layers)
                assert not any(m.training for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))
    assert torch.equal(samples[False], samples[True])


def test_bf16_autocast_trains(tokenizer):
    policy, _ = load_policy("tiny")
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    config = PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, lr=1e-3, mixed_precision="bf16", device="cpu")
    stats = _step(PPOTrainer(config, policy, tokenizer), tokenizer)
    after = torch.cat([p.detach().flatten() for p in policy.parameters()])
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert next(policy.parameters()).dtype == torch.float32  # weights stay fp32; only the matmuls are bf16
    assert not torch.equal(before, after)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_adamw8bit_trains(tokenizer):  # pragma: no cover - only where bitsandbytes is installed
    policy, _ = load_policy("tiny")
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    _step(PPOTrainer(PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, lr=1e-3, optimizer="adamw8bit"),
                     policy, tokenizer), tokenizer)  # fmt: skip
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in policy.parameters()]))
