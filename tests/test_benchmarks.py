"""The benchmark's arithmetic (benchmarks/compare.py): the least work per phase that its rate table divides by."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

P = 134_515_008  # SmolLM2-135M with its tied embedding counted once
E = 49152 * 576
WORK = {
    "policy": {"gen_calls": 64, "gen_tokens": 1008, "grad_tokens": 1024, "params": P},
    "reference": {"fwd_tokens": 1024, "params": P},
    "value": {"fwd_tokens": 1024, "grad_tokens": 1024, "params": P + 576},
    "optimizer_steps": 8, "parameter_updates": 4 * (2 * P + 576), "optimizer_params": 2 * P + 576,
    "sampled_tokens": 512, "trained_tokens": 512,
}  # fmt: skip


def test_phase_work_against_hand_counts():
    work = {phase: amount for phase, (amount, _unit) in compare.phase_work("smollm2", WORK).items()}
    body = P - E  # multiplied per token; the embedding only where it is the output head
    assert work["generate"] == pytest.approx(((2 * body * 1008) + 2 * E * 512) / 1e9)
    assert work["generate (weights read)"] == pytest.approx(64 * P * 4 / 1e9)
    assert work["rollout_ref_fwd"] == pytest.approx((2 * body * 1024 + 2 * E * 512) / 1e9)
    assert work["rollout_value_fwd"] == pytest.approx(2 * (body + 576) * 1024 / 1e9)
    train_forward = 2 * body * 1024 + 2 * E * 512 + 2 * (body + 576) * 1024
    assert work["train_forward"] == pytest.approx(train_forward / 1e9)
    assert work["train_backward"] == pytest.approx(2 * train_forward / 1e9)
    assert work["train_optimizer_step"] == pytest.approx(4 * (2 * P + 576) * 28 / 1e9)
    # A record from before parameter updates were counted: one call stepped every parameter.
    old = {k: v for k, v in {**WORK, "optimizer_steps": 4}.items() if k != "parameter_updates"}
    assert compare.phase_work("smollm2", old)["train_optimizer_step"][0] == pytest.approx(work["train_optimizer_step"])


def test_rate_table_divides_work_by_median_phase_time():
    def record(side, generate_s):
        return {"side": side, "work": WORK, "probe_gflops_before": 100.0, "probe_gflops_after": 100.0,
                "phases_s": {"generate": generate_s, "train_backward": 10.0}}  # fmt: skip

    by_label = {"wprlhf": [record("wprlhf", s) for s in (4.0, 5.0, 60.0)], "trl": [record("trl", 8.0)]}
    rows = {line.split(" | ")[0].strip("| "): line for line in compare.rate_table("smollm2", by_label)}
    gen_gb = 64 * P * 4 / 1e9
    assert f"| 5.00 | {gen_gb / 5.0:.1f} GB/s |" in rows["generate (weights read)"]  # the median, not the mean
    assert f"| 8.00 | {gen_gb / 8.0:.1f} GB/s |" in rows["generate (weights read)"]
    assert "(93% of probe)" in rows["train_backward"]  # 2 x 464 GFLOP / 10 s against 100 GFLOP/s
    assert compare.rate_table("smollm2", {"wprlhf": by_label["wprlhf"]}) == []  # one side alone: no comparison


def test_work_counter_counts_the_parameters_each_step_updated():
    """Stepping two networks apart (the policy, then the value model) is the same parameter updates as one step."""
    import torch

    path = Path(__file__).parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    policy, value = torch.nn.Linear(3, 4), torch.nn.Linear(3, 1)  # 16 and 4 parameters
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()])
    counter = common.WorkCounter(response_tokens=1)
    counter.start()
    try:
        for model in (policy, value):  # apart: the other model has no gradients
            model(torch.ones(2, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        policy(torch.ones(2, 3)).sum().backward()
        value(torch.ones(2, 3)).sum().backward()
        optimizer.step()  # together
    finally:
        counter.stop()
    work = counter.summary(optimizer)
    assert (work["optimizer_steps"], work["parameter_updates"], work["optimizer_params"]) == (3, 40, 20)


def test_limits_count_smollm2s_matmul_weights_and_take_each_tokens_larger_floor(monkeypatch):
    """benchmarks/bench_limits.py: SmolLM2-135M's matmul weights are its parameters less its norms (the tied head
    counted as a matmul, the embedding lookup not); a sampled token costs the larger of its FLOPs and its bytes."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_limits", Path(__file__).parents[1] / "benchmarks" / "bench_limits.py")
    limits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(limits)
    config = SimpleNamespace(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152,
                             num_attention_heads=9, num_key_value_heads=3)  # SmolLM2-135M's  # fmt: skip
    shape = limits.Shape(config)
    assert shape.weights + 30 * 2 * 576 + 576 == P  # + two RMSNorms a layer and the final one
    assert shape.flops(0) == 2 * shape.weights and shape.kv_bytes(10, 2) == 2 * 30 * 10 * 192 * 2
    # One prompt of 4 tokens, one response of 2: prefill compute-bound, each step the larger of its two floors.
    flops, bandwidth, rows = 1e12, 1e9, 64
    floor, tokens = limits.sampling_floor(shape, [4], [[2]], rows, flops, bandwidth, 2)
    steps = [max(shape.flops(4 + t) / flops, (shape.weights * 2 / rows + shape.kv_bytes(4 + t, 2)) / bandwidth)
             for t in range(2)]  # fmt: skip
    assert tokens == 2 and floor == pytest.approx(shape.flops(4) * 4 / flops + sum(steps))
    assert steps[0] == (shape.weights * 2 / rows + shape.kv_bytes(4, 2)) / bandwidth  # memory-bound at this rate


def _bench_rm_gpu(monkeypatch):
    """benchmarks/bench_rm_gpu.py as a module (it imports _common from its own folder)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    path = Path(__file__).parents[1] / "benchmarks" / "bench_rm_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_rm_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rm_gpu_benchmark_shapes_are_the_hub_models(monkeypatch):
    """The configs written in the script build the published parameter counts (Qwen2.5-0.5B: 494,032,768; Llama
    3.2 1B: 1,235,814,400; tied embeddings counted once), plus the one-output head: no hub needed to time them."""
    import torch

    bench = _bench_rm_gpu(monkeypatch)
    for size, published, hidden in (("qwen2.5-0.5b", 494_032_768, 896), ("llama3.2-1b", 1_235_814_400, 2048)):
        model = bench.build(size, torch.device("meta"), seed=0)  # shapes only, no memory
        assert sum(p.numel() for p in model.parameters()) == published + hidden


def test_rm_gpu_benchmark_smoke_on_the_cpu_and_skips_without_cuda(monkeypatch, capsys):
    """Two timed rm-train steps of the tiny size on the CPU, gradient checkpointing on: a JSON record with rates
    and finite losses; `--device cuda` where torch sees no GPU prints 'skipped' and exits 0."""
    import json
    import math

    import torch

    bench = _bench_rm_gpu(monkeypatch)
    assert bench.main(["--device", "cpu", "--size", "tiny", "--batch-size", "2", "--max-length", "24", "--warmup",
                       "1", "--steps", "2", "--gradient-checkpointing"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["device"] == "cpu" and record["gradient_checkpointing"] and record["mixed_precision"] == "bf16"
    assert len(record["step_s"]) == 2 and record["steps_per_s"] > 0
    assert record["pairs_per_s"] == pytest.approx(2 * record["steps_per_s"], rel=1e-3)
    assert record["tokens_per_s"] == pytest.approx(2 * 24 * record["pairs_per_s"], rel=1e-3)
    assert all(math.isfinite(x) for x in record["loss"]) and "oom" not in record
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA device")
