"""Shared pieces of the benchmarks: 32-token query batches, the CPU probe, run metadata, work counts, JSON lines.

Imported by the bench_*.py scripts in this folder (run them as `python benchmarks/bench_X.py` from the repo root),
with wprlhf's venv and, by bench_trl.py, with the trl venv (so nothing here imports wprlhf at module level).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAN_PROMPTS = REPO.parent / "shared" / "data" / "writing_prompts" / "fan_prompts.csv"


# The peer's work per config (shared/peer/TRL_PPO_BENCHMARK.md), in wprlhf's PPOConfig names; bench_trl.py maps
# them to trl's (num_mini_batches, num_ppo_epochs, total_episodes = batch_size * steps).
WORK = {
    "smollm2": {"batch_size": 8, "num_minibatches": 2, "ppo_epochs": 1, "steps": 2},
    "tiny": {"batch_size": 16, "num_minibatches": 4, "ppo_epochs": 4, "steps": 4},
}


def prompt_texts(source: str = "auto") -> tuple[list[str], str]:
    """Prompt texts and the name of their source: `fan` (../shared/data, when present) or `builtin`."""
    if source in ("auto", "fan") and FAN_PROMPTS.exists():
        with open(FAN_PROMPTS, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return [r["prompt"].strip() for r in rows if r.get("prompt", "").strip()], "fan_prompts.csv"
    if source == "fan":
        raise SystemExit(f"--prompts fan: {FAN_PROMPTS.relative_to(REPO.parent)} is absent")
    from wprlhf.data import builtin_prompts

    return builtin_prompts(), "builtin"


def fixed_queries(tokenizer, batch_size: int, length: int = 32, source: str = "auto", seed: int = 42):
    """(queries (B, length) int64, query_mask (B, length) bool all True, source).

    Prompts are tokenised without special tokens; those shorter than `length` are dropped, the rest cut to their
    first `length` tokens (as the trl peer does), then shuffled with `seed`. The built-in prompts are mostly
    shorter than 32 tokens, so with them consecutive prompts are joined into one text first.
    """
    texts, name = prompt_texts(source)
    if name == "builtin":
        texts = [" ".join(texts[i : i + 4]) for i in range(0, len(texts), 2)]
    ids = [row[:length] for row in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(row) >= length]
    if len(ids) < batch_size:
        raise SystemExit(f"only {len(ids)} prompts of >= {length} tokens in {name}; need {batch_size}")
    random.Random(seed).shuffle(ids)
    queries = torch.tensor(ids[:batch_size], dtype=torch.long)
    return queries, torch.ones_like(queries, dtype=torch.bool), name


def cpu_probe(n: int = 1024, repeats: int = 7) -> float:
    """Median fp32 n^3 matmul GFLOP/s with the current torch thread count (the host's speed right now)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return round(statistics.median(rates), 1)


def peak_rss_mib() -> float:
    """ru_maxrss of this process (KiB on Linux) in MiB: everything, imports and model loading included."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return float("nan")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine() -> dict:
    """The CPU a run measured, with what decides bf16's speed there: torch's kernel set (AVX2 / AVX512; bf16 is
    several times slower than fp32 on AVX2) and whether the CPU has AVX-512 BF16 or AMX."""
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})}  # fmt: skip


def on_device(device: str) -> dict:
    """What a run's record says of its accelerator: `device`, and on CUDA the GPU's name and the peak memory torch's
    allocator held (MiB). On a GPU, kernels run asynchronously: callers synchronize before reading a clock and run
    without per-phase timers, which would need a synchronization per call and so change what is measured."""
    if device == "cpu":
        return {"device": "cpu"}
    torch.cuda.synchronize()
    return {"device": device, "gpu": torch.cuda.get_device_name(),
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}  # fmt: skip


def check_device(device: str) -> None:
    """Exit with a clear message when `device` ('cpu' or 'cuda') is not usable here."""
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA GPU (torch.cuda.is_available() is False)")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    import wprlhf

    try:
        accelerate = version("accelerate")
    except PackageNotFoundError:
        accelerate = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate,
            "wprlhf": getattr(wprlhf, "__version__", "?")}  # fmt: skip


def run_child(cmd: list[str], what: str) -> dict:
    """Run one measurement in a fresh process (`cmd`, from the repo root) and return the JSON record it prints last;
    SystemExit naming `what` (e.g. "run 2 of smollm2") with the end of its stderr if it fails."""
    import subprocess
    import sys

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def append_jsonl(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def shown(path: str | Path) -> str:
    """A path for messages: relative to the current directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


class WorkCounter:
    """Counts the PPO work a run does, per model, so two implementations can be checked to do the same work.

    Per watched model (its backbone, `model.base_model`, is where every path through the model passes: a causal
    LM's forward, a value head read off the backbone, HF generate):
      gen_calls / gen_tokens     backbone forwards with a KV cache (sampling: the prefill and one per new token),
                                 and the token positions they feed in;
      fwd_calls / fwd_seqs / fwd_tokens            full forwards without autograd (rollout scoring);
      grad_calls / grad_seqs / grad_tokens         forwards with autograd on (training);
      backward                   backward passes that reached the input embeddings (a hook on that weight's grad);
      head_rows                  rows the output head (LM head or scalar head) computed: informational, an
                                 implementation may skip rows it doesn't need.
    Plus optimizer steps and parameter updates (a global optimizer hook: step calls, and the parameters each call
    updated, those with a gradient; an implementation may step each network apart), the sampled tokens (the
    harness reports them) and the trained tokens (response tokens in the training forwards). The hooks are a few
    Python operations per backbone call (a few dozen calls per PPO update), nothing measurable next to the forwards
    they count.
    """

    KEYS = ("gen_calls", "gen_tokens", "fwd_calls", "fwd_seqs", "fwd_tokens", "grad_calls", "grad_seqs",
            "grad_tokens", "backward", "head_rows")  # fmt: skip

    def __init__(self, response_tokens: int):
        self.response_tokens = response_tokens
        self.models: dict[str, dict] = {}
        self.optimizer_steps = 0
        self.parameter_updates = 0
        self.sampled_tokens = 0
        self._handles = []

    def watch(self, name: str, model) -> None:
        c = self.models[name] = dict.fromkeys(self.KEYS, 0)
        c["params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

        def pre_hook(_module, args, kwargs):
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds", args[0] if args else None)
            b, t = x.shape[0], x.shape[1]
            if kwargs.get("past_key_values") is not None:
                c["gen_calls"] += 1
                c["gen_tokens"] += b * t
            else:
                kind = "grad" if torch.is_grad_enabled() else "fwd"
                c[kind + "_calls"] += 1
                c[kind + "_seqs"] += b
                c[kind + "_tokens"] += b * t

        def head_hook(_module, _inputs, output):
            c["head_rows"] += output.shape[:-1].numel()

        def grad_hook(_param):
            c["backward"] += 1

        self._handles.append(model.base_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        head = model.get_output_embeddings() if hasattr(model, "lm_head") else getattr(model, "score", None)
        if head is not None:
            self._handles.append(head.register_forward_hook(head_hook))
        embedding = model.get_input_embeddings().weight
        if embedding.requires_grad:
            self._handles.append(embedding.register_post_accumulate_grad_hook(grad_hook))

    def start(self) -> None:
        """Count optimizer steps from now on (every optimizer in the process)."""

        from torch.optim.optimizer import register_optimizer_step_post_hook

        def step_hook(optimizer, _args, _kwargs):
            self.optimizer_steps += 1
            params = {id(p): p for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
            self.parameter_updates += sum(p.numel() for p in params.values())

        self._handles.append(register_optimizer_step_post_hook(step_hook))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def summary(self, optimizer=None) -> dict:
        out = {name: dict(c) for name, c in self.models.items()}
        out["optimizer_steps"] = self.optimizer_steps
        out["parameter_updates"] = self.parameter_updates
        if optimizer is not None:
            params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
            out["optimizer_params"] = sum(p.numel() for p in params.values())
        out["sampled_tokens"] = self.sampled_tokens
        out["trained_tokens"] = self.models.get("policy", {}).get("grad_seqs", 0) * self.response_tokens
        return out
