"""The forward passes every trainer and judge shares: response log-probs, entropy and values of (query, response).

Queries are left-padded and responses right-padded, as the sampler returns them; one position id per real token,
so padding never moves a token (learned absolute positions, GPT-2, as well as RoPE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .core import logprobs_and_entropy, position_ids_from_mask
from .models import ValueHead, lm_parts, token_values


def model_inputs(queries, query_mask, responses, response_mask):
    """(input_ids, attention_mask, position_ids), each (B, Tq + Tr), for a forward over query + response."""
    input_ids = torch.cat([queries, responses], dim=1)  # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return input_ids, attention_mask.long(), position_ids_from_mask(attention_mask)


def sampling_floor(min_new_tokens: int, stop_at_eos: bool, stop_token_ids: Sequence[int]) -> dict:
    """policy_forward's keyword arguments that score responses under the distribution the sampler drew from when it
    forbade stop tokens before min_new_tokens (`GenerationConfig.min_new_tokens`, PPO's min_response_length); {} when
    it forbade none (min_new_tokens 0, fixed-length mode, no stop token), which leaves the log-probs as they were."""
    if min_new_tokens <= 0 or not stop_at_eos or not stop_token_ids:
        return {}
    return {"stop_token_ids": tuple(stop_token_ids), "min_new_tokens": int(min_new_tokens)}


def policy_forward(
    policy: nn.Module,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
    stop_token_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the responses under `policy`, the shared value head's values, and optionally entropy.

    queries (B, Tq) left-padded, query_mask (B, Tq) bool; responses (B, Tr), response_mask (B, Tr) bool.
    Returns logprobs (B, Tr), values (B, Tr) or None (no value_head), entropy (B, Tr) or None.
    Position t of each output belongs to response token t: it is read from the state just before that token.
    stop_token_ids, min_new_tokens (`sampling_floor`): log-probs under the distribution sampled from, stop tokens
    masked while t < min_new_tokens (`core.logprobs_and_entropy`).
    """
    floor = {"stop_token_ids": stop_token_ids, "min_new_tokens": min_new_tokens}
    Tr = responses.shape[1]
    input_ids, attention_mask, position_ids = model_inputs(queries, query_mask, responses, response_mask)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    parts = lm_parts(policy)
    if parts is not None:
        backbone, head = parts
        # The states at Tq-1 .. Tq+Tr-2 predict response tokens 0 .. Tr-1. 1/T goes on the H-wide states, not on
        # the V-wide logits ((h/T)W = (hW)/T): two fewer passes over a (B, Tr, 49k) tensor, forward and backward.
        hidden = backbone(**inputs).last_hidden_state[:, -Tr - 1 : -1]  # (B, Tr, H)
        logits = head(hidden / temperature if temperature != 1.0 else hidden)  # (B, Tr, V)
        logprobs, entropy = logprobs_and_entropy(logits, responses, 1.0, with_entropy, **floor)
    else:
        out = policy(**inputs, logits_to_keep=Tr + 1, output_hidden_states=value_head is not None)
        hidden = out.hidden_states[-1][:, -Tr - 1 : -1] if value_head is not None else None
        logprobs, entropy = logprobs_and_entropy(out.logits[:, :-1], responses, temperature, with_entropy, **floor)
    values = None if value_head is None else value_head(hidden).float()
    return logprobs, values, entropy


def value_forward(value_model: nn.Module, queries, query_mask, responses, response_mask) -> torch.Tensor:
    """A separate value model's estimate before each response token. Same inputs as policy_forward -> (B, Tr)."""
    Tr = responses.shape[1]
    input_ids, attention_mask, position_ids = model_inputs(queries, query_mask, responses, response_mask)
    return token_values(value_model, input_ids, attention_mask, position_ids)[:, -Tr - 1 : -1]
