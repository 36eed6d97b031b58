"""Run by tests/test_distributed.py, on 1 process (plain python) or 2 (python -m torch.distributed.run): one PPO
update on a fixed global rollout batch, or one reward-model training run, written to OUT for comparison.

    python tests/distributed_worker.py ppo OUT.pt           (or rloo, grpo)
    python tests/distributed_worker.py dpo DATA.jsonl OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py rm DATA.jsonl OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py nonfinite OUT
"""

from __future__ import annotations

import sys

import torch

torch.set_num_threads(1)  # two processes on two cores

B, TQ, TR = 8, 6, 5


def fixed_rollout(vocab: int = 49152):
    """A global batch with ragged queries (left-padded) and responses (right-padded), the same on every process."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(100, vocab, (B, TQ), generator=g)
    responses = torch.randint(100, vocab, (B, TR), generator=g)
    q_len = torch.tensor([6, 3, 5, 2, 6, 4, 3, 5])
    r_len = torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])
    query_mask = torch.arange(TQ)[None, :] >= TQ - q_len[:, None]
    response_mask = torch.arange(TR)[None, :] < r_len[:, None]
    scores = torch.randn(B, generator=g)
    return queries, query_mask, responses, response_mask, scores


def trim(queries, query_mask, responses, response_mask):
    """Drop the all-padding columns of a shard, so the processes hold different widths (as real rollouts do)."""
    q_keep = query_mask.any(0).nonzero().min()
    r_keep = response_mask.any(0).nonzero().max() + 1
    return queries[:, q_keep:], query_mask[:, q_keep:], responses[:, :r_keep], response_mask[:, :r_keep]


def ppo(out: str, method: str = "ppo") -> None:
    """One update of `method` ('ppo', 'rloo', 'grpo') on the fixed global batch; RLOO and GRPO see it as 2 prompts
    x 4 responses, so under 2 processes each holds one group and the advantages need the gathered batch."""
    from wprlhf.methods.grpo import GRPOConfig, GRPOTrainer
    from wprlhf.methods.ppo import PPOConfig, PPOTrainer
    from wprlhf.methods.rloo import RLOOConfig, RLOOTrainer
    from wprlhf.models import load_policy

    policy, tokenizer = load_policy("tiny", seed=0)
    common = dict(policy="tiny", batch_size=B, num_minibatches=2, ppo_epochs=2, gradient_accumulation_steps=2,
                  lr=1e-3, device="cpu", seed=0)  # fmt: skip
    if method == "ppo":
        trainer = PPOTrainer(PPOConfig(**common, whiten_rewards=True, score_norm="batch"), policy, tokenizer)
    elif method == "rloo":
        trainer = RLOOTrainer(RLOOConfig(**common, samples_per_prompt=4, score_norm="batch"), policy, tokenizer)
    else:
        trainer = GRPOTrainer(GRPOConfig(**common, samples_per_prompt=4, kl_coef=0.1), policy, tokenizer)
    acc = trainer.accelerator
    queries, query_mask, responses, response_mask, scores = fixed_rollout()
    queries = torch.where(query_mask, queries, tokenizer.pad_token_id)
    responses = torch.where(response_mask, responses, tokenizer.pad_token_id)
    rows = slice(acc.process_index * B // acc.num_processes, (acc.process_index + 1) * B // acc.num_processes)
    shard = trim(queries[rows], query_mask[rows], responses[rows], response_mask[rows])
    stats = trainer.step_batch(*shard, scores[rows])
    params = {f"{name}.{k}": v.detach().clone() for name, model in trainer.models().items()
              for k, v in model.state_dict().items()}  # fmt: skip
    torch.save({"params": params, "stats": stats}, f"{out}.rank{acc.process_index}")


def rm(data: str, out: str) -> None:
    from wprlhf.rewards.reward_model import RewardConfig, train

    config = RewardConfig(data=data, model="tiny", max_length=48, batch_size=16, epochs=1, lr=1e-3, warmup_ratio=0.0,
                          val_fraction=0.2, eval_every=1000, normalize_samples=16, device="cpu", seed=0)  # fmt: skip
    train(config, out, progress=False)


def dpo(data: str, out: str) -> None:
    from wprlhf.methods.dpo import DPOConfig, train

    config = DPOConfig(data=data, policy="tiny", beta=0.5, lr=2e-2, warmup=0.0, batch_size=4,
                       gradient_accumulation_steps=2, epochs=1, val_fraction=0.0, device="cpu", seed=0)  # fmt: skip
    train(config, out, progress=False)


def nonfinite(out: str) -> None:
    """Rank 1 alone sees a NaN loss at step 7; each rank writes whether `check_finite` stopped it."""
    from wprlhf.distributed import check_finite, make_accelerator
    from wprlhf.errors import NonFiniteError

    acc = make_accelerator(torch.device("cpu"))
    loss = float("nan") if acc.process_index == 1 else 0.5
    try:
        check_finite(acc, 7, "test", "fix", loss=loss)
        outcome = "passed"
    except NonFiniteError as err:
        outcome = f"raised: {err}"
    acc.wait_for_everyone()  # a rank that had not raised would wait here alone
    with open(f"{out}.rank{acc.process_index}", "w") as f:
        f.write(outcome)


if __name__ == "__main__":
    modes = {"ppo": ppo, "rloo": lambda out: ppo(out, "rloo"), "grpo": lambda out: ppo(out, "grpo"), "rm": rm,
             "dpo": dpo, "nonfinite": nonfinite}  # fmt: skip
    modes[sys.argv[1]](*sys.argv[2:])
    # Tear gloo down before the interpreter does: left to exit, its threads can abort the process
    # ("terminate called without an active exception") after the work has finished and been written.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
