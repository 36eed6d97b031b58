"""Sampling speed: wprlhf's KV-cached sampler vs transformers `model.generate`, same model, same batch.

One process, the sides interleaved (wprlhf, HF with output_scores as trl calls it, HF without) so that the
host's drifting speed hits them alike; 1 warm-up each, then --repeats timed calls each. Fixed-length work:
queries of exactly 32 tokens (no padding), 32 new tokens per row (no stop), temperature 0.7, full vocabulary.

    .venv/bin/python benchmarks/bench_sampler.py                      # smollm2, batch 8
    .venv/bin/python benchmarks/bench_sampler.py --model tiny         # random TINY_ARCH, batch 16
    .venv/bin/python benchmarks/bench_sampler.py --precision bf16     # as a bf16 run samples (see below)
    .venv/bin/python benchmarks/bench_sampler.py --precision bf16 --batch 64 --samples-per-prompt 16 \
        --prompt-tokens 96 --new-tokens 64 --sides wprlhf,wprlhf_repeated,hf   # a best-of-n / DPO pool's batch
    .venv/bin/python benchmarks/bench_sampler.py --precision bf16 --batch 64 --samples-per-prompt 8 \
        --new-tokens 320 --whole "Write a complete short story of about 150 words for this writing prompt." \
        --sides wprlhf,wprlhf_keep_rows,hf      # a whole-story pool's batch (examples/stories-whole.yaml)

--whole INSTRUCTION: whole responses, as `wprlhf stories` draws them: real prompts in the chat template after the
instruction, each row ending at its end-of-turn or at --new-tokens. Rows end at different steps; `wprlhf` lets the
ended rows leave the batch (`generation.DROP_FINISHED`), `wprlhf_keep_rows` keeps them stepping to the end as the
sampler did before (and as HF `generate` does), on the same samples. tokens/s counts real tokens.

--samples-per-prompt K: the batch is batch / K prompts answered K times each, as the pools of best-of-n and DPO
are drawn. wprlhf runs each prompt's forward once and copies its KV cache (`sample(num_samples=K)`); the side
`wprlhf_repeated` runs wprlhf's sampler on K copies of each prompt instead (what it did before), and HF `generate`
gets `num_return_sequences=K` (it, too, copies the prompts before its first forward).

--precision bf16 times what a run under `--mixed-precision bf16` does: wprlhf samples from the fp32 policy inside one
bf16 autocast block (as `Trainer.sample` does: each weight is cast once a call, and every step reads the casts); HF
`generate` runs the fp32 model under the same autocast in inference mode (each step casts every weight, as in trl's
bf16 run, whose prepared model enters autocast anew at every forward), and once more on a copy of the model holding
those bf16 casts (`hf_bf16_weights`, `models.matmuls_in`: the same weights, dtype and arithmetic as wprlhf's, only
the decoding loop differs).

Prints a markdown table; appends one JSON line per run to --out (default benchmarks/results_sampler.jsonl).
This is a measurement, never a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from _common import (
    REPO,
    append_jsonl,
    cpu_probe,
    cpu_seconds,
    fixed_queries,
    machine,
    med,
    prompt_texts,
    peak_rss_mib,
    shown,
    versions,
)

SIDES = ("wprlhf", "wprlhf_repeated", "wprlhf_keep_rows", "hf_scores", "hf", "hf_bf16_weights")
LABELS = {
    "wprlhf": "wprlhf `sample` (KV cache)",
    "wprlhf_repeated": "wprlhf `sample` on K copies of each prompt (no shared prefill)",
    "wprlhf_keep_rows": "wprlhf `sample`, finished rows kept in the batch to the end (before 2026-12-07)",
    "hf_scores": "HF `generate`, output_scores=True (trl's call)",
    "hf": "HF `generate`, no scores",
    "hf_bf16_weights": "HF `generate` on a copy holding the bf16 casts, no scores",
}


def make_sides(model, tokenizer, queries, query_mask, new_tokens: int, temperature: float, seed: int, bf16: bool,
               k: int = 1, whole: bool = False):  # fmt: skip
    """name -> zero-argument callable that samples the batch once and returns (the response tokens (B * k, Tr),
    the number of real response tokens) for queries (B, Tq), k responses each. bf16: every side runs under bf16
    autocast (wprlhf's in one block, reading cached casts; see the docstring). whole: rows end at a stop token
    (end-of-turn) or at new_tokens, and the wprlhf sides draw the same samples at every call (a fresh generator
    seeded `seed`), so they do the same work; otherwise every row gets exactly new_tokens."""
    import wprlhf.generation as generation
    from transformers import GenerationConfig as HFGenerationConfig

    from wprlhf.generation import GenerationConfig, sample
    from wprlhf.models import matmuls_in, stop_token_ids

    config = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=whole, temperature=temperature)
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    shared = torch.Generator().manual_seed(seed)
    generator = lambda: torch.Generator().manual_seed(seed) if whole else shared  # noqa: E731
    attention_mask = query_mask.long()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    bf16_copy = matmuls_in(model, torch.bfloat16) if bf16 else None

    def wprlhf_side():
        with autocast():
            gen = sample(model, queries, query_mask, config, stops, pad, generator(), num_samples=k)
        return gen.responses, int(gen.response_mask.sum())

    def wprlhf_repeated_side():
        copies, copies_mask = queries.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
        with autocast():
            gen = sample(model, copies, copies_mask, config, stops, pad, generator())
        return gen.responses, int(gen.response_mask.sum())

    def wprlhf_keep_rows_side():
        keep, generation.DROP_FINISHED = generation.DROP_FINISHED, 2.0  # a share no batch reaches: rows stay
        try:
            return wprlhf_side()
        finally:
            generation.DROP_FINISHED = keep

    def hf_side(scores: bool, on=model):
        # A fresh config, so nothing from the checkpoint's generation_config adds a logits processor.
        hf_config = HFGenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
            min_new_tokens=0 if whole else new_tokens, eos_token_id=stops if whole else tokenizer.eos_token_id,
            pad_token_id=pad,
            bos_token_id=tokenizer.bos_token_id, output_scores=scores, return_dict_in_generate=True,
            num_return_sequences=k,
        )  # fmt: skip

        def run():
            with torch.inference_mode(), autocast():
                out = on.generate(input_ids=queries, attention_mask=attention_mask, generation_config=hf_config)
            if scores and not whole:
                assert len(out.scores) == new_tokens
            responses = out.sequences[:, queries.shape[1] :]
            # A row's real tokens: up to and including its first stop token (HF pads after it).
            ended = torch.isin(responses, torch.tensor(stops))
            real = (ended.long().cumsum(1) - ended.long()) == 0
            return responses, int(real.sum())

        return run

    sides = {"wprlhf": wprlhf_side, "hf_scores": hf_side(True), "hf": hf_side(False)}
    if whole:
        sides["wprlhf_keep_rows"] = wprlhf_keep_rows_side
    if k > 1:
        sides["wprlhf_repeated"] = wprlhf_repeated_side
    if bf16:
        sides["hf_bf16_weights"] = hf_side(False, on=bf16_copy)
    return sides


def whole_queries(tokenizer, prompts: int, instruction: str, source: str, seed: int):
    """(queries (B, Tq) left-padded, query_mask (B, Tq), source): `prompts` real prompts in the chat template after
    `instruction`, as the stories pipeline asks for whole stories, shuffled with `seed`."""
    from wprlhf.generation import encode_prompts

    texts, name = prompt_texts(source)
    random.Random(seed).shuffle(texts)
    queries, query_mask = encode_prompts(tokenizer, texts[:prompts], max_prompt_length=256, instruction=instruction)
    return queries, query_mask, name


def profile_sides(sides: dict, rows: int = 12) -> None:
    """One profiled call per side: the ops that take the time (printed, not saved)."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n### profile: {LABELS[name]}\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 for smollm2, 16 for tiny")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side, after 1 warm-up each")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", choices=("auto", "fan", "builtin"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: as a --mixed-precision bf16 run samples (module docstring)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated subset of {','.join(SIDES)} (the last only with --precision bf16)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per side")
    parser.add_argument("--out", default=None, help="JSON lines file (default: benchmarks/results_sampler.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="K: the batch is batch/K prompts, K responses each (module docstring)")
    parser.add_argument("--whole", default=None, metavar="INSTRUCTION",
                        help="whole responses: the prompts in the chat template after this instruction, each row "
                             "ending at end-of-turn or --new-tokens (module docstring); tokens/s counts real tokens")
    args = parser.parse_args()
    batch = args.batch or (8 if args.model == "smollm2" else 16)
    k = args.samples_per_prompt
    if k < 1 or batch % k:
        raise SystemExit(f"--samples-per-prompt {k} must be >= 1 and divide the batch {batch}")
    torch.set_num_threads(args.threads)
    sides_wanted = [s for s in args.sides.split(",") if s]
    if not set(sides_wanted) <= set(SIDES) or "wprlhf" not in sides_wanted:
        raise SystemExit(f"--sides must include wprlhf and name only {SIDES}")

    from wprlhf.models import load_policy

    t0 = time.perf_counter()
    model, tokenizer = load_policy(args.model, dtype=torch.float32, seed=args.seed)
    load_s = time.perf_counter() - t0
    if args.whole is not None:
        queries, query_mask, source = whole_queries(tokenizer, batch // k, args.whole, args.prompts, args.seed)
    else:
        queries, query_mask, source = fixed_queries(tokenizer, batch // k, args.prompt_tokens, args.prompts)
    sides = {name: fn for name, fn in make_sides(model, tokenizer, queries, query_mask, args.new_tokens,
                                                 args.temperature, args.seed, args.precision == "bf16", k,
                                                 args.whole is not None).items()
             if name in sides_wanted}  # fmt: skip
    torch.manual_seed(args.seed)

    probe_before = cpu_probe()
    for name, fn in sides.items():  # warm-up, 1 each
        responses, _ = fn()
        if args.whole is None:
            assert responses.shape == (batch, args.new_tokens), (name, responses.shape)  # fixed-length work
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    real: dict[str, list[int]] = {k: [] for k in sides}
    for _ in range(args.repeats):  # interleaved: A, B, C, A, B, C, ...
        for name, fn in sides.items():
            c0, w0 = cpu_seconds(), time.perf_counter()
            real[name].append(fn()[1])
            times[name].append(time.perf_counter() - w0)
            cpu[name].append(cpu_seconds() - c0)
    probe_after = cpu_probe()
    if args.profile:
        profile_sides(sides)

    summary = {}
    for name in sides:
        tokens = med(real[name])  # fixed-length work: batch x new_tokens
        paired = [h / w for h, w in zip(times[name], times["wprlhf"])]  # per round: >1 = wprlhf faster
        summary[name] = {
            "median_s": round(med(times[name]), 4), "min_s": round(min(times[name]), 4),
            "max_s": round(max(times[name]), 4), "tokens_per_s": round(tokens / med(times[name]), 1),
            "best_tokens_per_s": round(tokens / min(times[name]), 1),
            "cpu_util": round(sum(cpu[name]) / sum(times[name]), 2),
            "wprlhf_speedup_median_ratio": round(med(times[name]) / med(times["wprlhf"]), 3),
            "wprlhf_speedup_paired": round(med(paired), 3), "real_tokens_median": tokens,
        }  # fmt: skip

    work = (f"whole responses of at most {args.new_tokens} tokens (median {summary['wprlhf']['real_tokens_median']:.0f}"
            f" real tokens a call)" if args.whole is not None else
            f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens")  # fmt: skip
    print(f"\n## Sampler: {args.model}, batch {batch} ({batch // k} prompts x {k}), {work}, "
          f"{args.threads} threads, {args.precision}, {args.repeats} interleaved repeats "
          f"(prompts: {source})\n")  # fmt: skip
    print("| side | median s | min–max s | tokens/s (median) | tokens/s (best) | CPU util | wprlhf ÷ side tokens/s "
          "(medians) | same, median of paired rounds |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {LABELS[name]} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} | {s['tokens_per_s']:.0f} | "
              f"{s['best_tokens_per_s']:.0f} | {s['cpu_util']:.2f} | {s['wprlhf_speedup_median_ratio']:.2f} | "
              f"{s['wprlhf_speedup_paired']:.2f} |")  # fmt: skip
    print(f"\nCPU probe (fp32 1024³ matmul, median GFLOP/s): before {probe_before}, after {probe_after}. "
          f"Peak RSS {peak_rss_mib():.0f} MiB.")  # fmt: skip

    record = {
        "bench": "sampler", "model": args.model, "batch": batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "temperature": args.temperature, "threads": args.threads,
        "precision": args.precision, "samples_per_prompt": k, "whole_instruction": args.whole,
        "repeats": args.repeats, "prompts": source, "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "summary": summary, "probe_gflops_before": probe_before, "probe_gflops_after": probe_after,
        "load_s": round(load_s, 2), "peak_rss_mib": peak_rss_mib(), "machine": machine(), "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    out = Path(args.out or REPO / "benchmarks" / "results_sampler.jsonl")
    append_jsonl(out, record)
    print(f"appended to {shown(out)}")


if __name__ == "__main__":
    main()
