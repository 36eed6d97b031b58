"""PPO speed: episodes/s of wprlhf's PPOTrainer on the trl peer's work (../shared/peer/TRL_PPO_BENCHMARK.md).

Each repetition runs in a fresh process (this script re-invoking itself with --one); only the PPO steps are
timed (sampling, decoding, reward, step_batch), not imports, model loading or PPOTrainer construction. Work:
queries of exactly 32 tokens, 32 sampled tokens per response (stop_at_eos=False), temperature 0.7, full
vocabulary, separate value model, fp32, 2 threads, the built-in `length` reward (`--reward tiny-rm`: the trl
peer's reward model instead, a frozen random TINY_ARCH classifier scoring the token ids, as benchmarks/compare.py
runs it so that both sides do the same work). Each record counts the work done (`work`: forwards, backwards and
tokens per model, optimizer steps; see _common.WorkCounter), for the side-by-side check in compare.py.

| config  | policy                 | batch | minibatches | epochs | updates | episodes |
|---------|------------------------|------:|------------:|-------:|--------:|---------:|
| smollm2 | SmolLM2-135M-Instruct  |     8 |           2 |      1 |       2 |       16 |
| tiny    | random TINY_ARCH Llama |    16 |           4 |      4 |       4 |       64 |

    .venv/bin/python benchmarks/bench_ppo.py --model smollm2 --repeats 3
    .venv/bin/python benchmarks/bench_ppo.py --model smollm2,tiny --repeats 3    # the models interleaved
    .venv/bin/python benchmarks/bench_ppo.py --model tiny --reward tiny-rm --repeats 3    # trl's exact work

Prints a markdown table of medians; appends one JSON line per run to --out (default benchmarks/results_ppo.jsonl).
A measurement, never a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from _common import (
    REPO,
    WORK,
    WorkCounter,
    append_jsonl,
    check_device,
    cpu_probe,
    cpu_seconds,
    current_rss_mib,
    fixed_queries,
    machine,
    med,
    on_device,
    peak_rss_mib,
    run_child,
    shown,
    versions,
)

# The trl peer's medians on this kind of machine (another session: indicative only).
PEER = {"tiny": {"episodes_per_s": 3.80, "peak_rss_mib": 1.06 * 1024},
        "smollm2": {"episodes_per_s": 0.497, "peak_rss_mib": 5.77 * 1024}}  # fmt: skip
PHASES = ("generate", "decode_and_score", "rollout_ref_fwd", "rollout_value_fwd", "rollout_reward_fwd", "train_forward",
          "train_backward", "train_optimizer_step", "other")  # fmt: skip


class Timers:
    """Wall seconds per phase, from wrappers around the functions PPOTrainer calls (CPU ops are synchronous)."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn, name_grad: str, name_nograd: str | None = None):
        import torch

        def wrapped(*args, **kwargs):
            name = name_grad if (name_nograd is None or torch.is_grad_enabled()) else name_nograd
            with self(name):
                return fn(*args, **kwargs)

        return wrapped


def instrument(trainer, timers: Timers) -> None:
    """Time PPOTrainer's phases without changing what it computes: wrap the functions step_batch looks up."""
    import warnings

    import torch

    from wprlhf.methods import onpolicy

    # LambdaLR notices that optimizer.step was replaced; the wrapper still calls the original step first.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    # The trainer's rollout forwards and minibatch steps find these by their module-level names at call time.
    onpolicy.policy_forward = timers.wrap(onpolicy.policy_forward, "train_forward", "rollout_ref_fwd")
    onpolicy.value_forward = timers.wrap(onpolicy.value_forward, "train_forward", "rollout_value_fwd")
    trainer.optimizer.step = timers.wrap(trainer.optimizer.step, "train_optimizer_step")
    torch.Tensor.backward = timers.wrap(torch.Tensor.backward, "train_backward")


def tiny_reward_model(tokenizer):
    """The trl peer's reward model: a random-init TINY_ARCH Llama classifier (seed 2, num_labels=1), frozen."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from wprlhf.models import tiny_config

    config = tiny_config(len(tokenizer))
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(2)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).requires_grad_(False).eval()


def reward_model_scores(reward_model, queries, query_mask, responses, response_mask):
    """scores (B,): the scalar head at the last real token of query + response, as trl's get_reward reads it.

    queries (B, Tq), query_mask (B, Tq) bool; responses (B, Tr), response_mask (B, Tr) bool.
    """
    import torch

    with torch.no_grad():
        input_ids = torch.cat([queries, responses], 1)  # (B, Tq + Tr)
        mask = torch.cat([query_mask, response_mask], 1)
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = reward_model.base_model(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids,
                                         use_cache=False).last_hidden_state  # fmt: skip
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # (B,) index of the last real token
        return reward_model.score(hidden[torch.arange(len(input_ids)), last]).squeeze(-1).float()


def one_run(args) -> dict:
    """The child process: load, build the trainer, time `steps` PPO updates. Returns the JSON record."""
    from wprlhf.allocator import keep_freed_memory

    # First, as the `wprlhf` command does (wprlhf/allocator.py); --system-malloc measures without it.
    kept = False if args.system_malloc else keep_freed_memory()
    import torch

    from wprlhf.generation import decode_responses
    from wprlhf.methods.ppo import PPOConfig, PPOTrainer
    from wprlhf.models import load_policy
    from wprlhf.rewards.spec import length

    torch.set_num_threads(args.threads)
    check_device(args.device)
    work = WORK[args.model]
    precision = {"mixed_precision": "no"}  # the fp32 row, whatever the default ('auto') would pick on this CPU
    if args.bf16:  # the "best settings" row: wprlhf's bf16 autocast, where its PPOConfig has one
        if "mixed_precision" not in {f.name for f in dataclasses.fields(PPOConfig)}:
            raise SystemExit("--bf16: this wprlhf's PPOConfig has no mixed_precision option")
        precision = {"mixed_precision": "bf16"}
    if args.lora:  # LoRA on the policy, reference = adapters off: less memory, and not the same work
        precision.update(lora_r=args.lora, lora_alpha=2.0 * args.lora)
    # The peer's optimiser settings: lr 3e-6 decaying linearly to 0, beta 0.05 fixed, no gradient clipping.
    config = PPOConfig(
        policy=args.model, reward="length", seed=args.seed, **work, max_prompt_length=32, response_length=32,
        stop_at_eos=False, chat_template=False, temperature=0.7, top_k=0, top_p=1.0,
        device=args.device, lr=3e-6, lr_schedule="linear", kl_coef=0.05, adaptive_kl=False,
        max_grad_norm=args.max_grad_norm, log_samples=0, **precision,
    )  # fmt: skip
    t0 = time.perf_counter()
    policy, tokenizer = load_policy(args.model, dtype=torch.float32, seed=args.seed)
    B, U = config.batch_size, config.steps
    queries, query_mask, source = fixed_queries(tokenizer, B * U, 32, args.prompts)
    torch.manual_seed(args.seed)
    trainer = PPOTrainer(config, policy, tokenizer)
    queries, query_mask = queries.to(trainer.device), query_mask.to(trainer.device)
    reward_model = tiny_reward_model(tokenizer).to(trainer.device) if args.reward == "tiny-rm" else None
    load_s = time.perf_counter() - t0
    timers = Timers()
    if not args.no_timers and args.device == "cpu":  # on a GPU the clock would need a sync per call: none
        instrument(trainer, timers)
    counter = WorkCounter(config.response_length)
    watched = {"policy": trainer.policy, "reference": trainer.reference, "value": trainer.value_model,
               "reward": reward_model}  # fmt: skip
    for name, model in watched.items():
        if model is not None:
            counter.watch(name, model)
    rss_before = current_rss_mib()
    probe_before = cpu_probe()

    counter.start()
    update_s = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = cpu_seconds(), time.perf_counter()
    for step in range(U):
        u0 = time.perf_counter()
        q, m = queries[step * B : (step + 1) * B], query_mask[step * B : (step + 1) * B]
        with timers("generate"):  # what trainer.generate does after encode_prompts (in the run's precision)
            gen = trainer.sample(q, m)
        counter.sampled_tokens += int(gen.response_mask.sum())
        if reward_model is not None:
            with timers("rollout_reward_fwd"):
                scores = reward_model_scores(reward_model, q, m, gen.responses, gen.response_mask)
        else:
            with timers("decode_and_score"):
                texts = decode_responses(tokenizer, gen.responses, gen.response_mask)
                scores = torch.tensor(length([""] * B, texts), dtype=torch.float32)
        stats = trainer.step_batch(q, m, gen.responses, gen.response_mask, scores, gen.logprobs)
        update_s.append(round(time.perf_counter() - u0, 3))  # step_batch's stats are floats: GPU work is done
    accelerator = on_device(args.device)  # synchronizes on a GPU
    wall = time.perf_counter() - w0
    cpu_s = cpu_seconds() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    counter.stop()
    probe_after = cpu_probe()

    # On a GPU the context timers above stopped without a sync: their seconds would be launch times, not work.
    phases = {k: round(v, 3) for k, v in timers.s.items()} if args.device == "cpu" else {}
    if phases:
        phases["other"] = round(wall - sum(timers.s.values()), 3)
    episodes = B * U
    work_counts = counter.summary(trainer.optimizer)
    return {
        "bench": "ppo", "side": "wprlhf", "config": args.model, "episodes": episodes, "ppo_updates": U,
        "wall_s": round(wall, 3), "episodes_per_s": round(episodes / wall, 4),
        "gen_tokens_per_s": round(episodes * 32 / wall, 2),
        "trained_tokens_per_s": round(work_counts["trained_tokens"] / wall, 1),
        "rollout_gen_tokens_per_s": round(episodes * 32 / phases["generate"], 1) if "generate" in phases else None,
        "cpu_s": round(cpu_s, 2), "cpu_util": round(cpu_s / wall, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt, "probe_gflops_before": probe_before,
        "probe_gflops_after": probe_after, "peak_rss_mib": peak_rss_mib(), "rss_before_train_mib": rss_before,
        "update_s": update_s, "phases_s": phases, "load_s": round(load_s, 2), "prompts": source,
        "response_length_mean": stats["response_length"], "timers": bool(phases),
        "bf16": args.bf16, "keep_freed_memory": kept, "mixed_precision_effective": str(getattr(getattr(trainer, "accelerator", config), "mixed_precision", "no")),
        "attn_implementation": policy.config._attn_implementation,
        "dtype": str(next(policy.parameters()).dtype), "work": work_counts,
        "settings": {**work, "prompt_tokens": 32, "response_tokens": 32, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                     "threads": torch.get_num_threads(), "value_model": "separate", "lr": 3e-6, "kl_coef": 0.05,
                     "max_grad_norm": args.max_grad_norm, "reward": args.reward,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
        **accelerator, "machine": machine(), "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def child_command(args, model: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--model", model, "--threads", str(args.threads),
           "--prompts", args.prompts, "--seed", str(args.seed), "--reward", args.reward,
           "--device", args.device]  # fmt: skip
    if args.max_grad_norm is not None:
        cmd += ["--max-grad-norm", str(args.max_grad_norm)]
    if args.no_timers:
        cmd.append("--no-timers")
    if args.bf16:
        cmd.append("--bf16")
    if args.lora:
        cmd += ["--lora", str(args.lora)]
    return cmd


def print_table(records: list[dict]) -> None:
    models = list(dict.fromkeys(r["config"] for r in records))
    print("\n## wprlhf PPO, median over fresh processes\n")
    print("| config | runs | episodes/s median (min–max) | wall s | peak RSS MiB | probe GFLOP/s before / after (medians, "
          "min) | CPU util | sys CPU s | minor faults (M) | trl peer episodes/s (other session) | wprlhf ÷ peer |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in models:
        rs = [r for r in records if r["config"] == m]
        eps = [r["episodes_per_s"] for r in rs]
        on_cpu = 1.0 if all(r.get("device", "cpu") == "cpu" for r in rs) else float("nan")
        probes = [r["probe_gflops_before"] for r in rs] + [r["probe_gflops_after"] for r in rs]
        print(f"| {m} | {len(rs)} | {med(eps):.3f} ({min(eps):.3f}–{max(eps):.3f}) | {med([r['wall_s'] for r in rs]):.2f} | "
              f"{med([r['peak_rss_mib'] for r in rs]):.0f} | {med([r['probe_gflops_before'] for r in rs]):.0f} / "
              f"{med([r['probe_gflops_after'] for r in rs]):.0f}, min {min(probes):.0f} | "
              f"{med([r['cpu_util'] for r in rs]):.2f} | {med([r.get('sys_s', float('nan')) for r in rs]):.1f} | "
              f"{med([r.get('minor_faults', float('nan')) for r in rs]) / 1e6:.2f} | {PEER[m]['episodes_per_s']} | "
              f"{on_cpu * med(eps) / PEER[m]['episodes_per_s']:.2f} |")  # fmt: skip (the peer ran on a CPU)
    for m in models:
        rs = [r for r in records if r["config"] == m and r["phases_s"]]
        if not rs:
            continue
        print(f"\n### {m}: time per phase, seconds (median over runs; share of median wall)\n")
        print("| phase | " + " | ".join(f"run {i + 1}" for i in range(len(rs))) + " | median | share |")
        print("|---|" + "---:|" * (len(rs) + 2))
        wall = med([r["wall_s"] for r in rs])
        for p in PHASES:
            xs = [r["phases_s"].get(p, 0.0) for r in rs]
            print(f"| {p} | " + " | ".join(f"{x:.2f}" for x in xs) + f" | {med(xs):.2f} | {med(xs) / wall:.0%} |")
        print("| per update (s) | " + " | ".join(" / ".join(f"{u:.1f}" for u in r["update_s"]) for r in rs) + " | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or both comma-separated (interleaved)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", choices=("auto", "fan", "builtin"), default="auto")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="default None: no clipping, as trl's PPO")
    parser.add_argument("--no-timers", action="store_true", help="no per-phase wrappers")
    parser.add_argument(
        "--reward",
        choices=("length", "tiny-rm"),
        default="length",
        help="length: the built-in text reward; tiny-rm: the trl peer's random tiny reward model",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (PPOConfig.mixed_precision), not the work")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc as it is (the wprlhf command sets it to keep freed memory)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the policy (0 = full fine-tuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then without per-phase timers)")
    parser.add_argument("--out", default=None, help="JSON lines file (default: benchmarks/results_ppo.jsonl)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one run, JSON on stdout
    args = parser.parse_args()
    models = [m for m in args.model.split(",") if m]
    if not set(models) <= set(WORK):
        raise SystemExit(f"--model: choose from {sorted(WORK)}")

    if args.one:
        print(json.dumps(one_run(args)), flush=True)
        return

    out = Path(args.out or REPO / "benchmarks" / "results_ppo.jsonl")
    records = []
    for rep in range(args.repeats):
        for m in models:  # interleaved: smollm2, tiny, smollm2, tiny, ...
            t0 = time.perf_counter()
            record = run_child(child_command(args, m), f"run {rep + 1} of {m}")
            record["repeat"] = rep + 1
            append_jsonl(out, record)
            records.append(record)
            print(f"{m} run {rep + 1}/{args.repeats}: {record['episodes_per_s']:.3f} episodes/s, wall "
                  f"{record['wall_s']:.1f} s, probe {record['probe_gflops_before']}/{record['probe_gflops_after']} "
                  f"GFLOP/s, peak RSS {record['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s with loading)",
                  flush=True)  # fmt: skip
    print_table(records)
    print(f"\nappended {len(records)} lines to {shown(out)}")


if __name__ == "__main__":
    main()
