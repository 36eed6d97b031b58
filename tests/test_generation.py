"""Tests of wprlhf.generation: KV-cached sampling against full forwards and transformers, stopping, text in/out."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from wprlhf.core import position_ids_from_mask
from wprlhf.errors import UserError
from wprlhf.generation import (
    GenerationConfig,
    _rows_copyable,
    _sample,
    decode_responses,
    encode_prompts,
    fit_positions,
    generate,
    generate_k,
    prompt_room,
    sample,
)
from wprlhf.models import stop_token_ids

# Different lengths on purpose: the shorter prompts are left-padded in a batch.
PROMPTS = ["Hi", "Write a long story about a cat who sails the seven seas.", "What is 2+2?"]


def _greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, greedy=True, **kw)


def _forward_logprobs(model, queries, query_mask, responses, response_mask, temperature: float) -> torch.Tensor:
    """Log-probs of the responses from one full forward over queries + responses, as PPO's training pass takes them."""
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    # The logit at position t predicts token t + 1: the last query position predicts the first response token.
    logits = logits[:, queries.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, responses[..., None]).squeeze(-1)


def _first_index(row: torch.Tensor, token: int) -> int | None:
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else None


# ----------------------------------------------------------------------------------------------------------
# agreement with transformers and with a full forward


def test_greedy_matches_transformers_generate(tiny, tokenizer):
    """Greedy KV-cached sampling of left-padded prompts of different lengths equals transformers' greedy generate."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    assert len(set(query_mask.sum(1).tolist())) == len(PROMPTS), "prompts must differ in length to exercise padding"
    n = 12
    config = _greedy(n, stop_at_eos=False)
    gen = sample(tiny, queries, query_mask, config, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    # min_new_tokens=n keeps transformers from stopping early, matching our fixed-length mode.
    expected = tiny.generate(
        input_ids=queries, attention_mask=query_mask.long(), do_sample=False,
        max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id,
    )[:, queries.shape[1]:]  # fmt: skip
    assert torch.equal(gen.responses, expected)
    assert gen.response_mask.all()
    assert not gen.finished.any()


def test_sampling_logprobs_match_full_forward(tiny, tokenizer):
    """Sampled log-probs equal a full forward's log_softmax(logits / T) on real tokens and are 0 on masked ones."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    config = GenerationConfig(max_new_tokens=10, temperature=0.7, stop_at_eos=False)
    first = sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    # Replaying the same seed with row 0's 4th token as the stop token gives masked tails to check as well.
    stop = int(first.responses[0, 3])
    config = GenerationConfig(max_new_tokens=10, temperature=0.7)
    gen = sample(tiny, queries, query_mask, config, [stop], tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    assert not gen.response_mask.all(), "the stop token should leave masked positions"

    expected = _forward_logprobs(tiny, queries, query_mask, gen.responses, gen.response_mask, 0.7)
    m = gen.response_mask
    torch.testing.assert_close(gen.logprobs[m], expected[m], atol=1e-5, rtol=0)
    assert (gen.logprobs[~m] == 0).all()
    assert gen.logprobs.dtype == torch.float32


def test_padding_invariance(tiny, tokenizer):
    """A prompt's greedy response and log-probs are the same alone as left-padded beside a longer prompt."""
    config = _greedy(10, stop_at_eos=False)
    alone_q, alone_m = encode_prompts(tokenizer, PROMPTS[:1])
    batch_q, batch_m = encode_prompts(tokenizer, PROMPTS[:2])
    assert not batch_m[0].all(), "prompt 0 must be left-padded in the batch"
    alone = sample(tiny, alone_q, alone_m, config, [], tokenizer.pad_token_id)
    batch = sample(tiny, batch_q, batch_m, config, [], tokenizer.pad_token_id)
    assert torch.equal(alone.responses[0], batch.responses[0])
    torch.testing.assert_close(alone.logprobs[0], batch.logprobs[0], atol=1e-5, rtol=0)


def test_seeded_reproducibility(tiny, tokenizer):
    """The same generator seed gives identical samples; a different seed gives different ones."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, stop_at_eos=False)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id, generator)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.responses, b.responses)
    assert torch.equal(a.logprobs, b.logprobs)
    # A near-uniform random model over ~49k tokens: two seeds agreeing on 24 tokens is essentially impossible.
    assert not torch.equal(a.responses, c.responses)


def test_several_samples_per_query_share_its_forward(tiny, tokenizer):
    """num_samples=k gives k adjacent rows per query from one prefill: greedy rows equal the query's own greedy
    response, sampled rows are k different draws, and their log-probs equal a full forward over their own query
    (a KV cache copied to the wrong rows would condition them on another prompt)."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    k, pad = 3, tokenizer.pad_token_id
    alone = sample(tiny, queries, query_mask, _greedy(8, stop_at_eos=False), [], pad)
    greedy = sample(tiny, queries, query_mask, _greedy(8, stop_at_eos=False), [], pad, num_samples=k)
    assert torch.equal(greedy.responses, alone.responses.repeat_interleave(k, 0))

    config = GenerationConfig(max_new_tokens=10, temperature=0.7, stop_at_eos=False)
    gen = sample(tiny, queries, query_mask, config, [], pad, torch.Generator().manual_seed(0), num_samples=k)
    assert gen.responses.shape == (len(PROMPTS) * k, 10)
    rows = gen.responses.view(len(PROMPTS), k, 10)
    assert all(not torch.equal(rows[i, 0], rows[i, 1]) for i in range(len(PROMPTS)))
    own_q, own_m = queries.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
    expected = _forward_logprobs(tiny, own_q, own_m, gen.responses, gen.response_mask, 0.7)
    torch.testing.assert_close(gen.logprobs, expected, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="num_samples"):
        sample(tiny, queries, query_mask, config, [], pad, num_samples=0)


def test_copies_finish_apart_and_a_cache_that_cannot_be_copied_is_prefilled_per_copy(tiny, tokenizer, monkeypatch):
    """With a stop token, a query's copies end at different steps, each masked and scored as its own row. Where the
    cache has a layer whose state batch_repeat_interleave would not copy (a hybrid model's recurrent layer, stood in
    for here by `_rows_copyable` saying no), the sampler prefills num_samples copies of each query instead."""
    from transformers import DynamicCache

    import wprlhf.generation as generation

    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    k, pad = 3, tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=10, temperature=0.7, stop_at_eos=False)
    first = sample(tiny, queries, query_mask, config, [], pad, torch.Generator().manual_seed(0), num_samples=k)
    stop = int(first.responses[0, 3])
    config = GenerationConfig(max_new_tokens=10, temperature=0.7)
    own_q, own_m = queries.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
    prefill_rows = []
    hook = tiny.register_forward_pre_hook(lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape),
                                          with_kwargs=True)  # fmt: skip
    try:
        runs = {}
        for copied in (True, False):
            if not copied:
                monkeypatch.setattr(generation, "_rows_copyable", lambda cache: False)
            prefill_rows.clear()
            runs[copied] = sample(tiny, queries, query_mask, config, [stop], pad, torch.Generator().manual_seed(0),
                                  num_samples=k)  # fmt: skip
            assert prefill_rows[0][0] == (len(PROMPTS) if copied else len(PROMPTS) * k)
    finally:
        hook.remove()
    for gen in runs.values():
        m = gen.response_mask
        assert not m.all() and not m[0].all(), "row 0 meets the stop token by step 3"
        expected = _forward_logprobs(tiny, own_q, own_m, gen.responses, m, 0.7)
        torch.testing.assert_close(gen.logprobs[m], expected[m], atol=1e-5, rtol=0)
        assert (gen.logprobs[~m] == 0).all()
    assert _rows_copyable(DynamicCache(config=tiny.config)), "the test model's key/value layers are copied"


def test_finished_rows_leave_the_batch_and_nothing_else_changes(tiny, tokenizer, monkeypatch):
    """Rows that have ended leave the sampling batch (their cache too) once DROP_FINISHED of it has ended: every
    later step runs on fewer rows, and the samples are those of a batch that keeps them (same noise per row; the
    log-probs agree with a full forward)."""
    import wprlhf.generation as generation

    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    k, pad, n = 4, tokenizer.pad_token_id, 12
    free = sample(tiny, queries, query_mask, GenerationConfig(max_new_tokens=n, temperature=1.0, stop_at_eos=False),
                  [], pad, torch.Generator().manual_seed(3), num_samples=k)  # fmt: skip
    stops = sorted({int(free.responses[0, 2]), int(free.responses[5, 4])})  # rows 0 and 5 end early
    config = GenerationConfig(max_new_tokens=n, temperature=1.0)
    step_rows = []
    hook = tiny.register_forward_pre_hook(lambda module, args, kwargs: step_rows.append(kwargs["input_ids"].shape[0]),
                                          with_kwargs=True)  # fmt: skip
    try:
        runs = {}
        for drop in (0.125, 2.0):  # 2.0: never (the batch keeps every row to the end)
            monkeypatch.setattr(generation, "DROP_FINISHED", drop)
            step_rows.clear()
            runs[drop] = sample(tiny, queries, query_mask, config, stops, pad, torch.Generator().manual_seed(3),
                                num_samples=k)  # fmt: skip
            runs[drop].rows = list(step_rows)
    finally:
        hook.remove()
    kept, dropped = runs[2.0], runs[0.125]
    assert not kept.finished.all() and kept.finished.sum() >= 2, "some rows end early, some run to the cap"
    assert set(kept.rows[1:]) == {len(PROMPTS) * k}
    steps = dropped.rows[1:]  # the first forward is the prefill, one row a query
    assert min(steps) < len(PROMPTS) * k and steps == sorted(steps, reverse=True)
    assert min(steps) >= int((~kept.finished).sum())
    for field in ("responses", "response_mask", "finished"):
        assert torch.equal(getattr(dropped, field), getattr(kept, field)), field
    torch.testing.assert_close(dropped.logprobs, kept.logprobs, atol=1e-5, rtol=0)
    m = dropped.response_mask
    expected = _forward_logprobs(tiny, queries.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0),
                                 dropped.responses, m, 1.0)  # fmt: skip
    torch.testing.assert_close(dropped.logprobs[m], expected[m], atol=1e-5, rtol=0)


def test_generate_batches_hold_at_most_batch_size_responses(tiny, tokenizer, monkeypatch):
    """generate(num_samples=k) puts batch_size // k prompts in a batch; a k above batch_size samples a prompt's
    copies batch_size at a time, so --batch-size still caps the rows of a batch."""
    import wprlhf.generation as generation

    rows = []
    real = generation.sample

    def spy(model, queries, *args, num_samples=1, **kwargs):
        rows.append((queries.shape[0], num_samples))
        return real(model, queries, *args, num_samples=num_samples, **kwargs)

    monkeypatch.setattr(generation, "sample", spy)
    config = _greedy(4, stop_at_eos=False)
    generate_k(tiny, tokenizer, PROMPTS, 2, config, batch_size=4)
    assert rows == [(2, 2), (1, 2)]
    rows.clear()
    generate_k(tiny, tokenizer, PROMPTS, 3, config, batch_size=2)
    assert rows == [(2, 1)] * 4 + [(1, 1)]


def test_generate_k_groups_each_prompts_responses(tiny, tokenizer):
    """generate_k: (P, k) responses, prompt i's k in row i, whatever the batch size (which counts responses)."""
    config = _greedy(6, stop_at_eos=False)
    one_each = generate(tiny, tokenizer, PROMPTS, config, batch_size=3)
    for batch_size in (1, 4, 64):
        assert generate_k(tiny, tokenizer, PROMPTS, 2, config, batch_size=batch_size) == [[t, t] for t in one_each]


# ----------------------------------------------------------------------------------------------------------
# stopping: stop tokens, min_new_tokens, stop strings


def _greedy_with_stop_at_step(tiny, tokenizer, queries, query_mask, n, step):
    """A fixed-length greedy run and a token that greedy decoding emits in row 0 (first at index <= step)."""
    free = sample(tiny, queries, query_mask, _greedy(n, stop_at_eos=False), [], tokenizer.pad_token_id)
    stop = int(free.responses[0, step])
    return free, stop


def test_stop_token_ends_rows(tiny, tokenizer):
    """A stop token ends its row: mask True through it, pad after, finished set; fixed-length mode ignores it."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    n = 8
    free, stop = _greedy_with_stop_at_step(tiny, tokenizer, queries, query_mask, n, step=2)
    gen = sample(tiny, queries, query_mask, _greedy(n), [stop], tokenizer.pad_token_id)

    for i in range(len(PROMPTS)):
        k = _first_index(free.responses[i], stop)
        if i == 0:
            assert k is not None and k <= 2
        end = n if k is None else k + 1  # the stop token itself belongs to the response
        assert gen.response_mask[i, :end].all() and not gen.response_mask[i, end:].any()
        assert torch.equal(gen.responses[i, :end], free.responses[i, :end])
        assert (gen.responses[i, end:] == tokenizer.pad_token_id).all()
        assert (gen.logprobs[i, end:] == 0).all()
        assert bool(gen.finished[i]) == (k is not None)

    fixed = sample(tiny, queries, query_mask, _greedy(n, stop_at_eos=False), [stop], tokenizer.pad_token_id)
    assert fixed.response_mask.all()
    assert torch.equal(fixed.responses, free.responses)
    assert not fixed.finished.any()


def test_min_new_tokens_forbids_early_stop(tiny, tokenizer):
    """With min_new_tokens past the stop token's first greedy position, the stop token cannot appear before it."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    n = 8
    free, stop = _greedy_with_stop_at_step(tiny, tokenizer, queries, query_mask, n, step=2)
    k = _first_index(free.responses[0], stop)
    floor = k + 2
    gen = sample(tiny, queries, query_mask, _greedy(n, min_new_tokens=floor), [stop], tokenizer.pad_token_id)
    assert not (gen.responses[:, :floor] == stop).any()
    assert gen.response_mask[:, :floor].all()
    # The floor really acted: greedy wanted the stop token at k and had to pick something else.
    assert torch.equal(gen.responses[0, :k], free.responses[0, :k])
    assert int(gen.responses[0, k]) != stop


def test_min_new_tokens_logprobs_match_full_forward(tiny, tokenizer):
    """Under min_new_tokens, log-probs are still over the full vocabulary (what PPO's forward computes).

    The Generation docstring promises this, and PPO uses these log-probs as old_logprobs and against the
    reference's full-vocabulary log-probs; renormalising without the banned stop tokens would make the first
    ratio (1 - p_stop) instead of 1 and bias the KL penalty.
    """
    # Sharpen the random model so the stop token carries real probability where it is banned.
    with torch.no_grad():
        tiny.lm_head.weight.mul_(100.0)
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    n = 6
    free, stop = _greedy_with_stop_at_step(tiny, tokenizer, queries, query_mask, n, step=1)
    p_stop = _forward_logprobs(tiny, queries, query_mask, free.responses, free.response_mask, 1.0)[0, 1].exp()
    assert p_stop > 0.05, "precondition: the banned stop token must carry noticeable probability"

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, temperature=1.0, greedy=True)
    gen = sample(tiny, queries, query_mask, config, [stop], tokenizer.pad_token_id)
    expected = _forward_logprobs(tiny, queries, query_mask, gen.responses, gen.response_mask, 1.0)
    # 1e-4: the x100 logits scale float32 rounding up by as much; the bug this guards against is ~1 nat.
    torch.testing.assert_close(gen.logprobs, expected, atol=1e-4, rtol=0)


def test_stop_strings_cut_after_the_completing_token(tiny, tokenizer):
    """A stop string ends the response right after the token that completes it, even across a token boundary."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    n = 10
    free = sample(tiny, queries, query_mask, _greedy(n, stop_at_eos=False), [], tokenizer.pad_token_id)
    tokens = free.responses[0].tolist()

    def text(k):
        return tokenizer.decode(tokens[:k], skip_special_tokens=True)

    # A stop string made of the end of token j-1 and all of token j: only reaching token j completes it.
    for j in range(2, n):
        piece = text(j + 1)[len(text(j)) - 2 :]
        if len(piece) > 2 and text(j + 1).startswith(text(j)) and piece not in text(j):
            break
    else:
        pytest.fail(f"no usable stop string in greedy output {text(n)!r}")

    config = _greedy(n, stop_strings=[piece])
    gen = sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id, tokenizer=tokenizer)
    assert int(gen.response_mask[0].sum()) == j + 1
    assert bool(gen.finished[0])
    assert (gen.responses[0, j + 1 :] == tokenizer.pad_token_id).all()
    assert (gen.logprobs[0, j + 1 :] == 0).all()
    out = decode_responses(tokenizer, gen.responses, gen.response_mask)[0]
    assert piece.strip() in out
    assert piece not in tokenizer.decode(gen.responses[0, :j].tolist(), skip_special_tokens=True)
    # Rows that never produce the stop string are untouched.
    for i in range(1, len(PROMPTS)):
        if piece not in tokenizer.decode(free.responses[i].tolist(), skip_special_tokens=True):
            assert gen.response_mask[i].all() and not bool(gen.finished[i])

    with pytest.raises(ValueError):
        sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id)  # stop strings need the tokenizer


# ----------------------------------------------------------------------------------------------------------
# top-k, top-p and the sampler itself


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny, tokenizer):
    """top_k=1 sampling and nucleus sampling with a tiny top_p both reduce to greedy decoding."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    n = 8
    config = _greedy(n, temperature=1.0, stop_at_eos=False)
    greedy = sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        config = GenerationConfig(max_new_tokens=n, temperature=1.0, stop_at_eos=False, **kw)
        gen = sample(tiny, queries, query_mask, config, [], tokenizer.pad_token_id, torch.Generator().manual_seed(3))
        assert torch.equal(gen.responses, greedy.responses), kw
        # Log-probs are over the full vocabulary, not the truncated one.
        torch.testing.assert_close(gen.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


def test_sampler_matches_categorical():
    """_sample draws token i with probability p_i: frequencies within 5 binomial standard errors."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 200_000
    # Adding a constant to the logits must not matter (softmax is shift-invariant).
    logits = (probs.log() + 3.0).expand(n, -1).contiguous()
    draws = _sample(logits, torch.Generator().manual_seed(0))
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=4).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se).all(), (freq, probs)

    # Tokens at -inf (filtered out by top-k / top-p) are never drawn.
    masked = logits.clone()
    masked[:, 3] = -math.inf
    assert not (_sample(masked, torch.Generator().manual_seed(1)) == 3).any()
    # ... also inside the vocabulary, where the CDF has a flat step, and at its start.
    masked[:, 0] = -math.inf
    masked[:, 2] = -math.inf
    assert (_sample(masked, torch.Generator().manual_seed(2)) == 1).all()


# ----------------------------------------------------------------------------------------------------------
# validation and text in / text out


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_new_tokens=4, min_new_tokens=5),
        dict(min_new_tokens=-1),
        dict(top_k=-1),
    ],
)
def test_config_validation(kw):
    """Invalid generation settings are user errors, reported before any model runs."""
    with pytest.raises(UserError):
        GenerationConfig(**kw)


def test_encode_prompts_empty_is_user_error(tokenizer):
    """An empty prompt set is a user error, not an IndexError from max() deep inside."""
    with pytest.raises(UserError):
        encode_prompts(tokenizer, [])


def test_encode_prompts_left_pads_and_truncates_from_the_left(tokenizer):
    """Queries are left-padded with the pad id; max_prompt_length keeps each prompt's last tokens."""
    queries, query_mask = encode_prompts(tokenizer, PROMPTS)
    assert queries.dtype == torch.long and query_mask.dtype == torch.bool
    assert query_mask[:, -1].all()
    assert (queries[~query_mask] == tokenizer.pad_token_id).all()
    # Left padding: once a row's mask turns True it stays True.
    assert (query_mask.long().diff(dim=1) >= 0).all()
    short_q, short_m = encode_prompts(tokenizer, PROMPTS, max_prompt_length=5)
    assert short_q.shape == (len(PROMPTS), 5) and short_m.all()
    assert torch.equal(short_q, queries[:, -5:])


def test_generate_text_in_text_out(tiny, tokenizer):
    """generate() returns one string per prompt, across batches, and batching does not change greedy output."""
    config = _greedy(6)
    texts = generate(tiny, tokenizer, PROMPTS, config, batch_size=2)
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)
    one_by_one = generate(tiny, tokenizer, PROMPTS, config, batch_size=1)
    assert texts == one_by_one


def _model_with_positions(n: int):
    """Just enough of a model for the position checks: a config with a position table of n entries."""
    return SimpleNamespace(config=SimpleNamespace(n_positions=n))


def test_fit_positions_clips_prompts_from_the_left():
    """10 positions, 4 new tokens: room for 6 prompt tokens. Worked by hand on a left-padded (2, 8) batch."""
    model = _model_with_positions(10)
    assert prompt_room(model, 4) == 6 and prompt_room(_model_with_positions(10), 9) == 1
    queries = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 9, 9, 9]])
    query_mask = queries != 0
    with pytest.warns(UserWarning, match="prompts of up to 8 tokens plus 4 response tokens exceed the model's 10 "
                                         "positions: prompts keep their last 6 tokens"):  # fmt: skip
        clipped, clipped_mask = fit_positions(model, queries, query_mask, 4)
    assert clipped.tolist() == [[3, 4, 5, 6, 7, 8], [0, 0, 0, 9, 9, 9]]
    assert clipped_mask.tolist() == [[True] * 6, [False] * 3 + [True] * 3]
    # Dropping padding columns alone loses no prompt token: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipped, _ = fit_positions(model, queries[1:], query_mask[1:], 4)
    assert clipped.tolist() == [[0, 0, 0, 9, 9, 9]]
    # No position table (None): nothing to fit.
    assert fit_positions(SimpleNamespace(config=SimpleNamespace()), queries, query_mask, 4)[0] is queries


def test_responses_that_fill_the_position_table_are_a_user_error():
    for n in (10, 11):
        with pytest.raises(UserError, match="no room for a prompt in the model's 10 positions; ask for at most 9"):
            prompt_room(_model_with_positions(10), n)
