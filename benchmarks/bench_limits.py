"""How close each phase of a `wprlhf stories` run came to this machine's limit (roofline, Williams et al. 2009).

Two probes give the limit: FLOP/s of a matmul (fp32 and bf16, at a square size and at a decoding step's shape)
and bytes/s of a memory read (a 1 GiB sum). Each phase's work is counted from what the run wrote:

- sampling (a DPO round's pool, best-of-n's pool, evaluation's samples): per response token, the forward's FLOPs
  (2 x the matmul weights, the tied head included, + 4 x layers x context x hidden for attention) and the bytes it
  must read (the weights once per step of a `--pool-batch-size` batch, shared by its rows, + the row's own KV cache
  at its context). A token's floor is the larger of FLOPs / FLOP/s and bytes / bytes/s; the phase's floor is the
  sum over its tokens, prompts' prefill included (compute-bound);
- training (DPO): 6 x weights FLOPs per token for the policy's forward and backward, 2 x for the reference's
  forward, over both responses of each pair and every epoch;
- the reward models' phases (MiniLM): 6 x weights FLOPs per token of max_length, both texts of each comparison.

share = floor / measured time: 100 % is the machine's limit; what is left is overhead (Python, cache copies,
non-matmul ops, the batch's ended rows). The bf16 probe is the limit where the run sampled in bf16.

    .venv/bin/python benchmarks/bench_limits.py --run runs/stories-whole          # a finished run

Prints a markdown table; appends one JSON line to benchmarks/results_limits.jsonl with the machine. This is a
measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import REPO, append_jsonl, machine, med, shown, versions


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Median FLOP/s of (m, k) @ (k, n) in dtype over about `seconds`."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(8):
            a @ b
        rates.append(8 * 2 * m * k * n / (time.perf_counter() - t0))
    return med(rates)


def read_bandwidth(gib: float = 1.0, seconds: float = 1.5) -> float:
    """Median bytes/s of summing a gib-GiB fp32 tensor (a read of memory far larger than the caches)."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0))
    return med(rates)


def probes(hidden: int, ffn: int, rows: int) -> dict:
    return {"fp32_gflops": matmul_flops(1024, 1024, 1024, torch.float32) / 1e9,
            "bf16_gflops": matmul_flops(1024, 1024, 1024, torch.bfloat16) / 1e9,
            "fp32_step_gflops": matmul_flops(rows, hidden, ffn, torch.float32) / 1e9,
            "bf16_step_gflops": matmul_flops(rows, hidden, ffn, torch.bfloat16) / 1e9,
            "read_gbs": read_bandwidth() / 1e9}  # fmt: skip


class Shape:
    """What a token costs a decoder: matmul weights (tied head counted as a matmul), layers, hidden, KV width."""

    def __init__(self, config):
        h, L, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
        kv = h // config.num_attention_heads * config.num_key_value_heads
        self.hidden, self.layers, self.kv, self.ffn = h, L, kv, ffn
        self.weights = L * (2 * h * h + 2 * h * kv + 3 * h * ffn) + h * vocab  # q, o; k, v; gate, up, down; head

    def flops(self, context: int) -> float:
        return 2 * self.weights + 4 * self.layers * context * self.hidden

    def kv_bytes(self, context: int, width: int) -> float:
        return 2 * self.layers * context * self.kv * width


def sampling_floor(shape: Shape, prompts: list[int], responses: list[list[int]], rows: int, flops: float,
                   bandwidth: float, width: int) -> tuple[float, int]:  # fmt: skip
    """(seconds at the limit, response tokens) for prompts' token counts and each prompt's responses' token
    counts, sampled `rows` rows a batch in a dtype of `width` bytes."""
    floor, tokens = 0.0, 0
    for q, lengths in zip(prompts, responses):
        floor += shape.flops(q) * q / flops  # the prefill, once per prompt (compute-bound)
        for n in lengths:
            for t in range(n):
                step = max(shape.flops(q + t) / flops,
                           (shape.weights * width / rows + shape.kv_bytes(q + t, width)) / bandwidth)  # fmt: skip
                floor += step
            tokens += n
    return floor, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished `wprlhf stories` run directory")
    parser.add_argument("--phase-seconds", default="", help="override or add phase times, e.g. 'dpo/pool=1500'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON lines file (default: benchmarks/results_limits.jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig

    from wprlhf.distributed import resolve_mixed_precision
    from wprlhf.generation import encode_prompts
    from wprlhf.models import load_tokenizer, resolve_name

    run = Path(args.run)
    state = json.loads((run / "stories_state.json").read_text())
    config = state["config"]
    tokenizer = load_tokenizer(config["policy"])
    shape = Shape(AutoConfig.from_pretrained(resolve_name(config["policy"])))
    rows = config["pool_batch_size"]
    limit = probes(shape.hidden, shape.ffn, rows)
    precision = resolve_mixed_precision(config.get("mixed_precision", "auto"), torch.device("cpu"))
    width = 2 if precision == "bf16" else 4  # the pools' dtype (evaluation's own samples stay fp32)
    flops = limit["bf16_step_gflops" if width == 2 else "fp32_step_gflops"] * 1e9
    bandwidth = limit["read_gbs"] * 1e9
    seconds = dict(state["timings_s"])
    for item in filter(None, args.phase_seconds.split(",")):
        name, value = item.split("=")
        seconds[name.strip()] = float(value)

    def pool_work(path: Path):
        rows_ = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        queries, mask = encode_prompts(tokenizer, [r["prompt"] for r in rows_], max_prompt_length=256,
                                       instruction=config["instruction"])  # fmt: skip
        lengths = [[len(ids) + 1 for ids in tokenizer(r["responses"], add_special_tokens=False)["input_ids"]]
                   for r in rows_]  # fmt: skip
        return mask.sum(1).tolist(), lengths

    table = []
    for phase in [p for p in state["done"] if p.startswith("dpo")] + ["best_of"]:
        path = run / phase / "pool.jsonl"
        if not path.exists():
            continue
        prompts, lengths = pool_work(path)
        floor, tokens = sampling_floor(shape, prompts, lengths, rows, flops, bandwidth, width)
        stats = json.loads((run / phase / "pool_stats.json").read_text()) if phase != "best_of" else {}
        took = seconds.get(f"{phase}/pool", stats.get("pool_s", seconds.get(phase)))
        table.append({"phase": f"{phase}: sampling the pool" if phase != "best_of" else "best_of: sampling",
                      "seconds": took, "tokens": tokens, "floor_s": floor})  # fmt: skip
        if phase.startswith("dpo") and seconds.get(phase) and took:
            pairs = json.loads((run / phase / "pool_stats.json").read_text())["pairs"]
            per = sum(q + med(ls) for q, ls in zip(prompts, lengths)) / len(prompts)  # a pair's side, tokens
            epochs = config["dpo"]["epochs"]
            train_flops = pairs * 2 * per * (6 * epochs + 2) * shape.weights
            table.append({"phase": f"{phase}: DPO training", "seconds": seconds[phase] - took,
                          "tokens": int(pairs * 2 * per * epochs), "floor_s": train_flops / flops})  # fmt: skip
    for name in ("rm", "judge"):
        if seconds.get(name, 0) > 5:  # less: the run reused a cached model
            size = {"rm": config["rm"]["examples"], "judge": config["judge"]["examples"]}[name]
            minilm = 22.7e6 - 30522 * 384  # MiniLM-L6's weights less its embedding table (looked up, not multiplied)
            work = size * 2 * 128 * 6 * minilm  # both texts of a comparison at max_length 128, forward + backward
            table.append({"phase": f"{name}: reward model training (MiniLM)", "seconds": seconds[name],
                          "tokens": size * 2 * 128, "floor_s": work / flops})  # fmt: skip
    if seconds.get("eval"):
        table.append({"phase": "eval: every side sampled, scored and judged", "seconds": seconds["eval"],
                      "tokens": None, "floor_s": None})  # fmt: skip

    host = machine()
    print(f"\n## Limits: {run.name} on {host['cpu']} ({host['capability']}, {', '.join(host['bf16_flags'])}), "
          f"{args.threads} threads\n")  # fmt: skip
    print(f"Probes: matmul fp32 {limit['fp32_gflops']:.0f} GFLOP/s, bf16 {limit['bf16_gflops']:.0f} (1024³); at a "
          f"decoding step's shape ({rows} x {shape.hidden} x {shape.ffn}) fp32 {limit['fp32_step_gflops']:.0f}, bf16 "
          f"{limit['bf16_step_gflops']:.0f}; memory read {limit['read_gbs']:.1f} GB/s. Sampled in "
          f"{'bf16' if width == 2 else 'fp32'}, {rows} rows a batch.\n")  # fmt: skip
    print("| phase | time (min) | tokens | tokens/s | floor (min) | share of the limit |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in table:
        rate = f"{row['tokens'] / row['seconds']:.0f}" if row["tokens"] and row["seconds"] else ""
        floor = f"{row['floor_s'] / 60:.1f}" if row["floor_s"] else ""
        share = f"{100 * row['floor_s'] / row['seconds']:.0f} %" if row["floor_s"] and row["seconds"] else ""
        print(f"| {row['phase']} | {row['seconds'] / 60:.1f} | {row['tokens'] or ''} | {rate} | {floor} | {share} |")
    out = Path(args.out or REPO / "benchmarks" / "results_limits.jsonl")
    append_jsonl(out, {"bench": "limits", "run_config": config, "timings_s": seconds, "probes": limit,
                       "table": table, "machine": host, "versions": versions(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")})  # fmt: skip
    print(f"\nappended to {shown(out)}")


if __name__ == "__main__":
    main()
