"""RLOO, GRPO and DPO speed: wprlhf against Hugging Face trl 1.16.0's trainers on the same work, interleaved.

    TRL_VERSION=1.16.0 bash benchmarks/setup_trl.sh            # once: trl 1.16's own venv beside the 1.12 one
    .venv/bin/python benchmarks/bench_methods.py --repeats 3    # rloo, grpo, dpo; each side 3 fresh processes

Each run is a fresh process with 2 threads: wprlhf's with this venv's python, trl's with the trl 1.16 venv's
(`--trl-python`, default: what setup_trl.sh prints). The sides alternate (wprlhf first on odd repeats, trl first on
even ones), methods interleaved, so a host that slows down slows both. Appends one JSON line per run to --out
(default benchmarks/results_methods.jsonl) and prints a table of medians and the wprlhf / trl ratio.

The work, the same for both sides (what ../shared/peer/TRL_PPO_BENCHMARK.md fixes for PPO, here for these three):

| method | policy | per step | steps | counted |
|---|---|---|---:|---|
| rloo, grpo | SmolLM2-135M, fp32 | 8 prompts x k = 4 = 32 responses, 1 optimizer step (2 micro) | 2 | 64 episodes |
| dpo | SmolLM2-135M, fp32 | 8 pairs, 1 optimizer step | 8 | 64 pairs |

RLOO and GRPO: prompts of 32 tokens (Fan et al. prompts cut to their first 32 tokens, decoded to text, no chat
template), exactly 32 sampled tokens (EOS suppressed), temperature 0.7, top_k 0, top_p 1, the frozen reference's
KL at beta = 0.05 (RLOO: a per-sequence reward penalty; GRPO: the k3 loss term), AdamW lr 3e-6 decaying linearly,
gradient clipping at 1.0, a reward function of the text (the share of vowels; the same Python function on both
sides). DPO: 64 pairs of a 32-token prompt and two 32-token responses (each side adds its end-of-sequence token),
beta 0.1, sigmoid loss, lr 5e-7, reference log-probs computed at each step (not precomputed), clipping at 1.0.

trl 1.16's configs turn gradient checkpointing on by default (less memory, a second forward in every backward);
it is off here, as in wprlhf, so that both sides do the same arithmetic.

What is timed: trl's `trainer.train()` (its dataset tokenisation and model set-up happen before, in `__init__`,
and are not counted); wprlhf's steps as its own metrics.csv times them (RLOO/GRPO: each step's wall time from
prompts to update; DPO: `elapsed_s` of the last step, pair tokenisation included). The windows are not the same:
trl's also holds its optimizer and dataloader set-up, callbacks and per-step logging, which favours wprlhf in
RLOO/GRPO by what those cost (not measured; a per-step callback on trl's side would remove it), while wprlhf's DPO
window holds the pair tokenisation trl does before it.

Same compute is not the same update: trl's RLOO loss sums each response's token log-probs (a gradient about
response-length times wprlhf's, which averages them), so gradient clipping at 1.0 acts differently; the matmuls
are the same. Each record counts the work (`work`: sampled tokens, forwards with and without grad, optimizer
steps; see _common.WorkCounter), so the table shows that both did the same. A measurement, never a test: nothing
here asserts on time.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU work on both sides, even with a CUDA build of torch

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

from _common import (
    REPO,
    WorkCounter,
    append_jsonl,
    cpu_probe,
    fixed_queries,
    machine,
    med,
    peak_rss_mib,
    shown,
)

METHODS = ("rloo", "grpo", "dpo")
PROMPTS, K, STEPS, MICRO = 8, 4, 2, 2  # RLOO/GRPO: prompts a step, samples a prompt, steps, micro-batches a step
PAIRS, PAIR_BATCH = 64, 8  # DPO
TOKENS, BETA_RL, BETA_DPO, LR_RL, LR_DPO = 32, 0.05, 0.1, 3e-6, 5e-7
SEED = 0


def vowel_share(prompts, completions, **_) -> list[float]:
    """The reward of both sides: share of vowels among a response's letters (cheap, so the trainers dominate)."""
    out = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / max(1, len(letters)))
    return out


def texts(tokenizer, n: int) -> list[str]:
    """n distinct texts of 32 tokens each (fixed_queries' rows, decoded)."""
    queries, _, _ = fixed_queries(tokenizer, n, TOKENS)
    return tokenizer.batch_decode(queries, skip_special_tokens=True)


def dpo_rows(tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) x PAIRS."""
    rows = texts(tokenizer, 3 * PAIRS)
    return [(rows[i], rows[PAIRS + i], rows[2 * PAIRS + i]) for i in range(PAIRS)]


def watch(counter: WorkCounter, models: dict) -> None:
    for name, model in models.items():
        if model is not None:
            counter.watch(name, model)
    counter.start()


# ==========================================================================================================
# wprlhf's side


def run_wprlhf(method: str, out: Path) -> tuple[float, dict, dict]:
    """(timed seconds, work counts, settings echo) of one wprlhf run into out."""
    import torch

    from wprlhf.metrics import read_metrics
    from wprlhf.models import load_policy

    policy, tokenizer = load_policy("smollm2", dtype=torch.float32, seed=SEED)
    counter = WorkCounter(TOKENS)
    # The reference is a deep copy of the policy made inside train(): it carries these hooks, so "policy" counts
    # the reference's forwards too (no-grad forwards: the rollout's log-probs and the reference's).
    watch(counter, {"policy": policy})
    if method == "dpo":
        from wprlhf.data import Comparison
        from wprlhf.methods.dpo import DPOConfig, train

        config = DPOConfig(policy="smollm2", beta=BETA_DPO, lr=LR_DPO, epochs=1, batch_size=PAIR_BATCH,
                           max_prompt_length=2 * TOKENS, max_response_length=2 * TOKENS, val_fraction=0.0,
                           chat_template=False, checkpoint_every=10**6, eval_every=10**6, mixed_precision="no",
                           device="cpu", seed=SEED)  # fmt: skip
        comparisons = [Comparison(p, [c, r], 0) for p, c, r in dpo_rows(tokenizer)]
        train(config, out, comparisons=comparisons, policy=policy, tokenizer=tokenizer, progress=False)
        rows = read_metrics(out / "metrics.csv")
        timed = float(rows[-1]["elapsed_s"])
    else:
        from importlib import import_module

        module = import_module(f"wprlhf.methods.{method}")
        config_class = getattr(module, f"{method.upper()}Config")
        config = config_class(policy="smollm2", batch_size=PROMPTS * K, samples_per_prompt=K, steps=STEPS,
                              ppo_epochs=1, num_minibatches=1, gradient_accumulation_steps=MICRO,
                              max_prompt_length=2 * TOKENS, response_length=TOKENS, min_response_length=TOKENS,
                              stop_at_eos=False, chat_template=False, temperature=0.7, top_k=0, top_p=1.0, lr=LR_RL,
                              lr_schedule="linear", kl_coef=BETA_RL, adaptive_kl=False, max_grad_norm=1.0,
                              mixed_precision="no", device="cpu", checkpoint_every=10**6, log_samples=0,
                              seed=SEED)  # fmt: skip
        prompts = texts(tokenizer, PROMPTS * STEPS)
        module.train(config, prompts, vowel_share, out, policy=policy, tokenizer=tokenizer, progress=False)
        rows = read_metrics(out / "metrics.csv")
        timed = sum(config.batch_size / float(r["episodes_per_s"]) for r in rows)  # each step, prompts to update
    counter.stop()
    return timed, counter.summary(), {"config": type(config).__name__}


# ==========================================================================================================
# trl's side (run with the trl 1.16 venv's python)


def run_trl(method: str, out: Path) -> tuple[float, dict, dict]:
    """(timed seconds, work counts, settings echo) of one trl run into out."""
    import torch
    from bench_trl import ensure_cache
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_cache("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(SEED)
    common = dict(output_dir=str(out), report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                  bf16=False, seed=SEED, lr_scheduler_type="linear", max_grad_norm=1.0, disable_dropout=True,
                  dataloader_num_workers=0, gradient_checkpointing=False)  # fmt: skip
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = dpo_rows(tokenizer)
        data = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [" " + r[1] for r in rows],
                                  "rejected": [" " + r[2] for r in rows]})  # fmt: skip
        args = DPOConfig(**common, per_device_train_batch_size=PAIR_BATCH, num_train_epochs=1,
                         learning_rate=LR_DPO, beta=BETA_DPO, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                         warmup_steps=0.1)  # fmt: skip
        trainer = DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)
    else:
        if method == "grpo":
            from trl import GRPOConfig as Config
            from trl import GRPOTrainer as Trainer

            extra = {"loss_type": "grpo", "scale_rewards": "group"}
        else:
            from trl import RLOOConfig as Config
            from trl import RLOOTrainer as Trainer

            extra = {}
        prompts = texts(tokenizer, PROMPTS * STEPS)
        # One generation of PROMPTS x K responses feeds one optimizer step (steps_per_generation = the micro-batches
        # accumulated), so trl's samples are on-policy and it needs no old log-probs forward, as wprlhf.
        args = Config(**common, **extra, per_device_train_batch_size=PROMPTS * K // MICRO,
                      gradient_accumulation_steps=MICRO, steps_per_generation=MICRO, num_generations=K,
                      max_completion_length=TOKENS, generation_kwargs={"min_new_tokens": TOKENS}, temperature=0.7,
                      top_k=0, top_p=1.0, beta=BETA_RL, num_iterations=1, max_steps=STEPS,
                      learning_rate=LR_RL, shuffle_dataset=False, log_completions=False)  # fmt: skip
        trainer = Trainer(model=policy, reward_funcs=vowel_share, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)  # fmt: skip
    counter = WorkCounter(TOKENS)
    watch(counter, {"policy": trainer.model, "reference": getattr(trainer, "ref_model", None)})
    t0 = time.perf_counter()
    trainer.train()
    timed = time.perf_counter() - t0
    counter.stop()
    return timed, counter.summary(), {"config": type(args).__name__}


# ==========================================================================================================
# one run, and the interleaved harness


def one_run(method: str, side: str) -> dict:
    import torch

    torch.set_num_threads(2)
    probe_before = cpu_probe()
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-{side}-") as tmp:
        timed, work, echo = (run_wprlhf if side == "wprlhf" else run_trl)(method, Path(tmp) / "run")
    units = PAIRS if method == "dpo" else PROMPTS * K * STEPS
    # Work counts per side: the policy's and the reference's forwards together (wprlhf counts them as one).
    models = [v for k, v in work.items() if isinstance(v, dict)]
    summed = {key: sum(m.get(key, 0) for m in models) for key in ("gen_tokens", "fwd_seqs", "grad_seqs", "backward")}
    from importlib.metadata import version

    return {"bench": "methods", "method": method, "side": side, "units": units,
            "unit": "pairs" if method == "dpo" else "episodes", "timed_s": round(timed, 3),
            "per_s": round(units / timed, 4), "peak_rss_mib": peak_rss_mib(), "probe_gflops_before": probe_before,
            "probe_gflops_after": cpu_probe(), "work": {**summed, "optimizer_steps": work["optimizer_steps"]},
            "work_detail": work, "echo": echo, "machine": machine(),
            "versions": {p: version(p) for p in ("torch", "transformers", "accelerate")}
            | {side: version(side) if side == "trl" else "repo"},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip


def trl_python(given: str | None) -> str:
    if given:
        return given
    env = {**os.environ, "TRL_VERSION": "1.16.0"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "setup_trl.sh")], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"TRL_VERSION=1.16.0 benchmarks/setup_trl.sh failed with exit status {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def table(records: list[dict]) -> list[str]:
    """Markdown lines: per method, each side's median rate, the ratio, peak RSS and the work both did."""
    lines = ["| method | unit | wprlhf /s median (min-max) | trl 1.16 /s median (min-max) | wprlhf / trl | peak RSS "
          "MiB wprlhf / trl | work wprlhf / trl: sampled tokens, no-grad seqs, grad seqs, optimizer steps | probe "
          "GFLOP/s (min-max) |", "|---|---|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for method in dict.fromkeys(r["method"] for r in records):
        side = {s: [r for r in records if r["method"] == method and r["side"] == s] for s in ("wprlhf", "trl")}
        if not side["wprlhf"] or not side["trl"]:
            continue
        rate = {s: [r["per_s"] for r in rs] for s, rs in side.items()}
        work = {s: rs[-1]["work"] for s, rs in side.items()}
        probes = [r[k] for r in side["wprlhf"] + side["trl"] for k in ("probe_gflops_before", "probe_gflops_after")]
        cells = [f"{med(rate[s]):.3f} ({min(rate[s]):.3f}-{max(rate[s]):.3f})" for s in ("wprlhf", "trl")]
        counts = ", ".join(f"{work['wprlhf'][k]} / {work['trl'][k]}"
                           for k in ("gen_tokens", "fwd_seqs", "grad_seqs", "optimizer_steps"))  # fmt: skip
        rss = " / ".join(f"{med([r['peak_rss_mib'] for r in side[s]]):.0f}" for s in ("wprlhf", "trl"))
        lines.append(f"| {method} | {side['wprlhf'][0]['unit']} | {cells[0]} | {cells[1]} | "
                     f"{med(rate['wprlhf']) / med(rate['trl']):.2f} | {rss} | {counts} | "
                     f"{min(probes):.0f}-{max(probes):.0f} |")  # fmt: skip
    return lines


def write_report(path: Path, records: list[dict], command: str) -> None:
    """RESULTS_methods.md: what ran, where (the CPU and its capability), and the table."""
    m, versions = records[0]["machine"], {r["side"]: r["versions"] for r in records}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    text = ["# wprlhf RLOO, GRPO and DPO vs trl 1.16.0's trainers, side by side on the CPU\n",
            f"Written by `benchmarks/bench_methods.py` on {time.strftime('%Y-%m-%d %H:%M')}, repo at "
            f"`{commit.strip()}`. Command, from the repo root:\n", f"    {command}\n",
            "The work, the same on both sides, is in the docstring of `benchmarks/bench_methods.py`; each run is a "
            "fresh process with 2 threads, the sides alternate, ratios are wprlhf / trl of the medians (above 1: "
            "wprlhf is faster).\n",
            f"Machine: {m['cpu']}, {m['nproc']} cores, torch CPU capability {m['capability']}, flags "
            f"{', '.join(m['bf16_flags'])}.\n",
            *(f"- {side}: " + ", ".join(f"{k} {v}" for k, v in v.items()) for side, v in versions.items()), "",
            *table(records), ""]  # fmt: skip
    path.write_text("\n".join(text), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: rloo, grpo, dpo")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per method and side")
    parser.add_argument("--trl-python", default=None, help="the trl 1.16 venv's python (default: setup_trl.sh's)")
    parser.add_argument("--out", default=None, help="JSON lines file (default benchmarks/results_methods.jsonl)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    if not methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    python = {"wprlhf": sys.executable, "trl": trl_python(args.trl_python)}
    out = Path(args.out or REPO / "benchmarks" / "results_methods.jsonl")
    records = []
    for rep in range(args.repeats):
        for method in methods:
            for side in ("wprlhf", "trl") if rep % 2 == 0 else ("trl", "wprlhf"):
                cmd = [python[side], str(Path(__file__).resolve()), "--one", method, side]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{method} on {side} (repeat {rep + 1}) failed with exit status {proc.returncode}")
                record = json.loads(proc.stdout.strip().splitlines()[-1]) | {"repeat": rep + 1}
                append_jsonl(out, record)
                records.append(record)
                print(f"{method} {side} {rep + 1}/{args.repeats}: {record['per_s']:.3f} {record['unit']}/s "
                      f"({record['timed_s']:.1f} s), peak RSS {record['peak_rss_mib']:.0f} MiB, probe "
                      f"{record['probe_gflops_before']}/{record['probe_gflops_after']}", flush=True)  # fmt: skip
    print("\n".join(["", *table(records)]))
    # The default --out's report is RESULTS_methods.md; another --out gets its own, beside it.
    report = REPO / "benchmarks" / "RESULTS_methods.md" if args.out is None else out.with_suffix(".md")
    write_report(report, records, "python " + " ".join([shown(sys.argv[0]), *sys.argv[1:]]))
    print(f"\nappended {len(records)} lines to {shown(out)}; wrote {shown(report)}")


if __name__ == "__main__":
    main()
