"""The algorithms, one file each: SFT, PPO, RLOO, GRPO (over the on-policy trainer), DPO, best-of-n.

A method imports the ground modules only (never a reward, an evaluation or a pipeline): it receives its scores
as one `reward_fn(prompts, responses) -> list[float]`."""
