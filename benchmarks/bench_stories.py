"""Episodes per CPU minute on the writing task: the PPO phase of `wprlhf stories`, wprlhf only.

    .venv/bin/python benchmarks/bench_stories.py                        # precision auto, 1 warm-up + 3 timed steps
    .venv/bin/python benchmarks/bench_stories.py --precision no         # fp32
    .venv/bin/python benchmarks/bench_stories.py --reward-model DIR     # a trained reward model (a stories run's rm)

The configuration is the task's own, `stories.ppo_settings(StoriesConfig())`: SmolLM2-135M (the SFT policy that a
run starts PPO from has the same architecture and cost), 16 episodes a step, responses of exactly 64 tokens under
the chat template, 2 minibatches x 2 PPO epochs, a separate value model, adaptive KL; the reward is the MiniLM
reward model scored through `reward_model.score`, as in a run (a fresh, untrained head unless --reward-model: the
same work). Prompts: Fan et al.'s r/WritingPrompts prompts (../shared/data/writing_prompts/fan_prompts.csv), else
the built-in ones. Each step is `ppo.step` (rollout, scoring, update), timed by phase; the first step is a warm-up
and is not counted. wprlhf only: no trl run, so no ratio.

Prints episodes per minute and each phase's share; appends one JSON line per run (fresh process each) to --out
(default benchmarks/results_stories.jsonl). A measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    append_jsonl,
    cpu_probe,
    cpu_seconds,
    machine,
    med,
    peak_rss_mib,
    prompt_texts,
    run_child,
    shown,
    versions,
)
from bench_ppo import Timers, instrument

PHASES = ("generate", "score", "rollout_fwd_no_grad", "rollout_value_fwd", "train_forward", "train_backward",
          "train_optimizer_step", "other")  # fmt: skip


def one_run(args) -> dict:
    """The child process: load, build the trainer, one warm-up step, then `--steps` timed `ppo.step`s."""
    from wprlhf.allocator import keep_freed_memory

    kept = keep_freed_memory()  # first, as the `wprlhf` command does (wprlhf/allocator.py)
    import torch

    from wprlhf.methods import onpolicy
    from wprlhf.methods.onpolicy import prompt_batch
    from wprlhf.methods.ppo import PPOTrainer, step
    from wprlhf.models import load_policy, load_reward_backbone
    from wprlhf.pipelines.stories import StoriesConfig, ppo_settings
    from wprlhf.rewards.reward_model import load_reward_model, score

    torch.set_num_threads(args.threads)
    task = StoriesConfig(mixed_precision=args.precision, device="cpu")
    config = ppo_settings(task, args.policy, steps=args.steps + 1)
    t0 = time.perf_counter()
    policy, tokenizer = load_policy(args.policy)
    if args.reward_model:
        rm, rm_tokenizer = load_reward_model(args.reward_model)
    else:
        rm, rm_tokenizer = load_reward_backbone(task.reward_model, seed=args.seed)
    rm.requires_grad_(False)

    def reward_fn(prompts, responses):
        return score(rm, rm_tokenizer, prompts, responses).tolist()

    prompts, source = prompt_texts(args.prompts)
    trainer = PPOTrainer(config, policy, tokenizer)
    load_s = time.perf_counter() - t0
    timers = Timers()
    policy_forward = onpolicy.policy_forward
    instrument(trainer, timers)
    # Under bf16 the rollout recomputes the policy's log-probs beside the reference's: both are no-grad forwards.
    onpolicy.policy_forward = timers.wrap(policy_forward, "train_forward", "rollout_fwd_no_grad")
    step(trainer, prompt_batch(prompts, 0, config.batch_size, config.seed), reward_fn)  # warm-up, not timed
    timers.s.clear()
    probe_before = cpu_probe()
    step_s, generate_s, score_s = [], 0.0, 0.0
    c0, w0 = cpu_seconds(), time.perf_counter()
    for i in range(1, args.steps + 1):
        s0 = time.perf_counter()
        stats, _ = step(trainer, prompt_batch(prompts, i, config.batch_size, config.seed), reward_fn)
        step_s.append(round(time.perf_counter() - s0, 3))
        generate_s += trainer.timings["time_generate"]
        score_s += trainer.timings["time_score"]
    wall, cpu_s = time.perf_counter() - w0, cpu_seconds() - c0
    probe_after = cpu_probe()
    phases = {"generate": generate_s, "score": score_s, **timers.s}
    phases["other"] = wall - sum(phases.values())
    episodes = config.batch_size * args.steps
    return {
        "bench": "stories", "side": "wprlhf", "policy": args.policy, "steps": args.steps, "episodes": episodes,
        "wall_s": round(wall, 3), "episodes_per_min": round(60 * episodes / wall, 2), "step_s": step_s,
        "phases_s": {k: round(v, 3) for k, v in phases.items()}, "cpu_util": round(cpu_s / wall, 2),
        "mixed_precision": trainer.config.mixed_precision, "keep_freed_memory": kept,
        "response_length_mean": stats["response_length"],
        "reward_model": args.reward_model or f"{task.reward_model} (fresh head)", "prompts": source,
        "probe_gflops_before": probe_before, "probe_gflops_after": probe_after, "peak_rss_mib": peak_rss_mib(),
        "load_s": round(load_s, 2), "settings": {k: getattr(config, k) for k in (
            "batch_size", "num_minibatches", "ppo_epochs", "response_length", "min_response_length", "temperature",
            "lr", "kl_coef", "kl_target", "chat_template", "max_prompt_length")},
        "threads": torch.get_num_threads(), "machine": machine(), "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    print(f"\n## The writing task's PPO step ({r0['policy']}, mixed precision {r0['mixed_precision']}, "
          f"{r0['settings']['batch_size']} episodes of {r0['settings']['response_length']} tokens a step, "
          f"{r0['machine']['capability']}), {len(records)} fresh processes\n")  # fmt: skip
    eps = [r["episodes_per_min"] for r in records]
    print(f"Episodes per minute: median {med(eps):.1f} (min {min(eps):.1f}, max {max(eps):.1f}); peak RSS "
          f"{med([r['peak_rss_mib'] for r in records]):.0f} MiB; CPU probe "
          f"{med([r['probe_gflops_before'] for r in records]):.0f} GFLOP/s.\n")  # fmt: skip
    print("| phase | " + " | ".join(f"run {i + 1} s" for i in range(len(records))) + " | median share |")
    print("|---|" + "---:|" * (len(records) + 1))
    for p in PHASES:
        xs = [r["phases_s"].get(p, 0.0) for r in records]
        shares = [r["phases_s"].get(p, 0.0) / r["wall_s"] for r in records]
        print(f"| {p} | " + " | ".join(f"{x:.2f}" for x in xs) + f" | {med(shares):.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default="smollm2", help="smollm2, or a saved policy (e.g. a stories run's SFT)")
    parser.add_argument("--reward-model", default="",
                        help="a saved reward model directory (default: a fresh MiniLM head)")
    parser.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                        help="PPOConfig.mixed_precision; auto = bf16 where this CPU runs it faster")
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", choices=("auto", "fan", "builtin"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON lines file (default: benchmarks/results_stories.jsonl)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one run, JSON on stdout
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1")
    if args.one:
        print(json.dumps(one_run(args)), flush=True)
        return
    out = Path(args.out or REPO / "benchmarks" / "results_stories.jsonl")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one"] + [
        a for k, v in vars(args).items() if k not in ("one", "repeats", "out")
        for a in (f"--{k.replace('_', '-')}", str(v)) if v != ""]  # fmt: skip
    records = []
    for i in range(args.repeats):
        record = run_child(cmd, f"run {i + 1}")
        record["command"] = " ".join(["benchmarks/bench_stories.py"] + sys.argv[1:])
        append_jsonl(out, record)
        records.append(record)
        print(f"run {i + 1}/{args.repeats}: {record['episodes_per_min']:.1f} episodes/min, "
              f"wall {record['wall_s']:.1f} s")
    print_table(records)
    print(f"\nappended to {shown(out)}")


if __name__ == "__main__":
    main()
