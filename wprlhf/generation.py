"""KV-cached batched sampling: left-padded queries -> responses, response_mask, logprobs, finished.

The policy's text becomes padded tensors in two places: here (`encode_prompts`: left-padded queries, for sampling,
PPO rollouts and evaluation) and in `sft.collate` (right-padded training rows); ppo.py re-pads sampled token rows
with `core.pad_sequences`, as `encode_prompts` does. The encoders that score text (`reward_model.encode`, the
classifier, the relevance labeler) let their own tokenizer pad each batch and pass on its attention_mask.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core import logprobs_from_logits, pad_sequences, position_ids_from_mask
from .errors import UserError
from .files import write_text_atomic
from .models import position_limit, stop_token_ids


# The share of a sampling batch that must have finished before the finished rows leave it (`sample`).
DROP_FINISHED = 0.125


@dataclass
class GenerationConfig:
    """How responses are sampled."""

    max_new_tokens: int = 64
    """Response length cap, in tokens. Prompt and response share the model's positions: prompts that would not
    leave room for max_new_tokens lose their first tokens (`fit_positions`), and max_new_tokens must stay below
    the model's position count."""
    min_new_tokens: int = 0
    """Stop tokens are forbidden before this many tokens (a floor on response length)."""
    temperature: float = 0.7
    """Softmax temperature. PPO's log-probs are taken at this same temperature, so ratios start at 1."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = full vocabulary)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    stop_at_eos: bool = True
    """Stop a row at its first stop token. False = fixed-length mode: every row gets max_new_tokens (benchmarks)."""
    stop_strings: tuple[str, ...] = ()
    """Extra strings that end a response (the mask is cut after the token that completes one); off in fixed-length mode."""
    greedy: bool = False
    """Argmax instead of sampling (evaluation, tests). The temperature then only scales the logged log-probs; a
    temperature of 0 is read as 1 there."""
    instruction: str = ""
    """What the policy reads before each prompt, with a blank line ('' = the bare prompt): it joins the prompt where
    the prompt is tokenized (`encode_prompts`), so rewards and judges, which are given the prompts, read them bare."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(f"min_new_tokens {self.min_new_tokens} must lie in [0, max_new_tokens]")
        if self.greedy and self.temperature == 0:
            self.temperature = 1.0  # argmax needs no temperature; the log-probs are those of the model as it is
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise UserError(f"temperature must be a finite number > 0, got {self.temperature}; for the most likely "
                            "token at every step use --greedy")  # fmt: skip
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = full vocabulary), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}")
        self.stop_strings = tuple(self.stop_strings)

    @property
    def fixed_length(self) -> bool:
        """Every response runs to max_new_tokens by design: no stop, or none allowed before the cap."""
        return not self.stop_at_eos or self.min_new_tokens >= self.max_new_tokens


# PPO's names for the sampling settings (PPOConfig, LoopConfig, `wprlhf task-eval`) -> GenerationConfig's
SAMPLING_FIELDS = {"response_length": "max_new_tokens", "min_response_length": "min_new_tokens",
                   "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "stop_at_eos": "stop_at_eos",
                   "instruction": "instruction"}  # fmt: skip


def generation_config(config=None, **settings) -> GenerationConfig:
    """The GenerationConfig of a run's config, in PPO's names (`SAMPLING_FIELDS`): response_length,
    min_response_length, temperature, top_k, top_p, stop_at_eos, instruction, taken from `config` (a PPOConfig, a LoopConfig)
    where it has them and from keyword `settings`, which win; what neither gives keeps GenerationConfig's default.

    >>> g = generation_config(response_length=24, min_response_length=8)
    >>> g.max_new_tokens, g.min_new_tokens, g.temperature
    (24, 8, 0.7)
    """
    unknown = sorted(set(settings) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"generation_config() got unknown settings {unknown}; it takes {list(SAMPLING_FIELDS)}")
    values = {name: getattr(config, name) for name in SAMPLING_FIELDS if hasattr(config, name)}
    values.update(settings)
    return GenerationConfig(**{SAMPLING_FIELDS[name]: value for name, value in values.items()})


@dataclass
class Generation:
    """Sampled responses for a batch of queries (B rows; B = queries x num_samples, each query's rows adjacent).

    responses (B, Tr) int64: sampled tokens, pad after a row ends;
    response_mask (B, Tr) bool: True up to and including the stop token;
    logprobs (B, Tr) float32: log-prob of each sampled token under softmax(logits / temperature) over the full
      vocabulary (what PPO's training forward computes; top-k/top-p truncation is not reflected), 0 on pads.
      Under min_new_tokens they are not those of the distribution sampled from (stop tokens masked): PPO and
      evaluation (`sides.response_logprobs`) then recompute them with `forwards.sampling_floor`;
    finished (B,) bool: the row ended with a stop token or stop string (False = cut at max_new_tokens).
    """

    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor


def instruction_head(instruction: str) -> str:
    """What a query starts with when the task asks for something in words: the instruction and a blank line ('' for
    no instruction). The one place the form is written: `encode_prompts` and `chat_ids` put it before each prompt
    they tokenize; reward models and judges read the prompt without it."""
    return f"{instruction}\n\n" if instruction.strip() else ""  # white space alone asks for nothing


def instructed(prompts: list[str], instruction: str) -> list[str]:
    """The text the policy reads for each prompt: `instruction_head(instruction) + prompt`."""
    head = instruction_head(instruction)
    return [head + p for p in prompts]


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    """Whether prompts go through the chat template: it is asked for and the tokenizer has one."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, prompt: str, response: str | None = None) -> str:
    """The chat template's text of [user: prompt] with the assistant's turn opened, where sampling continues
    (response None); or of [user: prompt, assistant: response], the conversation SFT trains on. For reading and
    logging; token ids come from `chat_ids`, which keeps the prompt's and the response's text as text."""
    turns = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Data text (prompts, responses, stories, labeled texts) -> token ids, no special tokens added, and none parsed.

    A story that spells `<|im_end|>` or `<|endoftext|>` gets the ids of those characters, not the control ids: only
    the chat template and the code put a stop or turn marker into a sequence, so nothing trains past a stop that
    the sampler would never cross, and a prompt cannot open a chat turn of its own.
    """
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


# Stand-ins for the prompt and the response while the template is rendered: private-use characters that no data
# text is expected to hold (a text that holds one is refused), so the template's own pieces can be cut out.
_PROMPT_SLOT, _RESPONSE_SLOT = "\ue000", "\ue001"


def _template_pieces(tokenizer, with_response: bool) -> list[str]:
    """The chat template's text around its slots: [before the prompt, after it] for sampling (the assistant's
    turn opened), or [before the prompt, between prompt and response, after the response] for a whole turn."""
    rendered = apply_chat_template(tokenizer, _PROMPT_SLOT, _RESPONSE_SLOT if with_response else None)
    head, sep, rest = rendered.partition(_PROMPT_SLOT)
    pieces = [head, *rest.split(_RESPONSE_SLOT)] if with_response else [head, rest]
    if not sep or len(pieces) != (3 if with_response else 2) or _PROMPT_SLOT in rest:
        raise UserError("this model's chat template does not place the prompt (and the response) once each, as "
                        "written, so their text cannot be kept apart from the template's markers; pass "
                        "--no-chat-template to use plain text")  # fmt: skip
    return pieces


def template_markers(tokenizer) -> list[str]:
    """The special tokens the chat template writes around a turn (`<|im_start|>`, `<|im_end|>` for SmolLM2)."""
    rendered = "".join(_template_pieces(tokenizer, with_response=True))
    return [t for t in tokenizer.all_special_tokens if t in rendered]


def check_bare_prompts(tokenizer, prompts: list[str], chat_template: bool = True) -> None:
    """Refuse prompts already written in the chat template (when it is used): wrapped again, they would put a
    system turn twice and a user turn inside a user turn. UserError naming the first such prompt (its place in the
    list, counting from 0) and the fix. Runs check the whole set before any work; `chat_ids` checks each batch."""
    if not uses_chat_template(tokenizer, chat_template):
        return
    markers = template_markers(tokenizer) + [_PROMPT_SLOT, _RESPONSE_SLOT]
    for i, prompt in enumerate(prompts):
        if found := [m for m in markers if m in prompt]:
            names = ", ".join(f"U+{ord(m):04X}" if m in (_PROMPT_SLOT, _RESPONSE_SLOT) else m for m in found)
            raise UserError(f"prompt {i} already holds the chat template's markup ({names}): {prompt[:80]!r}; pass "
                            "the bare prompt (the template is applied here), or --no-chat-template to send prompts "
                            "exactly as written, markup included")  # fmt: skip


def check_instruction(tokenizer, instruction: str, chat_template: bool = True) -> None:
    """Refuse an instruction written in the chat template's markup (`check_bare_prompts`' rule), naming
    --instruction: runs check it before any work, not when the first prompt is tokenized an hour later."""
    try:
        check_bare_prompts(tokenizer, [instruction], chat_template)
    except UserError:
        raise UserError(f"--instruction holds the chat template's markup: {instruction[:80]!r}; give it as plain text "
                        "(the template is applied around instruction and prompt here)") from None


def chat_ids(tokenizer, prompts: list[str], responses: list[str] | None = None,
             instruction: str = "") -> list[list[int]] | tuple:  # fmt: skip
    """Token ids of [user: prompt] in the chat template with the assistant's turn opened (responses None), or
    (prompt_ids, completion_ids) of [user: prompt, assistant: response]: the completion is the response's tokens
    and the template's end of turn (trailing whitespace dropped), what SFT and DPO train on. The user's turn is
    `instructed(prompts, instruction)`.

    The template's pieces and the data's text are tokenised apart (`text_ids`), so special ids appear only where
    the template puts them. Prompts already in the template are refused (`check_bare_prompts`).
    """
    prompts = instructed(prompts, instruction)
    check_bare_prompts(tokenizer, prompts)
    markup = lambda piece: tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []  # noqa: E731
    if responses is None:
        head, tail = (markup(p) for p in _template_pieces(tokenizer, with_response=False))
        return [head + ids + tail for ids in text_ids(tokenizer, prompts)]
    gen_head, gen_tail = _template_pieces(tokenizer, with_response=False)
    head, between, end = _template_pieces(tokenizer, with_response=True)
    if head != gen_head or not between.startswith(gen_tail):
        raise UserError("this model's chat template does not write a conversation as its prompt followed by the "
                        "answer (it may rewrite earlier turns), so the story's tokens cannot be told apart; pass "
                        "--no-chat-template to train on plain text")  # fmt: skip
    # The prompt ends as sampling sees it; what the template adds before a written answer opens the completion.
    head_ids, tail_ids = markup(head), markup(gen_tail)
    opening, end_ids = markup(between[len(gen_tail) :]), markup(end.rstrip())
    prompt_ids = [head_ids + ids + tail_ids for ids in text_ids(tokenizer, prompts)]
    return prompt_ids, [opening + ids + end_ids for ids in text_ids(tokenizer, responses)]


def encode_prompts(
    tokenizer, prompts: list[str], max_prompt_length: int | None = None, chat_template: bool = True,
    instruction: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> left-padded queries (B, Tq) and query_mask (B, Tq) bool, each prompt read after the instruction
    (`instructed`; '' = the bare prompt).

    Uses the tokenizer's chat template when it has one and chat_template is True (`chat_ids`: the prompt's text
    stays text; a prompt already in the template is refused). Long prompts keep their last max_prompt_length tokens (the end
    holds the assistant header that the response continues from).
    """
    if not prompts:
        raise UserError("no prompts to encode: the prompt set is empty")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    prompts = instructed(prompts, instruction)
    use_template = uses_chat_template(tokenizer, chat_template)
    # Without the template the prompt is the whole input, markup included if the user wrote some, read as the
    # tokenizer reads text (its usual leading tokens added); with it, the prompt's text stays text (`chat_ids`).
    ids = chat_ids(tokenizer, prompts) if use_template else tokenizer(prompts, add_special_tokens=True)["input_ids"]
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise UserError(f"prompt {i} encodes to no tokens: {prompts[i]!r}")
    return pad_sequences([torch.tensor(row, dtype=torch.long) for row in ids], tokenizer.pad_token_id, side="left")


def prompt_room(model: nn.Module, max_new_tokens: int) -> int | None:
    """Most prompt tokens that leave room for max_new_tokens in the model's positions (None: no limit).

    Raises UserError when not even a one-token prompt fits, before any sampling or training has been done.
    """
    limit = position_limit(model)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise UserError(f"responses of up to {max_new_tokens} tokens leave no room for a prompt in the model's "
                        f"{limit} positions; ask for at most {limit - 1} new tokens (--response-length or "
                        "--max-new-tokens)")  # fmt: skip
    return limit - max_new_tokens


def fit_positions(
    model: nn.Module, queries: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip left-padded queries from the left so each prompt plus max_new_tokens fits the model's positions.

    queries (B, Tq) int64, query_mask (B, Tq) bool -> the last min(Tq, room) columns of both, room =
    prompt_room(model, max_new_tokens). A prompt keeps its end, where the chat template's assistant header sits
    (as with max_prompt_length). Warns when a prompt loses tokens; UserError when max_new_tokens alone is too many.
    Sampling and PPO's forwards must then read these same clipped queries.
    """
    room = prompt_room(model, max_new_tokens)
    if room is None or queries.shape[1] <= room:
        return queries, query_mask
    longest = int(query_mask.sum(1).max())
    if longest > room:
        warnings.warn(f"prompts of up to {longest} tokens plus {max_new_tokens} response tokens exceed the model's "
                      f"{room + max_new_tokens} positions: prompts keep their last {room} tokens (lower "
                      "--max-prompt-length to silence this)", stacklevel=2)  # fmt: skip
    return queries[:, -room:], query_mask[:, -room:]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _sample(logits: torch.Tensor, generator: torch.Generator | None, rows: torch.Tensor | None = None,
            total: int | None = None) -> torch.Tensor:  # fmt: skip
    """One token per row from softmax(logits). (B, V) -> (B,).

    Inverse-CDF sampling with one uniform draw per row: token = first index whose cumulative probability
    exceeds u. Drawing one random number per vocabulary entry (torch.multinomial's approach on CPU) costs more
    than the rest of a small model's step. float64 keeps the cumulative sum exact enough over 50k entries;
    zero-probability tokens (filtered by top-k/top-p) have flat CDF steps and can never be chosen.
    rows (B,), total: the logits are rows `rows` of a batch of `total` (finished rows dropped, see `sample`): the
    draw is still made for all `total` rows, so a row's noise does not depend on which others have finished.
    """
    cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)  # (B, V)
    n = logits.shape[0] if rows is None else total
    u = torch.rand((n, 1), generator=generator, dtype=torch.float64, device=logits.device)
    u = u if rows is None else u[rows]
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return tokens.clamp(max=logits.shape[-1] - 1)


def _rows_copyable(cache) -> bool:
    """Whether `cache.batch_repeat_interleave` copies everything a layer keeps: true of key/value layers, not of a
    hybrid model's recurrent or convolutional state (transformers 5.23 leaves it at the old batch size)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


# no_grad, not inference_mode: under autocast, a weight that requires grad (not a LoRA run's frozen base) is cast to
# bf16 once and the cast is reused for the rest of the autocast block, so a bf16 run's decoding steps read half the
# bytes of fp32 weights. Autocast keeps no such cache in inference mode (torch 2.13; older versions did): there every
# step would cast every weight again.
@torch.no_grad()
def sample(model: nn.Module, queries: torch.Tensor, query_mask: torch.Tensor, config: GenerationConfig,
           stop_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None, tokenizer=None,
           num_samples: int = 1) -> Generation:  # fmt: skip
    """Sample responses with a KV cache: one forward over the queries, then one single-token forward per step.

    queries (B, Tq) int64, left-padded; query_mask (B, Tq) bool. `generator` seeds the sampling noise.
    `tokenizer` is needed only for stop_strings. Each prompt plus max_new_tokens must fit the model's positions
    (clip with `fit_positions` first); otherwise UserError before any forward.

    num_samples > 1 answers each query num_samples times: the Generation has B * num_samples rows, rows
    i * num_samples .. (i + 1) * num_samples - 1 answering query i. The queries' forward (the prefill) runs once
    and its KV cache is copied to their rows, instead of running it on num_samples copies of each query (the
    pools of best-of-n and DPO draw 16 responses of 64 tokens to prompts of about 90).
    """
    from transformers import DynamicCache

    _check_room(model, query_mask, config, num_samples)
    B = queries.shape[0] * num_samples
    device = queries.device
    stops = torch.tensor(stop_token_ids or [-1], device=device)
    cache = DynamicCache(config=model.config)
    if num_samples > 1 and not _rows_copyable(cache):
        queries, query_mask = queries.repeat_interleave(num_samples, 0), query_mask.repeat_interleave(num_samples, 0)
        num_samples = 1
    attention_mask = query_mask.long()
    position_ids = position_ids_from_mask(query_mask)

    responses = torch.full((B, config.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, config.max_new_tokens), dtype=torch.float32, device=device)
    response_mask = torch.zeros((B, config.max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    # Prefill: logits only at the last position; the (B, Tq, V) logits of the prompt are never needed.
    out = model(
        input_ids=queries, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    next_logits = out.logits[:, -1, :]
    next_position = position_ids[:, -1:] + 1
    if num_samples > 1:  # each query's row -> num_samples rows, adjacent: (B / num_samples, ...) -> (B, ...)
        cache.batch_repeat_interleave(num_samples)
        next_logits, next_position, attention_mask = (x.repeat_interleave(num_samples, 0)
                                                      for x in (next_logits, next_position, attention_mask))  # fmt: skip
    rows = torch.arange(B, device=device)  # the rows still in the batch (finished ones leave it, see below)
    compactable = _rows_copyable(cache)
    for t in range(config.max_new_tokens):
        logits = next_logits.float() / config.temperature  # (b, V), b = len(rows)
        # A non-finite row (NaN logits, or logits / T past float32 at a tiny T) has no distribution to draw from:
        # inverse-CDF sampling would return the last id over and over. Noted on the device (no sync per step) and
        # refused below, before any token leaves this function.
        nonfinite |= ~torch.isfinite(logits.amax(-1)).all()
        tokens = _next_tokens(logits, config, t, stops, generator, rows, B)
        alive = ~finished[rows]
        responses[rows, t] = torch.where(alive, tokens, pad_token_id)
        logprobs[rows, t] = torch.where(alive, logprobs_from_logits(logits, tokens), 0.0)
        response_mask[rows, t] = alive
        if config.stop_at_eos:
            finished[rows] = finished[rows] | (alive & torch.isin(tokens, stops))
            # One sync per step to skip the remaining steps once every row is done.
            left = int((~finished[rows]).sum())
            if left == 0:
                break
            # Whole responses end at different lengths, and a batch otherwise keeps stepping its finished rows
            # until the longest one ends. Once DROP_FINISHED of the batch has finished, those rows leave it (their
            # KV cache too): one copy of the cache, against every later step's work on rows nobody reads.
            if compactable and len(rows) - left >= DROP_FINISHED * len(rows):
                keep = (~finished[rows]).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, tokens, attention_mask, next_position = (x[keep] for x in (rows, tokens, attention_mask,
                                                                                next_position))  # fmt: skip
        if t + 1 == config.max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones((len(rows), 1), dtype=attention_mask.dtype,
                                                               device=device)], 1)  # fmt: skip
        out = model(
            input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        next_logits = out.logits[:, -1, :]
        next_position = next_position + 1

    if bool(nonfinite):
        raise UserError(f"the policy's next-token distribution was not finite (NaN logits, or logits / temperature "
                        f"overflowing at temperature {config.temperature}); use --greedy for the most likely token, a "
                        "temperature of 0.1 or more, or check the model's weights")  # fmt: skip
    return _cut_at_stop_strings(Generation(responses, response_mask, logprobs, finished), config, tokenizer,
                                pad_token_id)  # fmt: skip


def _check_room(model: nn.Module, query_mask: torch.Tensor, config: GenerationConfig, num_samples: int) -> None:
    """UserError, before any forward, for a prompt that leaves no room for max_new_tokens in the model's positions
    (not clipped here: the caller's later forwards, PPO's log-probs and the KL, must see the queries sampling saw)."""
    room = prompt_room(model, config.max_new_tokens)
    longest = int(query_mask.sum(1).max())
    if room is not None and longest > room:
        raise UserError(f"a prompt of {longest} tokens plus {config.max_new_tokens} response tokens exceeds the "
                        f"model's {room + config.max_new_tokens} positions; clip the queries with "
                        "generation.fit_positions or lower --max-prompt-length")  # fmt: skip
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")


def _next_tokens(logits: torch.Tensor, config: GenerationConfig, t: int, stops: torch.Tensor,
                 generator: torch.Generator | None, rows: torch.Tensor | None = None,
                 total: int | None = None) -> torch.Tensor:  # fmt: skip
    """The tokens (B,) chosen at step t from logits (B, V) already divided by the temperature: stop tokens are
    forbidden before min_new_tokens, then the argmax (greedy) or a draw after top-k / top-p (rows, total: see
    `_sample`). Only the choice is restricted: the log-probs stay those of the full distribution (see Generation)."""
    allowed = logits
    if config.stop_at_eos and t < config.min_new_tokens:
        allowed = logits.clone()
        allowed[:, stops[stops >= 0]] = -math.inf
    if config.greedy:
        return allowed.argmax(-1)
    return _sample(_filter_logits(allowed, config.top_k, config.top_p), generator, rows, total)


def _cut_at_stop_strings(gen: Generation, config: GenerationConfig, tokenizer, pad_token_id: int) -> Generation:
    """End each row after the first token whose decoded prefix contains one of config.stop_strings (binary search);
    `gen` as it is without stop strings or in fixed-length mode (stop_at_eos False)."""
    stop_strings = config.stop_strings
    if not stop_strings or not config.stop_at_eos:
        return gen
    if tokenizer is None:
        raise ValueError("stop_strings need the tokenizer passed to sample()")
    responses, mask, logprobs, finished = (x.clone() for x in (gen.responses, gen.response_mask, gen.logprobs, gen.finished))
    for i in range(responses.shape[0]):
        n = int(mask[i].sum())
        tokens = responses[i, :n].tolist()

        def has_stop(k: int, tokens=tokens) -> bool:
            text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
            return any(s in text for s in stop_strings)

        if n == 0 or not has_stop(n):
            continue
        lo, hi = 1, n  # smallest k with has_stop(k)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        mask[i, lo:] = False
        responses[i, lo:] = pad_token_id
        logprobs[i, lo:] = 0.0
        finished[i] = True
    return Generation(responses, mask, logprobs, finished)


def decode_responses(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response tokens -> text, without stop tokens or padding. (B, Tr) -> list of B strings."""
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(responses, response_mask)
    ]


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    batch_size: int = 16,
    seed: int = 0,
    max_prompt_length: int | None = None,
    chat_template: bool = True,
    progress: bool = False,
    num_samples: int = 1,
    finished: list[bool] | None = None,
    ids: list[list[int]] | None = None,
) -> list[str]:
    """Text in, text out: sample num_samples responses per prompt, in batches of at most batch_size responses
    (batch_size // num_samples prompts; where num_samples > batch_size, a prompt's copies batch_size at a time).
    For `wprlhf sample` and evaluation. Returns len(prompts) * num_samples strings, prompt i's at
    i * num_samples .. (i + 1) * num_samples - 1.

    Prompts keep their last max_prompt_length tokens, and fewer where prompt + response would exceed the model's
    positions (`fit_positions`). A list passed as `finished` receives, per response, whether it ended with a stop
    token (False: cut at max_new_tokens); one passed as `ids`, its sampled token ids, the stop token included (the
    text drops it, and a KL needs its term)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1 (responses sampled at once), got {batch_size}; set --batch-size")
    prompt_room(model, config.max_new_tokens)  # a response too long for the model fails before any sampling
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if num_samples > batch_size:  # one prompt's samples overfill a batch: sample its copies batch_size at a time
        prompts, num_samples = [p for p in prompts for _ in range(num_samples)], 1
    per_batch = batch_size // num_samples
    texts = []
    for start in tqdm(range(0, len(prompts), per_batch), desc="sampling", disable=not progress, unit="batch"):
        queries, query_mask = encode_prompts(tokenizer, prompts[start : start + per_batch], max_prompt_length,
                                             chat_template, config.instruction)  # fmt: skip
        queries, query_mask = fit_positions(model, queries, query_mask, config.max_new_tokens)
        gen = sample(
            model, queries.to(device), query_mask.to(device), config, stop_token_ids(tokenizer),
            tokenizer.pad_token_id, generator, tokenizer, num_samples=num_samples,
        )  # fmt: skip
        texts.extend(decode_responses(tokenizer, gen.responses, gen.response_mask))
        if finished is not None:
            finished.extend(gen.finished.tolist())
        if ids is not None:
            ids.extend(row[mask].tolist() for row, mask in zip(gen.responses, gen.response_mask))
    return texts


def generate_k(model: nn.Module, tokenizer, prompts: list[str], k: int, config: GenerationConfig, **kwargs) -> list[list[str]]:
    """k responses per prompt, (P, k) nested lists: `generate` with num_samples=k, so each prompt's forward runs
    once for its k responses. Keyword arguments go to `generate` (batch_size counts responses; `finished` gets
    P * k flags in the same order)."""
    texts = generate(model, tokenizer, prompts, config, num_samples=k, **kwargs)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def write_samples(path: str | Path, prompts: list[str], responses: list[list[str]], policy: str,
                  finished: list[list[bool]] | None = None) -> None:  # fmt: skip
    """The samples JSONL that labeling reads: {"prompt", "responses": [...], "policy"} a line, written atomically;
    with `finished` (per response: ended with a stop token, not cut at the cap) a "finished": [...] list too."""
    rows = [{"prompt": p, "responses": rs, "policy": policy} for p, rs in zip(prompts, responses)]
    for row, done in zip(rows, finished or []):
        row["finished"] = [bool(x) for x in done]
    lines = [json.dumps(row) for row in rows]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
