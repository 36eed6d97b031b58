"""Reward-model training steps of a 0.5-1B decoder on one GPU: the speed and memory of the recipe in docs/scaling.md
("A reward model on a GPU"), on a random-initialised model of the hub backbone's shape (no hub access needed).

    python benchmarks/bench_rm_gpu.py                              # Qwen2.5-0.5B's shape, 32 pairs of 512 tokens, bf16
    python benchmarks/bench_rm_gpu.py --gradient-checkpointing     # the same, activations recomputed in the backward
    python benchmarks/bench_rm_gpu.py --size llama3.2-1b --gradient-checkpointing
    python benchmarks/bench_rm_gpu.py --device cpu --size tiny --batch-size 2 --max-length 32 --steps 2   # a smoke run

A step is what `rm train` does with a batch of `--batch-size` pairs, through the same code: the decoder with a fresh
one-output sequence-classification head (fp32 weights) reads the 2 x batch-size texts in one forward under autocast
(`reward_model.head_outputs`), the Bradley-Terry loss of the pairs (`Pairwise.loss`), the backward, clipping at norm
1, the non-finite guard and fused AdamW (`engine.Engine`), with the model in eval mode as `rm train` trains it and,
with --gradient-checkpointing, its layers recomputing in the backward (`models.checkpointing`). Every text is a full
`--max-length` tokens of random ids: the worst case, and the usual one for r/WritingPrompts stories at 512 tokens
with `--window-words 0` (the median story is 648 words). Left out: tokenising the batch, the validation passes and the
final normalisation, none of which the model's size changes much.

The model's weights would not change a step's time or memory, so none are downloaded: the config below is the hub
model's shape (hidden size, layers, heads, key-value heads, MLP width, vocabulary). Prints one JSON record: steps/s,
pairs/s and tokens/s over the timed steps (after --warmup untimed ones; on a GPU the clock stops after a
synchronize), each step's seconds, the parameters, and on CUDA the peak memory torch's allocator held over the whole
run (weights, gradients, AdamW's two moments, activations), in MiB. --out FILE appends it as a JSON line.
Without a CUDA device, `--device cuda` (the default) prints "skipped: no CUDA device" and exits 0. A measurement,
never a test (tests/test_benchmarks.py runs it once, tiny, on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import append_jsonl, machine, on_device, shown, versions

# (model_type, config fields): the hub models' shapes, from their config.json files. Rotary settings are kept for
# faithfulness; they do not change the cost of a step.
SIZES = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                  head_dim=64, intermediate_size=8192, vocab_size=128256,
                                  max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
                                  tie_word_embeddings=True)),
    "tiny": ("qwen2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=1024, max_position_embeddings=1024)),
}  # fmt: skip
PAD_ID = 0
"""The pad id in the model's config; the random texts never hold it, so the head reads each text's last token."""


def build(size: str, device: torch.device, seed: int):
    """A random-initialised `size` decoder with a one-output sequence-classification head, fp32, on `device`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_type, fields = SIZES[size]
    config = AutoConfig.for_model(model_type, num_labels=1, pad_token_id=PAD_ID, **fields)
    torch.manual_seed(seed)
    with device:  # initialised where it trains: 0.5-1B parameters are slow to initialise on a CPU and copy over
        return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


def pairs_batch(pairs: int, length: int, vocab: int, device: torch.device, generator: torch.Generator) -> dict:
    """2 x pairs texts of `length` random token ids (never PAD_ID), unpadded: input_ids, attention_mask (2 x pairs,
    length) on `device`. Texts 2i and 2i + 1 are pair i's two responses."""
    ids = torch.randint(PAD_ID + 1, vocab, (2 * pairs, length), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so that a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    """Build, --warmup untimed steps, --steps timed ones; the JSON record (see the module docstring)."""
    from wprlhf.distributed import make_accelerator
    from wprlhf.engine import Engine
    from wprlhf.models import checkpointing, count_parameters, enable_gradient_checkpointing
    from wprlhf.rewards.reward_model import Pairwise, head_outputs

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build(args.size, device, args.seed)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.eval()  # as `rm train` trains a reward model: no dropout
    accelerator = make_accelerator(device, args.mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = Engine(accelerator, model, {"grad_norm": (params, args.lr)}, weight_decay=0.01, schedule=lambda _: 1.0,
                    max_grad_norm=1.0, what="benchmark step", fix="")  # fmt: skip
    label, vocab = Pairwise(), model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    best = torch.zeros(args.batch_size, dtype=torch.long, device=device)  # which text of a pair wins: any will do
    record = {"bench": "rm_gpu", "size": args.size, "params": count_parameters(model), "batch_pairs": args.batch_size,
              "max_length": args.max_length, "mixed_precision": args.mixed_precision,
              "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup, "steps": args.steps,
              "attn_implementation": model.config._attn_implementation}  # fmt: skip
    step_s, losses = [], []
    try:
        for step in range(args.warmup + args.steps):
            batch = pairs_batch(args.batch_size, args.max_length, vocab, device, generator)
            synchronize(device)
            started = time.perf_counter()
            with checkpointing(model):  # a no-op without --gradient-checkpointing
                scores = head_outputs(engine.model, batch).view(args.batch_size, 2)  # (pairs, 2) rewards
                loss, _ = label.loss(scores, best)
            engine.backward(loss)
            engine.step(step + 1, loss=loss)
            synchronize(device)
            if step >= args.warmup:
                step_s.append(time.perf_counter() - started)
                losses.append(float(loss.detach()))
    except torch.OutOfMemoryError as err:
        record["oom"] = str(err).splitlines()[0]
    timed = sum(step_s)
    if step_s:
        record.update(steps_per_s=round(len(step_s) / timed, 4),
                      pairs_per_s=round(len(step_s) * args.batch_size / timed, 2),
                      tokens_per_s=round(len(step_s) * 2 * args.batch_size * args.max_length / timed, 1),
                      step_s=[round(s, 4) for s in step_s], loss=[round(x, 5) for x in losses])  # fmt: skip
    record.update(on_device(device.type))
    if device.type == "cuda":
        record["gpu_total_mib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**20, 1)
    record.update(machine=machine(), versions=versions(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  command=" ".join(["python", "benchmarks/bench_rm_gpu.py", *sys.argv[1:]]))  # fmt: skip
    return record


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="qwen2.5-0.5b", choices=sorted(SIZES))
    parser.add_argument("--batch-size", type=int, default=32, help="pairs a step (rm train's --batch-size)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens of every text (rm train's --max-length)")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator and kernel warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append the record to this JSON-lines file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """0 after a measurement, or when --device cuda finds no GPU (skipped); 1 when the step ran out of memory."""
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False: no GPU, or a CPU build of torch); "
              "`--device cpu --size tiny` runs the same steps as a smoke test")  # fmt: skip
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run(args)
    print(json.dumps(record))
    if args.out:
        append_jsonl(args.out, record)
        print(f"appended to {shown(args.out)}", file=sys.stderr)
    return 1 if "oom" in record else 0


if __name__ == "__main__":
    sys.exit(main())
