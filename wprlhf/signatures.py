"""The one signature that every reward, judge, classifier score and labeler's true score in wprlhf shares.

`reward_fn(prompts, responses) -> one float per response`. PPO, the loop, the tasks and the evaluations take a
callable of this type and never ask where its numbers come from (`spec.load_reward` turns a SPEC into one).
Declared here, in the ground, so that every folder can name it without importing the modules that make rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""prompts (N strings), responses (N strings) -> N scores, one per (prompt, response) pair, in order."""
