"""Memory savers as PPO options on the tiny model: LoRA (reference = adapters off, one copy of the base weights)
learns, resumes and exports a plain model; gradient checkpointing gives the same update; bf16 autocast runs;
8-bit AdamW where bitsandbytes is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import learned, seed
from tests.test_ppo import LEARNING, PROMPTS, _one_update
from wprlhf.core import masked_sum, pad_sequences
from wprlhf.forwards import policy_forward
from wprlhf.methods.ppo import PPOConfig, PPOTrainer, train
from wprlhf.metrics import read_metrics
from wprlhf.models import load_policy
from wprlhf.rewards.spec import vowels

pytestmark = pytest.mark.learning  # every test here takes optimizer steps


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


def _preference_gap(trainer, queries, good, bad) -> float:
    """Mean log-prob of the high-score responses minus the low-score ones, in nats per response."""
    q, qm = pad_sequences(queries, 0, side="left")
    gaps = []
    for responses in (good, bad):
        r, rm = pad_sequences(responses, 0, side="right")
        with torch.no_grad():
            gaps.append(masked_sum(policy_forward(trainer.policy, q, qm, r, rm, 1.0)[0], rm, dim=1).mean())
    return float(gaps[0] - gaps[1])


def test_lora_moves_probability_towards_high_scores(tokenizer):
    """PPO through LoRA adapters alone learns which responses score high: on a fixed rollout (each prompt answered
    once with score +1, once with -1), 6 updates raise the log-prob gap between them by over 10 nats (37-43 measured under each kernel set).

    A property of the update, not of one sampled trajectory: sampling with the vowel reward gained 0.4 standard
    errors on one CPU kernel set and 3 on another (rounding picks different tokens); this gap moves by the same
    wide margin under every kernel set.
    """
    policy, _ = load_policy("tiny", seed=seed(0))
    config = PPOConfig(policy="tiny", batch_size=8, num_minibatches=2, lr=1e-2, temperature=1.0, lora_r=16,
                       lora_alpha=32.0, adaptive_kl=False, kl_coef=0.05, seed=seed(0))  # fmt: skip
    # config.seed also picks the adapters' init: the value model's torch.manual_seed(seed + 1) runs just before it
    trainer = PPOTrainer(config, policy, tokenizer)
    queries = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:4]]
    good = [torch.tensor([100 + i, 2000, 3000, 4000]) for i in range(4)]
    bad = [torch.tensor([100 + i, 5000, 6000, 7000]) for i in range(4)]
    before = _preference_gap(trainer, queries, good, bad)
    for _ in range(6):
        trainer.step(queries + queries, good + bad, [1.0] * 4 + [-1.0] * 4)
    gain = _preference_gap(trainer, queries, good, bad) - before
    learned("rise of the log-prob gap, high- over low-score responses (nats)", gain, 10.0)


def test_lora_resumes_and_exports_a_plain_merged_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    base = dict(LEARNING, steps=4, batch_size=8, num_minibatches=2, checkpoint_every=2, lora_r=4)
    whole = train(PPOConfig(**base), PROMPTS, vowels, tmp_path / "whole", progress=False)
    train(PPOConfig(**{**base, "steps": 2}), PROMPTS, vowels, tmp_path / "split", progress=False)
    assert (tmp_path / "split" / "checkpoints" / "step-000002" / "policy" / "adapter_model.safetensors").exists()
    train(PPOConfig(**base), PROMPTS, vowels, tmp_path / "split", resume=True, progress=False)
    a, b = (read_metrics(tmp_path / run / "metrics.csv") for run in ("whole", "split"))
    assert [r["score_mean"] for r in a] == pytest.approx([r["score_mean"] for r in b], rel=1e-5)

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
        samples[flag] = trainer.generate(PROMPTS[:4]).generation.responses
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


@pytest.mark.parametrize("shared_value_head", [False, True])
def test_bf16_reaches_every_training_matmul(tokenizer, shared_value_head):
    """With mixed_precision bf16, the policy's and the value model's training forwards (grad on) run their linear
    layers in bf16, on the one-process path that backpropagates the policy before the value model runs too."""
    policy, _ = load_policy("tiny")
    config = PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, lr=1e-3, mixed_precision="bf16", device="cpu",
                       shared_value_head=shared_value_head)  # fmt: skip
    trainer = PPOTrainer(config, policy, tokenizer)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                seen.setdefault(name, set()).add(output.dtype)
        return hook

    for name, model in trainer.models().items():
        next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(record(name))
    _step(trainer, tokenizer)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen.values()), seen
    assert set(seen) == set(trainer.models())


def test_bf16_rollout_logprobs_match_the_training_forward(tmp_path):
    """Under bf16 the rollout's log-probs come from the same precision as the training forward: on the first
    minibatch of a step the ratio is exactly 1, so nothing is clipped and approx-KL is 0."""
    config = PPOConfig(policy="tiny", steps=1, batch_size=4, num_minibatches=1, ppo_epochs=1, response_length=6,
                       mixed_precision="bf16", device="cpu", log_samples=0)  # fmt: skip
    train(config, PROMPTS, vowels, tmp_path / "run", progress=False)
    row = read_metrics(tmp_path / "run" / "metrics.csv")[0]
    assert row["clipfrac"] == 0.0 and row["approxkl"] == pytest.approx(0.0, abs=1e-7)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_bf16_reference_holds_bf16_matmul_weights_and_gives_the_policys_logprobs(tmp_path, tokenizer):
    """Under bf16 the frozen reference stores its linear weights (the head untied from the embedding) in bf16: less
    memory than an fp32 copy, and under autocast the same numbers, so the first rollout's KL is exactly 0."""
    policy, _ = load_policy("tiny")
    config = PPOConfig(policy="tiny", batch_size=4, num_minibatches=1, mixed_precision="bf16", device="cpu")
    trainer = PPOTrainer(config, policy, tokenizer)
    reference = trainer.reference
    linears = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    assert _bytes(reference) < 0.8 * _bytes(policy)
    assert next(policy.parameters()).dtype == torch.float32 and all(p.requires_grad for p in policy.parameters())
    samples = trainer.generate(PROMPTS[:4])
    batch = (samples.queries, samples.query_mask, samples.generation.responses, samples.generation.response_mask)
    with torch.no_grad(), trainer.accelerator.autocast():
        policy_logprobs = policy_forward(policy, *batch, trainer.config.temperature)[0]
    assert torch.equal(trainer.reference_logprobs(*batch), policy_logprobs)
    config = PPOConfig(policy="tiny", steps=1, batch_size=4, num_minibatches=1, response_length=6,
                       mixed_precision="bf16", device="cpu", log_samples=0)  # fmt: skip
    train(config, PROMPTS, vowels, tmp_path / "run", progress=False)
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["kl"] == 0.0


def test_no_bf16_reference_where_autocast_is_off(tokenizer):
    """fp16 on the CPU (like DeepSpeed's precision) runs no autocast: the reference stays a plain fp32 copy, which an
    fp32 forward can run, and a step trains."""
    policy, _ = load_policy("tiny")
    config = PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, mixed_precision="fp16", device="cpu")
    trainer = PPOTrainer(config, policy, tokenizer)
    assert not trainer.accelerator.native_amp
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.float32}
    stats = _step(trainer, tokenizer)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_matmuls_in_copies_gpt2_conv1d_and_never_shares_a_bf16_policys_weights():
    """GPT-2's Conv1D layers are cast too (the copy computes the model's autocast logits exactly), and a policy that is
    already bf16 gets a copy of its weights, not the same storage: a shared reference would follow the policy's
    updates and the KL penalty would vanish."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from wprlhf.models import matmuls_in

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    copy = matmuls_in(gpt2, torch.bfloat16)
    conv = copy.transformer.h[0].attn.c_attn
    assert conv.weight.dtype == conv.bias.dtype == torch.bfloat16
    assert copy.transformer.wte.weight.dtype == torch.float32 and copy.lm_head.weight.dtype == torch.bfloat16
    assert _bytes(copy) < 0.8 * _bytes(gpt2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(copy(ids).logits, gpt2(ids).logits)

    policy, _ = load_policy("tiny", dtype=torch.bfloat16)
    reference = matmuls_in(policy, torch.bfloat16)
    ours = {p.data_ptr() for p in policy.parameters()}
    assert not ours & {p.data_ptr() for p in reference.parameters()}
    assert all(p.requires_grad for p in policy.parameters())


def test_bf16_sampling_casts_each_weight_once_per_call(tokenizer):
    """Under bf16 the trainer's sampler reads cast bf16 weights on every decoding step, but casts each weight only
    once per call (autocast's cache, which inference mode would switch off): 8 tokens, 1 cast of the head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    policy, _ = load_policy("tiny")
    head = policy.get_output_embeddings().weight
    config = PPOConfig(policy="tiny", batch_size=4, num_minibatches=1, response_length=8, stop_at_eos=False,
                       mixed_precision="bf16", device="cpu")  # fmt: skip
    trainer = PPOTrainer(config, policy, tokenizer)

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)  # how each mode dispatches it
            if func in casts and args[0].data_ptr() == head.data_ptr():
                CountCasts.casts += 1
            return func(*args, **(kwargs or {}))

    queries, query_mask = pad_sequences([torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS[:4]],
                                        tokenizer.pad_token_id, side="left")  # fmt: skip
    with CountCasts():
        gen = trainer.sample(queries, query_mask)
    assert gen.responses.shape == (4, 8)
    assert CountCasts.casts == 1


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_adamw8bit_trains(tokenizer):  # pragma: no cover - only where bitsandbytes is installed
    policy, _ = load_policy("tiny")
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    _step(PPOTrainer(PPOConfig(policy="tiny", batch_size=4, num_minibatches=2, lr=1e-3, optimizer="adamw8bit"),
                     policy, tokenizer), tokenizer)  # fmt: skip
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in policy.parameters()]))
