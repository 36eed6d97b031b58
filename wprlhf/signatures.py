"""The one signature that every reward, judge, classifier score and labeler's true score in wprlhf shares.

`reward_fn(prompts, responses) -> one float per response`. PPO, the loop, the tasks and the evaluations take a
callable of this type and never ask where its numbers come from (`spec.load_reward` turns a SPEC into one).
Declared here, in the ground, so that every folder can name it without importing the modules that make rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""prompts (N strings), responses (N strings) -> N scores, one per (prompt, response) pair, in order."""


def reward_name(reward_fn: RewardFn, default: str) -> str:
    """What a run's config.json records as its reward: the SPEC a reward_fn was resolved from (`spec.load_reward`
    tags its functions with `.spec`), else `default` when a caller named the reward itself (a pipeline's
    "stories: the reward model"), else the Python function's module and name, so a run trained from Python on its
    own function never records a built-in it did not use. `default` is None when the caller named nothing."""
    spec = getattr(reward_fn, "spec", None)
    if isinstance(spec, str) and spec:
        return spec
    if default:
        return default
    name = getattr(reward_fn, "__qualname__", None) or type(reward_fn).__qualname__
    return f"python:{getattr(reward_fn, '__module__', None) or type(reward_fn).__module__}.{name}"
