"""Turn a reward SPEC into a reward_fn(prompts, responses) -> list[float]: built-in toys or user code.

SPEC is a built-in name (`vowels`, `length`), `rm:DIR` (a reward model trained by `wprlhf rm train`),
`module:function`, or `path/to/file.py:function`.
Every reward in wprlhf has that one signature, whatever computes it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UserError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


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


BUILTIN: dict[str, RewardFn] = {"vowels": vowels, "length": length}


def _load_attr(module, attr: str, spec: str):
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"reward {spec!r}: {module.__name__} has no function {attr!r}")
    return fn


def load_reward(spec: str) -> RewardFn:
    """Resolve SPEC to a callable; errors name the SPEC and what to write instead."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("rm:"):
        from .reward_model import reward_fn_from_model

        return reward_fn_from_model(spec[3:])
    if ":" not in spec:
        raise UserError(
            f"unknown reward {spec!r}: use a built-in ({', '.join(sorted(BUILTIN))}), 'module:function' "
            "or 'path/to/file.py:function'"
        )
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise UserError(f"reward {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise UserError(f"reward {spec!r}: importing {path} failed: {err.__class__.__name__}: {err}") from err
        return _load_attr(module, attr, spec)
    try:
        module = importlib.import_module(target)
    except Exception as err:
        raise UserError(f"reward {spec!r}: cannot import module {target!r}: {err}") from err
    return _load_attr(module, attr, spec)
