"""wprlhf's PPO and trl 1.12.0's PPOTrainer on the same work, interleaved, fresh process per run -> RESULTS.md.

    python3 benchmarks/compare.py                                   # tiny and smollm2, 3 runs per side each
    python3 benchmarks/compare.py --configs tiny --repeats 5 --best # + bf16 "best settings" rows
    python3 benchmarks/compare.py --configs smollm2 --best --malloc-rows  # + what keeping freed memory is worth

One invocation: makes/reuses the trl venv (benchmarks/setup_trl.sh), converts the SmolLM2 caches of both sides
before any timing, then runs, for each repeat and config, wprlhf (benchmarks/bench_ppo.py --reward tiny-rm) and
trl (benchmarks/bench_trl.py) one after the other, each in a fresh process with the same threads, and appends
every JSON line to benchmarks/results_compare.jsonl. Then writes benchmarks/RESULTS.md: the command, machine,
versions, per config a table of medians (min–max) with the ratios wprlhf ÷ trl, the work-equivalence table (the
counts of forwards, backwards, tokens and optimizer steps of both sides, which must match), and the time per phase.
Standard library only: runs with any python3; the two sides run with their own venvs. A measurement, never a test.
The work and the reasons for running the sides interleaved: ../shared/peer/TRL_PPO_BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
DEFAULT_TRL_VENV = Path.home() / ".cache" / "wprlhf-bench" / "trl-venv"
# glibc's environment form of what wprlhf/allocator.py sets with mallopt at the start of the `wprlhf` command (and
# bench_ppo.py): no mmap per block, no trimming of the heap. For the --malloc-rows trl row.
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}

# Counts in each record's `work` (see _common.WorkCounter) that the two sides must share for the same work.
# Call counts may legitimately differ (the same rows in other chunks): shown, not required to match; so are
# head rows (an implementation may skip output-head rows it never reads: an optimisation, not less PPO work).
MODELS = ("policy", "reference", "value", "reward")
MUST_MATCH = (("gen_tokens", "sampling forwards: token positions fed (prefill + one per new token)"),
              ("fwd_seqs", "full forwards without grad: sequences"),
              ("fwd_tokens", "full forwards without grad: tokens"),
              ("grad_seqs", "training forwards: sequences"),
              ("grad_tokens", "training forwards: tokens"),
              ("backward", "backward passes"),
              ("params", "parameters"))  # fmt: skip
INFO = (("gen_calls", "sampling forward calls"), ("fwd_calls", "full forward calls without grad"),
        ("grad_calls", "training forward calls"), ("head_rows", "output-head rows computed"))  # fmt: skip
TOTALS = (("parameter_updates", "parameter updates (parameters x AdamW steps)"),
          ("optimizer_params", "parameters the optimizer updates"),
          ("sampled_tokens", "sampled tokens"), ("trained_tokens", "trained response tokens"))  # fmt: skip
# wprlhf steps the policy and a separate value model apart in one process: twice the calls for the same updates.
TOTALS_INFO = (("optimizer_steps", "optimizer step calls"),)
SETUP = (("dtype", "weights dtype"), ("attn_implementation", "attention"), ("prompts", "prompt source"),
         ("response_length_mean", "response length"), ("episodes", "episodes"), ("ppo_updates", "PPO updates"))  # fmt: skip
SETTINGS = ("batch_size", "num_minibatches", "ppo_epochs", "prompt_tokens", "response_tokens", "temperature", "top_k",
            "top_p", "threads", "lr", "kl_coef", "max_grad_norm", "reward", "pad_token_id")  # fmt: skip
METRICS = (("episodes_per_s", "episodes/s", 3, True), ("gen_tokens_per_s", "generated tokens/s", 1, True),
           ("trained_tokens_per_s", "trained tokens/s", 0, True), ("peak_rss_mib", "peak RSS MiB", 0, False),
           ("wall_s", "wall s", 2, False))  # fmt: skip
GPU_METRICS = (("gpu_peak_mib", "GPU peak MiB (torch allocator)", 0, False),)  # only in --device cuda records


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def shown_python(path: str, outside: str) -> str:
    """A python path for RESULTS.md: relative to the repo, else `outside` (no home directories in the results)."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return outside


# ==========================================================================================================
# Running


def setup_trl(args) -> str:
    env = dict(os.environ, BENCH_VENV=str(args.trl_venv))
    proc = subprocess.run(["bash", str(HERE / "setup_trl.sh")], env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/setup_trl.sh failed with exit status {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def prepare_caches(args, trl_python: str) -> None:
    """Convert the SmolLM2 GGUF for both sides now, so that no timed run pays for it (or holds its memory)."""
    need_model = "smollm2" in args.configs
    code = "from wprlhf.models import smollm2_dir, smollm2_tokenizer_dir; smollm2_tokenizer_dir()"
    code += "; smollm2_dir()" if need_model else ""
    subprocess.run([args.wprlhf_python, "-c", code], cwd=REPO, check=True)
    what = "all" if need_model else "tokenizer"
    subprocess.run([trl_python, str(HERE / "bench_trl.py"), "prepare", "--what", what], cwd=REPO, check=True)


def wprlhf_has_bf16(python: str) -> bool:
    code = "import dataclasses, wprlhf.methods.ppo as p; print('mixed_precision' in {f.name for f in dataclasses.fields(p.PPOConfig)})"
    proc = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() == "True"


def variants(args, trl_python: str) -> list[dict]:
    """What runs, in order, for each repeat and config: label, side, interpreter, script arguments."""
    common = ["--threads", str(args.threads), "--prompts", args.prompts, "--device", args.device]
    out = [{"label": "wprlhf", "side": "wprlhf", "python": args.wprlhf_python, "model_flag": True,
            "shown": shown_python(args.wprlhf_python, "python"),
            "argv": ["benchmarks/bench_ppo.py", "--one", "--reward", "tiny-rm", *common]},
           {"label": "trl", "side": "trl", "python": trl_python, "model_flag": False,
            "shown": shown_python(trl_python, "python3" if args.trl_python else "$BENCH_VENV/bin/python"),
            "argv": ["benchmarks/bench_trl.py", "run", *common]}]  # fmt: skip
    if args.best:
        if wprlhf_has_bf16(args.wprlhf_python):
            out.append({**out[0], "label": "wprlhf bf16", "argv": [*out[0]["argv"], "--bf16"]})
        out.append({**out[1], "label": "trl bf16", "argv": [*out[1]["argv"], "--bf16"]})
    if args.malloc_rows:  # how much of the bf16 ratio is the allocator setting, how much the code
        bf16 = {v["label"]: v for v in out}
        if "wprlhf bf16" in bf16:
            out.append({**bf16["wprlhf bf16"], "label": "wprlhf bf16, system malloc",
                        "argv": [*bf16["wprlhf bf16"]["argv"], "--system-malloc"]})  # fmt: skip
        out.append({**bf16["trl bf16"], "label": "trl bf16, malloc as wprlhf's", "env": KEEP_FREED_MEMORY_ENV})
    if args.lora:  # no trl counterpart: LoRA is not the same work (a row of its own, for memory)
        out.append(
            {**out[0], "label": f"wprlhf LoRA r={args.lora}", "argv": [*out[0]["argv"], "--lora", str(args.lora)]}
        )
    return out


def run_one(variant: dict, config: str, timeout: int) -> tuple[dict | None, str]:
    argv = list(variant["argv"])
    argv = argv + ["--model", config] if variant["model_flag"] else argv[:2] + [config] + argv[2:]
    cmd = [variant["python"], *argv]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **variant.get("env", {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, f"exit status {proc.returncode}: {proc.stderr.strip()[-3000:]}"
    record = json.loads(lines[-1])
    env = " ".join(f"{k}={v}" for k, v in variant.get("env", {}).items())
    record["command"] = f"{env + ' ' if env else ''}{variant['shown']} {shlex.join(argv)}"
    return record, ""


# ==========================================================================================================
# RESULTS.md


def fmt(x, digits: int) -> str:
    if x is None or math.isnan(x):
        return "—"
    return f"{x:,.{digits}f}"


def metric_cell(rs: list[dict], key: str, digits: int) -> str:
    xs = [r[key] for r in rs if r.get(key) is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(med(xs), digits)} ({fmt(min(xs), digits)}–{fmt(max(xs), digits)})"


def speed_table(config: str, by_label: dict[str, list[dict]], labels: list[str]) -> list[str]:
    on_gpu = any("gpu_peak_mib" in r for rs in by_label.values() for r in rs)
    metrics = METRICS + GPU_METRICS if on_gpu else METRICS
    head = "| side | runs | " + " | ".join(f"{name} median (min–max)" for _, name, _, _ in metrics)
    lines = [
        head + " | CPU probe GFLOP/s before / after (medians) | CPU util | load avg before |",
        "|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|",
    ]
    for label in labels:
        rs = by_label.get(label, [])
        if not rs:
            lines.append(f"| {label} | 0 | " + " | ".join("—" for _ in metrics) + " | — | — | — |")
            continue
        probes = f"{med([r['probe_gflops_before'] for r in rs]):.0f} / {med([r['probe_gflops_after'] for r in rs]):.0f}"
        load = med([r["loadavg_before"] for r in rs])
        cells = " | ".join(metric_cell(rs, key, digits) for key, _, digits, _ in metrics)
        lines.append(f"| {label} | {len(rs)} | {cells} | {probes} | {med([r['cpu_util'] for r in rs]):.2f} | "
                     f"{load:.2f} |")  # fmt: skip
    lora = [(label, "trl") for label in labels if label.startswith("wprlhf LoRA")]
    malloc = (("wprlhf bf16", "trl bf16, malloc as wprlhf's"), ("wprlhf bf16, system malloc", "trl bf16"))
    for a, b in (("wprlhf", "trl"), ("wprlhf bf16", "trl bf16"), *malloc, *lora):
        if by_label.get(a) and by_label.get(b):
            cells = []
            for key, _, _, _ in metrics:
                x, y = med([r[key] for r in by_label[a]]), med([r[key] for r in by_label[b]])
                cells.append(f"**{x / y:.2f}×**" if y else "—")
            note = " (not the same work)" if "LoRA" in a else ""
            lines.append(f"| **{a} ÷ {b}** (of medians){note} | | " + " | ".join(cells) + " | | | |")
    return lines


def work_of(rs: list[dict]) -> tuple[dict | None, bool]:
    """The first run's work counts, and whether every run of this side counted the same."""
    if not rs:
        return None, True
    first = rs[0].get("work")
    return first, all(r.get("work") == first for r in rs[1:])


def work_table(wp: list[dict], tr: list[dict]) -> tuple[list[str], list[str]]:
    """Markdown rows comparing the two sides' work, and the list of mismatches (empty = the same work)."""
    (w, w_same), (t, t_same) = work_of(wp), work_of(tr)
    mismatches = []
    lines = ["| model | count | wprlhf | trl | |", "|---|---|---:|---:|---|"]
    if w is None or t is None:
        return lines + ["| — | no run of one side finished | | | ✗ |"], ["a side has no finished run"]

    def row(model: str, what: str, a, b, must: bool):
        ok = a == b
        if must and not ok:
            mismatches.append(f"{model}: {what} {a} vs {b}")
        mark = ("✓" if ok else "**✗ MISMATCH**") if must else ("same" if ok else "differs (informational)")
        lines.append(f"| {model} | {what} | {show(a)} | {show(b)} | {mark} |")

    def show(x) -> str:
        return "—" if x is None else (f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x))

    for model in MODELS:
        a, b = w.get(model) or {}, t.get(model) or {}
        for key, what in MUST_MATCH:
            row(model, what, a.get(key), b.get(key), True)
        for key, what in INFO:
            row(model, what, a.get(key), b.get(key), False)
    for key, what in TOTALS:
        row("all", what, w.get(key), t.get(key), True)
    for key, what in TOTALS_INFO:
        row("all", what, w.get(key), t.get(key), False)
    for key, what in SETUP:
        row("setup", what, wp[0].get(key), tr[0].get(key), True)
    for key in SETTINGS:
        row("setting", key, wp[0]["settings"].get(key), tr[0]["settings"].get(key), True)
    if not (w_same and t_same):
        mismatches.append("the counts differ between runs of the same side")
    return lines, mismatches


def phase_table(by_label: dict[str, list[dict]], labels: list[str]) -> list[str]:
    labels = [label for label in labels if by_label.get(label)]
    phases = list(dict.fromkeys(p for label in labels for r in by_label[label] for p in r.get("phases_s", {})))
    if not phases:
        return []
    lines = ["| phase | " + " | ".join(f"{label} s (share)" for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]  # fmt: skip
    walls = {label: med([r["wall_s"] for r in by_label[label]]) for label in labels}
    for p in phases:
        cells = []
        for label in labels:
            xs = [r["phases_s"][p] for r in by_label[label] if p in r.get("phases_s", {})]
            cells.append(f"{med(xs):.2f} ({med(xs) / walls[label]:.0%})" if xs else "—")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


# Embedding table (vocab x hidden) of each config's models (../shared/peer/TRL_PPO_BENCHMARK.md): looked up, not
# multiplied, except where the policy and reference use it as their tied output head.
EMBEDDING_PARAMS = {"tiny": 49152 * 64, "smollm2": 49152 * 576}
ADAMW_BYTES_PER_PARAM = 7 * 4  # fp32 AdamW reads param, grad, exp_avg, exp_avg_sq and writes param and both moments


def phase_work(config: str, work: dict) -> dict[str, tuple[float, str]]:
    """The least each phase must compute or move for this work, the same for both sides: GFLOP for the matmuls
    (2 x non-embedding parameters x tokens, plus the output head on the rows that need logits; attention scores,
    norms and activations left out, so rates computed from it are lower bounds), GB of weights for sampling (each
    decoding step reads every weight once) and for AdamW."""
    e = EMBEDDING_PARAMS[config]
    pol, ref, val = work["policy"], work["reference"], work["value"]
    body = lambda m, tokens: 2 * (m["params"] - e) * tokens
    head = lambda rows: 2 * e * rows
    train_fwd = body(pol, pol["grad_tokens"]) + head(work["trained_tokens"]) + body(val, val["grad_tokens"])
    return {
        "generate": ((body(pol, pol["gen_tokens"]) + head(work["sampled_tokens"])) / 1e9, "GFLOP"),
        "generate (weights read)": (pol["gen_calls"] * pol["params"] * 4 / 1e9, "GB"),
        "rollout_ref_fwd": ((body(ref, ref["fwd_tokens"]) + head(work["sampled_tokens"])) / 1e9, "GFLOP"),
        "rollout_value_fwd": (body(val, val["fwd_tokens"]) / 1e9, "GFLOP"),
        "train_forward": (train_fwd / 1e9, "GFLOP"),
        "train_backward": (2 * train_fwd / 1e9, "GFLOP"),
        "train_optimizer_step": (
            # Records written before parameter updates were counted took one step per call, every parameter.
            work.get("parameter_updates", work["optimizer_steps"] * work["optimizer_params"])
            * ADAMW_BYTES_PER_PARAM / 1e9,
            "GB",
        ),
    }


RATES_NOTE = (
    "Each phase's median time, turned into the rate it achieved on the least work that phase must do "
    "(the same for both sides): GFLOP = 2 × non-embedding parameters × tokens, plus the output head on "
    "the rows that need logits (attention scores, norms and activations left out, so the rates are lower "
    "bounds), against the CPU probe; GB = the weights that sampling reads once per decoding step, and "
    "that AdamW reads and writes once per step. A phase near the probe has little left to gain on this "
    "CPU; a gap between the sides is what one of them wastes."
)


COLUMNS_NOTE = ("Columns: `CPU util` is a run's CPU seconds (user + system) over its wall seconds in the timed PPO "
                "loop (2.00 keeps both cores busy throughout), and `load avg before` the 1-minute load average when "
                "the run started. In the phase tables, `gc_collect` is trl's own `gc.collect()` calls (twice an "
                "update) and `other` is the wall time no phase timer holds.")
WHY_NOTE = ("Why a target can be missed on a CPU (a decoding step profiled op by op, bf16 on a CPU without AVX-512 "
            "BF16): docs/performance.md.")


def rate_table(config: str, by_label: dict[str, list[dict]]) -> list[str]:
    """The Markdown rows of the table RATES_NOTE describes, for one config; [] unless both sides ran."""
    wp, tr = by_label.get("wprlhf", []), by_label.get("trl", [])
    if not wp or not tr or config not in EMBEDDING_PARAMS:
        return []
    probe = med([r[k] for r in wp + tr for k in ("probe_gflops_before", "probe_gflops_after")])
    lines = ["| phase | least work | wprlhf s | wprlhf rate | trl s | trl rate |", "|---|---:|---:|---:|---:|---:|"]
    for phase, (amount, unit) in phase_work(config, wp[0]["work"]).items():
        key = phase.split(" ")[0]
        cells = []
        for rs in (wp, tr):
            t = med([r["phases_s"][key] for r in rs if key in r.get("phases_s", {})])
            rate = amount / t if t and not math.isnan(t) else float("nan")
            share = f" ({rate / probe:.0%} of probe)" if unit == "GFLOP" else ""
            cells += [f"{t:.2f}", f"{rate:.1f} {unit}/s{share}"]
        lines.append(f"| {phase} | {amount:,.1f} {unit} | " + " | ".join(cells) + " |")
    return lines + ["", f"CPU probe (fp32 1024³ matmul), median over these runs: {probe:.0f} GFLOP/s."]


def git_state() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "wprlhf", "benchmarks").splitlines()
    changed = ", ".join(line[3:] for line in dirty)
    return f"`{head}`" + (f" plus uncommitted changes in {changed}" if changed else "")


def results_md(args, command: str, records: list[dict], failures: list[str], labels: list[str], git: str) -> str:
    where = "the CPU" if args.device == "cpu" else f"a GPU ({args.device})"
    out = [f"# wprlhf PPO vs trl 1.12.0 PPOTrainer, side by side on {where}", ""]
    out += [(f"Written by `benchmarks/compare.py` on {time.strftime('%Y-%m-%d %H:%M')}, repo at {git}. Command, "
             "from the repo root:"), "", f"    {command}", ""]  # fmt: skip
    if args.repeats < 3:
        out += [(f"> **A harness check, not a comparison:** {args.repeats} run(s) per side. Compare medians over ≥3 "
                 "interleaved runs per side, on a quiet machine (see the load averages)."), ""]  # fmt: skip
    out += [("The work (the same on both sides; the table under each config checks it): "
             "[../shared/peer/TRL_PPO_BENCHMARK.md](../shared/peer/TRL_PPO_BENCHMARK.md). wprlhf runs "
             "`benchmarks/bench_ppo.py --reward tiny-rm` (the peer's tiny random reward model), trl runs "
             "`benchmarks/bench_trl.py` (trl's `PPOTrainer.train()`); each run is a fresh process, the sides "
             "alternate (wprlhf, trl, wprlhf, trl, …), only the PPO loop is timed, peak RSS is the whole process's. "
             "Ratios are wprlhf ÷ trl of the medians: above 1 means wprlhf is faster (or, for RSS and wall, "
             "bigger)."), ""]  # fmt: skip
    if records:
        m = records[0]["machine"]
        loads = [r["loadavg_before"] for r in records]
        probes = [r[k] for r in records for k in ("probe_gflops_before", "probe_gflops_after")]
        capability = f", torch CPU capability {m['capability']} (flags: {', '.join(m['bf16_flags'])})" if "capability" in m else ""
        gpu = next((r["gpu"] for r in records if r.get("gpu")), None)
        if gpu:
            out += [(f"GPU: {gpu}. Each side synchronizes before its clock stops and runs without per-phase "
                     "timers (they would need a synchronization per call); the CPU figures below are the host's."),
                    ""]  # fmt: skip
        out += [(f"Machine: {m['cpu']}{capability}, {m['nproc']} cores visible, Python {m['python']}, {args.threads} torch "
                 f"threads per run. 1-minute load average before each run: {min(loads):.2f}–{max(loads):.2f} "
                 "(another process using the cores slows both sides). CPU probe (fp32 1024³ matmul): "
                 f"{min(probes):.0f}–{max(probes):.0f} GFLOP/s over all runs."), ""]  # fmt: skip
        for side in ("wprlhf", "trl"):
            v = next((r["versions"] for r in records if r["side"] == side), None)
            if v:
                out.append(f"- {side} side: " + ", ".join(f"{k} {x}" for k, x in v.items() if x))
        out += ["", COLUMNS_NOTE, ""]
    for line in failures:
        out += [f"> ⚠️ **A run failed:** {line}", ""]
    for config in args.configs:
        by_label = {label: [r for r in records if r["config"] == config and r["variant"] == label] for label in labels}
        out += [f"## {config}", ""]
        lines, mismatches = work_table(by_label.get("wprlhf", []), by_label.get("trl", []))
        if mismatches:
            out += [f"> ⚠️ **WORK MISMATCH in {config}: the two sides did not do the same work, so the ratios below "
                    "are not like for like.** " + "; ".join(mismatches), ""]  # fmt: skip
        out += speed_table(config, by_label, labels) + [""]
        if args.best and "wprlhf bf16" not in labels:
            out += ["No `wprlhf bf16` row: this wprlhf's PPOConfig has no mixed-precision option.", ""]
        out += [f"### {config}: work per run (forwards, backwards, tokens; fp32 rows)", ""] + lines + [""]
        phases = phase_table(by_label, labels)
        if phases:
            out += [f"### {config}: time per phase (median seconds, share of median wall)", ""] + phases + [""]
        rates = rate_table(config, by_label) if args.device == "cpu" else []
        if rates:
            out += [f"### {config}: where the time goes, against what the CPU can do", "", RATES_NOTE, ""]
            out += rates + [""]
    out += [f"Raw JSON lines: `benchmarks/{args.out.name}` (one per run, with `variant`, `repeat` and `command`).",
            "", WHY_NOTE]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and config (≥3 to compare)")
    parser.add_argument("--best", action="store_true", help="add each side's bf16 mixed-precision row")
    parser.add_argument("--malloc-rows", action="store_true",
                        help="with --best: add wprlhf bf16 with glibc malloc left alone, and trl bf16 with malloc set "
                             "as the wprlhf command sets it (what the allocator setting is worth on each side)")
    parser.add_argument("--lora", type=int, default=0, help="add a wprlhf LoRA row of this rank (not the same work)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", choices=("auto", "fan", "builtin"), default="auto")
    parser.add_argument("--wprlhf-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: both sides on the GPU (no phase timers)")
    parser.add_argument("--trl-python", default=None,
                        help="an interpreter that already has trl 1.12.0 and its needs (e.g. a GPU machine's "
                             "python3 with carried wheels); default: the pinned venv benchmarks/setup_trl.sh makes")
    parser.add_argument("--trl-venv", type=Path, default=Path(os.environ.get("BENCH_VENV") or DEFAULT_TRL_VENV))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, default=HERE / "results_compare.jsonl")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    if not set(args.configs) <= {"tiny", "smollm2"} or args.repeats < 1:
        raise SystemExit("--configs: tiny and/or smollm2; --repeats >= 1")
    if args.malloc_rows and not args.best:
        raise SystemExit("--malloc-rows adds bf16 rows: use it with --best")
    interpreter = ".venv/bin/python" if Path(sys.executable).parent.parent == REPO / ".venv" else "python3"
    # No home directory in the results: the command is shown with `~` for it.
    command = shlex.join([interpreter, "benchmarks/compare.py", *sys.argv[1:]])
    if str(Path.home()) != "/":
        command = command.replace(str(Path.home()) + "/", "~/")

    trl_python = args.trl_python or setup_trl(args)
    prepare_caches(args, trl_python)
    todo = variants(args, trl_python)
    labels = [v["label"] for v in todo]
    git = git_state()
    records, failures = [], []
    for rep in range(1, args.repeats + 1):
        for config in args.configs:
            for variant in todo:  # wprlhf, trl, [wprlhf bf16, trl bf16]: interleaved
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                record, error = run_one(variant, config, args.timeout)
                if record is None:
                    failures.append(f"{variant['label']} {config} run {rep}: {error}")
                    print(f"{variant['label']} {config} run {rep}/{args.repeats} FAILED: {error}", flush=True)
                    continue
                record.update(variant=variant["label"], repeat=rep, loadavg_before=round(load, 2))
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
                print(f"{variant['label']:>12} {config} run {rep}/{args.repeats}: {record['episodes_per_s']:.3f} "
                      f"episodes/s, wall {record['wall_s']:.1f} s, peak RSS {record['peak_rss_mib']:.0f} MiB, probe "
                      f"{record['probe_gflops_before']}/{record['probe_gflops_after']} GFLOP/s, load {load:.2f} "
                      f"({time.perf_counter() - t0:.0f} s with loading)", flush=True)  # fmt: skip
    text = results_md(args, command, records, failures, labels, git)
    args.results.write_text(text, encoding="utf-8")
    print("\n" + text)
    print(
        f"wrote {args.results.relative_to(REPO) if args.results.is_relative_to(REPO) else args.results}; "
        f"appended {len(records)} lines to {args.out.name}"
    )


if __name__ == "__main__":
    main()
