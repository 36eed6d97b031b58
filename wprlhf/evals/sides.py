"""A side: one response per prompt from one policy. Every evaluation samples its sides here and measures their KL
here, so `wprlhf eval`, the stories, compare and loop pipelines and `wprlhf task-eval` report the same quantity.

    side = sample_side("ppo", model, tokenizer, prompts, gen, seed)     # texts, sampled ids, finished flags
    kls = side_kl(side, model, start, tokenizer, prompts, gen)          # nats per response, k1 (Schulman 2020)

The prompts are bare: a policy asked with an instruction reads it through gen.instruction (`generation.instructed`),
and judges are given the same bare prompts.

A side read from a file (`wprlhf sample`, best-of-n) has texts only; its log-probs tokenize the text again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import masked_sum, pad_sequences
from ..forwards import policy_forward, sampling_floor
from ..generation import GenerationConfig, encode_prompts, fit_positions, generate, text_ids
from ..models import stop_token_ids


@dataclass
class Side:
    """One response per prompt, in the prompts' order.

    texts: the responses as text (stop tokens and padding dropped). ids: per response, the sampled token ids with
    the stop token where it stopped (its term belongs to the KL; text has lost it); None for a side known only as
    text. finished: per response, whether it ended with a stop token (False: cut at the cap); None where unknown."""

    name: str
    texts: list[str]
    ids: list[list[int]] | None = None
    finished: list[bool] | None = field(default=None, repr=False)

    @property
    def responses(self) -> Sequence[str] | Sequence[Sequence[int]]:
        """What its log-probs are taken of: the sampled ids where known, else the text."""
        return self.ids if self.ids is not None else self.texts


def sample_side(name: str, model, tokenizer, prompts: list[str], gen: GenerationConfig, seed: int,
                batch_size: int = 16, chat_template: bool = True, progress: bool = True) -> Side:  # fmt: skip
    """`model`'s response to each of `prompts` (read after gen.instruction), sampled with `gen` from a generator
    seeded with `seed` (`generation.generate`), keeping the sampled ids and finished flags. chat_template False
    feeds the prompts as plain text to be continued (the review tasks)."""
    ids: list[list[int]] = []
    finished: list[bool] = []
    texts = generate(model, tokenizer, prompts, gen, batch_size=batch_size, seed=seed, chat_template=chat_template,
                     progress=progress, finished=finished, ids=ids)  # fmt: skip
    return Side(name, texts, ids, finished)


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[str], responses: Sequence[str] | Sequence[Sequence[int]],
                      temperature: float, batch_size: int = 16, chat_template: bool = True,
                      min_response_length: int = 0, progress: bool = False, instruction: str = "") -> np.ndarray:  # fmt: skip
    """Sum over each response's tokens of log p(token | instruction and prompt, earlier tokens) at `temperature`
    -> (N,) nats, through `forwards.policy_forward`, the forward PPO's log-probs come from.

    min_response_length: the sampler forbade end-of-turn before this many tokens, so those positions are scored
    under the distribution it sampled from (stop tokens masked, the rest renormalised: `forwards.sampling_floor`,
    as PPO scores them); the difference of two models' sums is then the KL estimate k1 of what each would sample.
    responses: token ids (`Side.ids`), or text, tokenized again (the same tokenizer gives back its tokens except at
    rare merges; the stop token is lost).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    floor = sampling_floor(min_response_length, True, stop_token_ids(tokenizer))
    out: list[float] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="log-probs", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        ids = [torch.tensor((text_ids(tokenizer, [r])[0] if isinstance(r, str) else list(r)) or [tokenizer.pad_token_id],
                            dtype=torch.long) for r in responses[chunk]]  # fmt: skip
        tokens, response_mask = (x.to(device) for x in pad_sequences(ids, tokenizer.pad_token_id, side="right"))
        query_ids, query_mask = encode_prompts(tokenizer, prompts[chunk], None, chat_template, instruction)
        # The prompts the sampler read, clipped as it clipped them (`generate` -> `fit_positions`).
        query_ids, query_mask = fit_positions(model, query_ids, query_mask, tokens.shape[1])
        logprobs = policy_forward(model, query_ids.to(device), query_mask.to(device), tokens, response_mask,
                                  temperature, **floor)[0]  # (B, Tr)
        out += masked_sum(logprobs, response_mask, dim=1).tolist()
    return np.asarray(out)


def side_logprobs(side: Side, model, tokenizer, prompts: list[str], gen: GenerationConfig, batch_size: int = 16,
                  chat_template: bool = True, progress: bool = True) -> np.ndarray:  # fmt: skip
    """(N,) summed log-probs of a side's responses under `model` given `prompts` read after gen.instruction, at the
    sampling temperature and under the sampler's floor (`response_logprobs`)."""
    return response_logprobs(model, tokenizer, prompts, side.responses, gen.temperature, batch_size, chat_template,
                             gen.min_new_tokens, progress, gen.instruction)  # fmt: skip


def side_kl(side: Side, model, reference, tokenizer, prompts: list[str], gen: GenerationConfig,
            reference_instruction: str | None = None, batch_size: int = 16, chat_template: bool = True,
            progress: bool = True) -> list[float]:  # fmt: skip
    """Per response, log model(y | instruction, prompt) - log reference(y | reference's instruction, prompt) summed
    over y's tokens: the k1 estimate of KL(model || reference) in nats per response, for a side sampled from
    `model` (Schulman 2020, "Approximating KL divergence"). reference_instruction: what the reference reads before
    each prompt instead of gen.instruction (None = the same), for comparing two whole systems (`wprlhf eval
    --against-instruction`)."""
    own = side_logprobs(side, model, tokenizer, prompts, gen, batch_size, chat_template, progress)
    ref_gen = gen if reference_instruction is None else dataclasses.replace(gen, instruction=reference_instruction)
    ref = side_logprobs(side, reference, tokenizer, prompts, ref_gen, batch_size, chat_template, progress)
    return (own - ref).tolist()
