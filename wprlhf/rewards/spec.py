"""Turn a reward SPEC into a reward_fn(prompts, responses) -> list[float]: the one resolver of reward specs.

`wprlhf ppo --reward SPEC`, `wprlhf loop --judge SPEC` and `--labeler sim:SPEC` all read a SPEC here. A SPEC is a
term or a weighted sum of terms (`0.7*sentiment+0.3*relevance`, `length+0.5*rm:runs/rm`); a term is
- a built-in: `vowels`, `length` (toys with a known optimum), `sentiment` (VADER compound, -1..1), `relevance`
  (cosine of MiniLM embeddings of prompt and response, -1..1), `story` (1 for a story by the rule of
  `judges.story_verdict`, else 0; the judges live in `rewards/judges.py`) or `repetition` (the share of a response's
  word 4-grams that repeat an earlier one, 0..1: a loop's cost, weighted below zero, `...+-2*repetition`);
- `rm:DIR`, a reward model trained by `wprlhf rm train`;
- `module:function` or `path/to/file.py:function`, the user's own code.
A leading `sim:` (the loop's name for a simulated labeler) is ignored. Every reward in wprlhf has that one
signature, `signatures.RewardFn`, whatever computes it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import UserError
from ..signatures import RewardFn
from ..text import repeated_share
from .judges import Relevance, sentiment, story


def vowels(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of vowels among a response's letters (0 for no letters). English text sits near 0.38; the
    optimum, 1, is far from any start, which makes it a good test that PPO learns."""
    out = []
    for text in responses:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out


def length(prompts: list[str], responses: list[str]) -> list[float]:
    """Words in the response divided by 100, capped at 1: rewards writing more, up to a short story opening."""
    return [min(len(text.split()) / 100, 1.0) for text in responses]


def repetition(prompts: list[str], responses: list[str]) -> list[float]:
    """Share (0..1) of each response's word 4-grams that repeat an earlier one (`text.repeated_share`): 0 for
    prose that never loops, 0.79 for 'the end of' said six times. A penalty: give it a negative weight."""
    return [repeated_share(text, 4) for text in responses]


BUILTIN: dict[str, RewardFn | type] = {"vowels": vowels, "length": length, "sentiment": sentiment,
                                       "relevance": Relevance, "story": story, "repetition": repetition}  # fmt: skip
"""Built-in terms: a function, or a class whose instance is one (a fresh one per SPEC; its model loads on first use)."""

EXAMPLES = "0.7*sentiment+0.3*relevance"


def _load_attr(module, attr: str, spec: str, what: str):
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"{what} {spec!r}: {module.__name__} has no function {attr!r}")
    return fn


def _names_a_path(term: str) -> bool:
    """Whether a term is `rm:DIR` or `FILE.py:function` of a path that exists: such a path may hold '+' and '*'
    when it is the whole SPEC (or, for '*', a whole term of a sum)."""
    if term.startswith("rm:"):
        return Path(term[3:]).exists()
    target = term.rpartition(":")[0]
    return target.endswith(".py") and Path(target).is_file()


def _term(term: str, spec: str, what: str) -> RewardFn:
    """One term of a SPEC as a callable; errors name the SPEC and what to write instead."""
    if term in BUILTIN:
        fn = BUILTIN[term]
        return fn() if isinstance(fn, type) else fn
    if term.startswith("rm:"):
        from .reward_model import reward_fn_from_model

        return reward_fn_from_model(term[3:])
    if ":" not in term:
        raise UserError(
            f"unknown {what} {term!r}: use a built-in ({', '.join(sorted(BUILTIN))}), rm:DIR, 'module:function', "
            f"'path/to/file.py:function' or a weighted sum such as {EXAMPLES}"
        )
    target, attr = term.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise UserError(f"{what} {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise UserError(f"{what} {spec!r}: importing {path} failed: {err.__class__.__name__}: {err}") from err
        return _load_attr(module, attr, spec, what)
    try:
        module = importlib.import_module(target)
    except Exception as err:
        raise UserError(f"{what} {spec!r}: cannot import module {target!r}: {err}") from err
    return _load_attr(module, attr, spec, what)


def _weighted_term(part: str, spec: str, what: str) -> tuple[float, str]:
    """'0.7*sentiment' -> (0.7, 'sentiment'); 'sentiment' -> (1.0, 'sentiment'). A '*' inside a module or file
    term (one with ':') is part of its name unless a number stands before it."""
    weight, star, name = part.partition("*")
    if not star or _names_a_path(part):
        return 1.0, part
    try:
        return float(weight), name.strip()
    except ValueError as err:
        if ":" in part:
            return 1.0, part
        raise UserError(f"{what} {spec!r}: weight {weight.strip()!r} of {name.strip()!r} is not a number") from err


def load_reward(spec: str, what: str = "reward") -> RewardFn:
    """Resolve SPEC (see the module docstring) to one reward_fn; `what` names it in errors ('reward', 'judge').

    The function returned carries `.spec` (the SPEC as given, less `sim:`), which a run records in config.json; it
    calls the lone term of weight 1 as it is, or adds its terms' weighted scores.
    """
    spec = spec.strip().removeprefix("sim:").strip()
    if not spec:
        raise UserError(f"empty {what} spec: use a built-in ({', '.join(sorted(BUILTIN))}), rm:DIR, 'module:function', "
                        f"'path/to/file.py:function' or a weighted sum such as {EXAMPLES}")  # fmt: skip
    parts = spec.split("+") if "+" in spec and not _names_a_path(spec) else [spec]
    terms = []
    for part in parts:
        weight, name = _weighted_term(part.strip(), spec, what)
        terms.append((weight, _term(name, spec, what)))
    if len(terms) == 1 and terms[0][0] == 1.0:
        term = terms[0][1]

        def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
            return term(prompts, responses)
    else:

        def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
            total = [0.0] * len(responses)
            for w, fn in terms:
                for i, s in enumerate(fn(prompts, responses)):
                    total[i] += w * float(s)
            return total

    reward_fn.spec = spec
    return reward_fn
