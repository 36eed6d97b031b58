"""Maths off the default path, checked against the papers (issue: "a line-by-line read of every algorithm").

Each test holds one defect the defaults never met: k3 as a reward, a train-mode policy, the eval KL without its
end-of-turn term, DPO's cached reference under prompt clipping, re-normalising a bias-free reward head, and one
meaning each for DPO's `accuracy` (a tie counts 1/2) and for `kl` under a floor on response length (the KL of the
distribution the sampler drew from, the same in PPO's metrics, `sides.side_kl` and `wprlhf eval`).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from tests.helpers import seed
from wprlhf.core import kl_k1, kl_k3, masked_sum, position_ids_from_mask
from wprlhf.errors import UserError
from wprlhf.generation import GenerationConfig, decode_responses, encode_prompts, fit_positions, sample
from wprlhf.models import load_policy, stop_token_ids

PROMPTS = ["Tell me about cats", "A story, please", "What is rain?", "Hi"]
T = 0.7


# ----------------------------------------------------------------------------------------------------------
# helpers: a policy that likes to stop, and the slow, obvious KL of sampled ids


def _stop_prone_pair(tokenizer, boost: float = 0.92, noise: float = 0.0):
    """(policy, reference): two tiny models that differ in the stop token's logit (policy: p(stop) ~ 0.3 at T 0.7
    everywhere, reference: ~ 1/49k) and, with noise > 0, in the other output rows too.

    Hidden dimension 0 is made a constant 1 in the residual stream (every embedding row holds 1 there and no layer
    writes to it), so after the final norm it is positive at every position, and the stop token's weight on it
    raises the stop logit everywhere by about the same amount."""
    base, _ = load_policy("tiny", seed=0)
    with torch.no_grad():
        base.model.embed_tokens.weight[:, 0] = 1.0
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
    policy, reference = copy.deepcopy(base), base
    with torch.no_grad():
        if noise:
            g = torch.Generator().manual_seed(seed(5))
            policy.lm_head.weight.add_(noise * torch.randn(policy.lm_head.weight.shape, generator=g))
        policy.lm_head.weight[stop_token_ids(tokenizer), 0] = boost
    return policy.eval(), reference.eval()


def _sample_ids(policy, tokenizer, prompts, config: GenerationConfig, sample_seed: int):
    """The samples `generation.generate` (and `sides.side_kl`) draw with this seed, one batch: queries,
    query_mask and the Generation."""
    queries, query_mask = encode_prompts(tokenizer, prompts)
    queries, query_mask = fit_positions(policy, queries, query_mask, config.max_new_tokens)
    gen = sample(policy, queries, query_mask, config, stop_token_ids(tokenizer), tokenizer.pad_token_id,
                 torch.Generator().manual_seed(sample_seed), tokenizer)  # fmt: skip
    return queries, query_mask, gen


def _sampled_logprobs(model, queries, query_mask, responses, response_mask, stops, min_new_tokens):
    """Slow and obvious: a full forward, logits / T, the stop tokens' logits -inf at t < min_new_tokens (what the
    sampler drew from), log_softmax, the sampled token's entry; summed over each response's real tokens. (B,)"""
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, queries.shape[1] - 1 : -1].float() / T  # (B, Tr, V)
    logits[:, :min_new_tokens, stops] = -math.inf
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    return masked_sum(logprobs, response_mask, dim=1)


def _ppo_kls(policy, reference, tokenizer, queries, query_mask, gen, min_response_length: int):
    """PPO's per-response `kl` (what finish_step hands the controller and the samples log) and the logged mean, on
    given samples: the rollout forwards as `Trainer.rollout` runs them in fp32 (the sampler's log-probs passed)."""
    from wprlhf.methods.ppo import PPOConfig, PPOTrainer

    n, Tr = gen.responses.shape
    config = PPOConfig(policy="tiny", batch_size=n, num_minibatches=1, response_length=Tr, temperature=T,
                       min_response_length=min_response_length, mixed_precision="no", device="cpu")  # fmt: skip
    trainer = PPOTrainer(config, policy, tokenizer)
    trainer.reference = reference  # the pair under test, not a copy of the policy
    rollout = trainer.forward_rollout(queries, query_mask, gen.responses, gen.response_mask, torch.zeros(n),
                                      gen.logprobs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the schedule steps with no optimizer step before it
        logged = trainer.finish_step(rollout)["kl"]
    return torch.tensor(trainer.last_episodes["kl"]), logged


def _eval_kl(monkeypatch, tmp_path, policy, reference, tokenizer, prompts, config: GenerationConfig, eval_seed):
    """`wprlhf eval`'s KL column (mean nats per response) of `policy` against `reference` on the prompts, and its
    pairs file's policy texts. The two models stand in for two directories (load_policy is patched)."""
    import json

    from wprlhf.evals.side_by_side import EvalConfig, run_eval

    models = {"P": policy, "R": reference}
    monkeypatch.setattr("wprlhf.models.load_policy", lambda spec, seed=0, **kw: (models[spec], tokenizer))
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    eval_config = EvalConfig(policy="P", against="R", prompts=str(tmp_path / "prompts.txt"),
                             response_length=config.max_new_tokens, min_response_length=config.min_new_tokens,
                             temperature=T, seed=eval_seed, batch_size=len(prompts), device="cpu")  # fmt: skip
    report = run_eval(eval_config, tmp_path / "e.json")
    pairs = [json.loads(line) for line in (tmp_path / "e-pairs.jsonl").read_text().splitlines()]
    return report["sides"]["policy"]["kl"]["mean"], [p["policy"] for p in pairs]


def _side_kl(policy, reference, tokenizer, config: GenerationConfig, sample_seed):
    """(texts, per-response KL) of a side of `policy` sampled on PROMPTS in one batch, as every evaluation
    measures it (`sides.sample_side`, `sides.side_kl`)."""
    from wprlhf.evals.sides import sample_side, side_kl

    side = sample_side("p", policy, tokenizer, PROMPTS, config, sample_seed, batch_size=len(PROMPTS), progress=False)
    return side.texts, side_kl(side, policy, reference, tokenizer, PROMPTS, config, batch_size=len(PROMPTS),
                               progress=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 1. k3 is a loss (GRPO), never a reward (PPO, RLOO)


@pytest.mark.parametrize("method", ["ppo", "rloo"])
def test_k3_as_the_reward_penalty_is_refused_naming_k1(method):
    """The score-function gradient of E[k3] is grad KL(pi||ref) - grad KL(ref||pi): no pull back to the reference.
    PPO and RLOO put the estimator into the reward, so k3 is refused there, with the fix (k1) in the message."""
    from wprlhf.methods.ppo import PPOConfig
    from wprlhf.methods.rloo import RLOOConfig

    cls = {"ppo": PPOConfig, "rloo": RLOOConfig}[method]
    with pytest.raises(UserError, match="k1"):
        cls(kl_estimator="k3")
    assert cls().kl_estimator == "k1"


def test_why_k3_cannot_be_a_reward_and_k1_can():
    """Exact expectations on a 4-token bandit: the score-function gradient of E_pi[k3] (k3 a reward, as PPO's
    penalty treats it) equals grad KL(pi||ref) - grad KL(ref||pi), not grad KL(pi||ref); that of E_pi[k1] is grad
    KL(pi||ref). And GRPO's k3 *loss* (gradient through pi(y) on samples of pi) has expected gradient
    grad KL(ref||pi): it also vanishes only at pi = ref."""
    theta = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.tensor([0.2, 0.1, -0.4, 0.6], dtype=torch.float64), -1)

    def grad(f):
        return torch.autograd.grad(f(), theta)[0]

    def logp():
        return torch.log_softmax(theta, -1)

    p = logp().exp().detach()
    kl_forward = lambda: (logp().exp() * (logp() - log_ref)).sum()  # KL(pi || ref)  # noqa: E731
    kl_reverse = lambda: (log_ref.exp() * (log_ref - logp())).sum()  # KL(ref || pi)  # noqa: E731
    k1, k3 = kl_k1(logp(), log_ref).detach(), kl_k3(logp(), log_ref).detach()
    score_k1 = grad(lambda: (p * k1 * logp()).sum())  # E_pi[k1 * grad log pi]
    score_k3 = grad(lambda: (p * k3 * logp()).sum())
    torch.testing.assert_close(score_k1, grad(kl_forward))
    torch.testing.assert_close(score_k3, grad(kl_forward) - grad(kl_reverse))
    loss_k3 = grad(lambda: (p * kl_k3(logp(), log_ref)).sum())  # GRPO: E_pi[grad k3], pi(y) differentiated
    torch.testing.assert_close(loss_k3, grad(kl_reverse))


def test_grpo_k3_loss_pulls_a_bandit_back_to_the_reference():
    """GRPO keeps k3 as a loss term: with every advantage 0, steps on `grpo_loss` over samples of a one-token bandit
    bring KL(pi||ref) from 0.5 nats down towards 0."""
    from wprlhf.methods.grpo import grpo_loss

    g = torch.Generator().manual_seed(seed(0))
    log_ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2]), -1)
    theta = (torch.log_softmax(torch.tensor([3.0, -1.0, 0.0, -2.0, 0.5]), -1)).clone().requires_grad_(True)

    def kl():
        logp = torch.log_softmax(theta.detach(), -1)
        return float((logp.exp() * (logp - log_ref)).sum())

    start = kl()
    for _ in range(200):
        tokens = torch.multinomial(torch.softmax(theta.detach(), -1), 256, replacement=True, generator=g)[:, None]
        new = torch.log_softmax(theta, -1)[tokens]  # (256, 1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        loss, _ = grpo_loss(new, new.detach(), log_ref[tokens], torch.zeros(256), mask, 0.2, kl_coef=1.0)
        (g_theta,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= 0.5 * g_theta
    assert start > 0.5 and kl() < 0.02 * start


# ----------------------------------------------------------------------------------------------------------
# 2. the on-policy trainers switch dropout off


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo"])
def test_a_policy_passed_in_train_mode_is_put_in_eval_mode(method, tokenizer):
    """PPOTrainer(...) with a model whose .training is True (and dropout in its attention): the trainer's networks
    are in eval mode, so at step 0 (policy = reference) every response's KL is 0 and two forwards agree."""
    from wprlhf.methods.grpo import GRPOConfig, GRPOTrainer
    from wprlhf.methods.ppo import PPOConfig, PPOTrainer
    from wprlhf.methods.rloo import RLOOConfig, RLOOTrainer

    cfg_cls, trainer_cls = {"ppo": (PPOConfig, PPOTrainer), "rloo": (RLOOConfig, RLOOTrainer),
                            "grpo": (GRPOConfig, GRPOTrainer)}[method]  # fmt: skip
    policy, _ = load_policy("tiny", seed=0)
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.3
    policy.train()
    config = cfg_cls(policy="tiny", batch_size=4, num_minibatches=1, samples_per_prompt=1 if method == "ppo" else 2,
                     response_length=6, mixed_precision="no", device="cpu", seed=seed(0))  # fmt: skip
    trainer = trainer_cls(config, policy, tokenizer)
    networks = [trainer.policy, trainer.reference] + ([trainer.value_model] if trainer.value_model is not None else [])
    assert not any(m.training for net in networks for m in net.modules())
    prompts = [p for p in PROMPTS[:2] for _ in range(config.samples_per_prompt)] if method != "ppo" else PROMPTS
    rollout, _ = trainer.rollout(prompts, lambda ps, rs: [0.0] * len(rs))
    kl = masked_sum(kl_k1(rollout.logprobs, rollout.ref_logprobs), rollout.response_mask, dim=1)
    assert kl.abs().max() < 1e-4, kl  # dropout on: 0.1-0.2 nats
    again = trainer.forward_rollout(rollout.queries, rollout.query_mask, rollout.responses, rollout.response_mask,
                                    rollout.scores)  # fmt: skip
    torch.testing.assert_close(again.ref_logprobs, rollout.ref_logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 3. `wprlhf eval` scores the sampled ids, end-of-turn token included


def test_eval_kl_counts_the_end_of_turn_term_of_responses_that_stopped(tokenizer, tmp_path, monkeypatch):
    """Responses of varying length (a floor of 3 tokens, then the policy stops with p ~ 0.3): `wprlhf eval`'s KL is
    the sum over the sampled ids, the stop token's log pi(EOS) - log ref(EOS) included, as a full forward gives it."""
    policy, reference = _stop_prone_pair(tokenizer, noise=0.02)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=3, temperature=T)
    queries, query_mask, gen = _sample_ids(policy, tokenizer, PROMPTS, config, sample_seed=seed(1))
    assert gen.finished.any() and not gen.finished.all(), "precondition: some responses stop, some do not"
    stops = stop_token_ids(tokenizer)
    expected = (_sampled_logprobs(policy, queries, query_mask, gen.responses, gen.response_mask, stops, 3)
                - _sampled_logprobs(reference, queries, query_mask, gen.responses, gen.response_mask, stops, 3))
    kl_mean, texts = _eval_kl(monkeypatch, tmp_path, policy, reference, tokenizer, PROMPTS, config, seed(1))
    assert texts == decode_responses(tokenizer, gen.responses, gen.response_mask)  # the same samples
    assert kl_mean == pytest.approx(float(expected.mean()), abs=1e-4)  # without EOS: ~ 1 nat less per stopped one


# ----------------------------------------------------------------------------------------------------------
# 4. DPO's cached reference does not depend on a pair's batch mates


def test_dpo_cached_reference_is_the_fresh_one_whatever_the_batch_mates(tokenizer):
    """Prompt + response past the model's positions: prompts are clipped, and by a rule that depends on the pair
    alone. A pair's reference log-probs cached in a batch beside long responses equal a fresh forward of it alone,
    so with policy = reference its margin is 0 (not -0.02: clipping that followed the batch's longest response)."""
    from wprlhf.methods.dpo import DPO, DPOConfig, Pair

    policy, _ = load_policy("tiny", seed=0)
    policy.config.max_position_embeddings = 96
    short = Pair("Please write about the sea. " * 8, "yes", "no")
    long = Pair("Another prompt", " ".join(["word"] * 20), " ".join(["other"] * 18))
    config = DPOConfig(policy="tiny", mixed_precision="no", device="cpu", beta=1.0, max_response_length=24)
    dpo = DPO(config, policy, tokenizer, total_steps=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # fit_positions says that prompts lose tokens
        dpo.batch_loss([short, long], [("train", 0), ("train", 1)])  # caches both pairs' reference log-probs
        _, stats = dpo.batch_loss([short], [("train", 0)])  # the policy's, alone; the reference's from the cache
    assert abs(float(stats["margin"][0])) < 1e-4, stats["margin"]


def test_dpo_refuses_a_max_response_length_that_leaves_no_room_for_a_prompt(tokenizer):
    from wprlhf.methods.dpo import DPO, DPOConfig

    policy, _ = load_policy("tiny", seed=0)
    policy.config.max_position_embeddings = 32
    with pytest.raises(UserError, match="max-response-length"):
        DPO(DPOConfig(policy="tiny", mixed_precision="no", device="cpu", max_response_length=32), policy, tokenizer, 1)


# ----------------------------------------------------------------------------------------------------------
# 5. re-normalising a normalised, bias-free reward head


def test_renormalising_a_bias_free_head_keeps_the_scores_centred(tokenizer):
    """fold_normalization twice on a head without a bias (SmolLM2's, tiny's): the second fold must keep the first
    offset, so the scores are again mean 0 / std 1, and reward_normalization still maps the raw head to them."""
    from wprlhf.models import load_reward_backbone
    from wprlhf.rewards.reward_model import fold_normalization, score

    model, rm_tokenizer = load_reward_backbone("tiny", num_labels=1, seed=3)
    assert model.score.bias is None
    prompts = [f"prompt {i}" for i in range(12)]
    responses = [f"response number {i} " * (1 + i % 4) for i in range(12)]
    raw = score(model, rm_tokenizer, prompts, responses, max_length=32)
    fold_normalization(model, float(raw.mean()) + 3.0, 2.0)  # an arbitrary first normalisation: an offset to keep
    first = score(model, rm_tokenizer, prompts, responses, max_length=32)
    assert abs(float(first.mean())) > 1.0
    fold_normalization(model, float(first.mean()), float(first.std()))
    again = score(model, rm_tokenizer, prompts, responses, max_length=32)
    assert float(again.mean()) == pytest.approx(0.0, abs=1e-4)  # was -0.475-like: off by the first offset
    assert float(again.std()) == pytest.approx(1.0, abs=1e-4)
    norm = model.config.reward_normalization
    torch.testing.assert_close(again, (raw - norm["mean"]) / norm["std"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 6. one name, one meaning: DPO's accuracy and `kl`


def test_dpo_accuracy_counts_an_exact_tie_as_one_half(tmp_path, tokenizer):
    """Policy = reference at step 0: every margin is exactly 0, a tie between chosen and rejected, which counts 1/2
    as in every other accuracy of wprlhf (`core.choice_credit`): training and held-out accuracy 0.5."""
    from wprlhf.data import Comparison
    from wprlhf.methods.dpo import DPO, DPOConfig, Pair, evaluate, train
    from wprlhf.metrics import read_metrics

    pairs = [Pair("A short prompt", "yes", "no no no"), Pair("Another prompt", "a b c", "x")]
    policy, _ = load_policy("tiny", seed=0)
    dpo = DPO(DPOConfig(policy="tiny", mixed_precision="no", device="cpu"), policy, tokenizer, total_steps=1)
    assert evaluate(dpo, pairs, batch_size=2)["val_accuracy"] == 0.5
    comparisons = [Comparison(f"prompt {i}", [f"good answer {i}", f"bad {i}"], 0, prompt_id=str(i)) for i in range(4)]
    train(DPOConfig(policy="tiny", mixed_precision="no", device="cpu", batch_size=4, val_fraction=0.0,
                    checkpoint_every=1000), tmp_path / "run", comparisons=comparisons, progress=False)  # fmt: skip
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["accuracy"] == 0.5


def test_the_three_kls_agree_on_the_same_samples(tokenizer, tmp_path, monkeypatch):
    """One model pair, one set of samples drawn with a floor of 3 tokens (stop tokens masked before it): PPO's
    per-response `kl` and its logged mean, `sides.side_kl` and `wprlhf eval` all give the KL of the
    distribution the sampler drew from, as a slow full forward computes it."""
    policy, reference = _stop_prone_pair(tokenizer, noise=0.02)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=3, temperature=T)
    s = seed(2)
    queries, query_mask, gen = _sample_ids(policy, tokenizer, PROMPTS, config, sample_seed=s)
    stops = stop_token_ids(tokenizer)
    expected = (_sampled_logprobs(policy, queries, query_mask, gen.responses, gen.response_mask, stops, 3)
                - _sampled_logprobs(reference, queries, query_mask, gen.responses, gen.response_mask, stops, 3))
    texts, kls = _side_kl(policy, reference, tokenizer, config, s)
    assert texts == decode_responses(tokenizer, gen.responses, gen.response_mask)
    torch.testing.assert_close(torch.tensor(kls), expected, atol=1e-4, rtol=0)
    per_response, logged = _ppo_kls(policy, reference, tokenizer, queries, query_mask, gen, 3)
    torch.testing.assert_close(per_response, expected, atol=1e-4, rtol=0)
    assert logged == pytest.approx(float(expected.mean()), abs=1e-4)
    eval_mean, eval_texts = _eval_kl(monkeypatch, tmp_path, policy, reference, tokenizer, PROMPTS, config, s)
    assert eval_texts == texts and eval_mean == pytest.approx(float(expected.mean()), abs=1e-4)


def test_kl_under_a_floor_on_response_length_is_not_negative(tokenizer, tmp_path, monkeypatch):
    """Fixed-length responses (min = max = 8) from a policy that differs from its reference only in the stop token's
    logit: the distributions sampled from, stop tokens masked, are the same, so the KL is 0. Full-vocabulary
    log-probs would give sum_t log(1 - pi(stop)) - log(1 - ref(stop)), about -2.7 nats per response."""
    policy, reference = _stop_prone_pair(tokenizer)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8, temperature=T)
    s = seed(3)
    queries, query_mask, gen = _sample_ids(policy, tokenizer, PROMPTS, config, sample_seed=s)
    _, kls = _side_kl(policy, reference, tokenizer, config, s)
    per_response, logged = _ppo_kls(policy, reference, tokenizer, queries, query_mask, gen, 8)
    eval_mean, _ = _eval_kl(monkeypatch, tmp_path, policy, reference, tokenizer, PROMPTS, config, s)
    for name, values in (("side_kl", kls), ("ppo per response", per_response.tolist()),
                         ("ppo logged", [logged]), ("wprlhf eval", [eval_mean])):  # fmt: skip
        assert all(abs(v) < 1e-4 for v in values), (name, values)
