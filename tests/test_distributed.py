"""Data-parallel training gives the single-process result: 2 CPU processes (gloo, launched by torch's own launcher,
as `accelerate launch` does on GPUs) each holding half of a global batch end with the parameters that 1 process
gets on the whole batch, for one PPO update (2 epochs x 2 minibatches x 2 micro-batches, reward whitening, batch
score normalisation, ragged shards) and for a reward model's training step. ~1 minute: each launch imports torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import toy_comparisons
from wprlhf.data import write_comparisons

pytestmark = pytest.mark.learning  # every test here takes optimizer steps

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(processes: int, *args) -> None:
    if processes == 1:
        command = [sys.executable, str(WORKER), *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", str(WORKER), *map(str, args)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_params(one: dict, two: dict, start: dict | None = None, atol: float = 1e-5) -> None:
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < atol, f"largest parameter difference {worst:.2e}"
    if start is not None:  # the update did something, so "equal" is not "both unchanged"
        moved = max(float((one[k] - start[k]).abs().max()) for k in one)
        assert moved > 100 * atol, f"parameters moved only {moved:.2e}"


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo"])
def test_update_on_two_processes_equals_one(tmp_path, method):
    run_worker(1, method, tmp_path / "one.pt")
    run_worker(2, method, tmp_path / "two.pt")
    one = torch.load(tmp_path / "one.pt.rank0")
    two = [torch.load(tmp_path / f"two.pt.rank{r}") for r in (0, 1)]

    from wprlhf.models import load_policy, make_value_model

    policy, _ = load_policy("tiny", seed=0)
    start = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    if method == "ppo":
        start.update({f"value.{k}": v for k, v in make_value_model(policy, seed=1).state_dict().items()})
    assert_same_params(one["params"], two[0]["params"], start)
    assert_same_params(two[0]["params"], two[1]["params"], atol=1e-7)  # DDP keeps the replicas identical
    # Logged statistics are those of the global batch on both processes.
    keys = ["score_mean", "kl", "policy_loss", "approxkl", "clipfrac", "entropy", "grad_norm"]
    keys += ["value_loss", "value_grad_norm"] if method == "ppo" else ["kl_term"] if method == "grpo" else ["rlhf_reward_mean"]
    for key in keys:
        assert two[0]["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6), key
        assert two[1]["stats"][key] == pytest.approx(two[0]["stats"][key], rel=1e-6, abs=1e-8), key


def test_reward_model_step_on_two_processes_equals_one(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_comparisons(data, toy_comparisons(10))
    run_worker(1, "rm", data, tmp_path / "one")
    run_worker(2, "rm", data, tmp_path / "two")
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    from wprlhf.models import load_reward_backbone

    start = load_reward_backbone("tiny", num_labels=1, seed=0)[0].state_dict()
    # 1e-4, not PPO's 1e-5: the first AdamW step divides each gradient by its own magnitude, so near-zero gradients
    # carry the processes' different summation order into the weights (2.5e-5 under ATEN_CPU_CAPABILITY=default,
    # 6e-6 under AVX-512); the weights moved by 0.1, a thousand times more.
    assert_same_params(one, two, {k: start[k] for k in one}, atol=1e-4)
    metrics = [(tmp_path / name / "metrics.csv").read_text().splitlines() for name in ("one", "two")]
    assert len(metrics[1]) == len(metrics[0]) == 2  # header + the one step, logged once
    assert json.loads((tmp_path / "two" / "eval-heldout.json").read_text())["n"] >= 1


def test_dpo_on_two_processes_equals_one(tmp_path):
    """Two DPO steps of 4 pairs (2 micro-batches each): each process takes every other pair of a step."""
    data = tmp_path / "pairs.jsonl"
    write_comparisons(data, toy_comparisons(8))
    run_worker(1, "dpo", data, tmp_path / "one")
    run_worker(2, "dpo", data, tmp_path / "two")
    from safetensors.torch import load_file

    from wprlhf.models import load_policy

    one, two = (load_file(tmp_path / name / "policy" / "model.safetensors") for name in ("one", "two"))
    start = load_policy("tiny", seed=0)[0].state_dict()
    assert_same_params(one, two, {k: start[k] for k in one}, atol=1e-4)  # 1e-4: see the reward model's test
    metrics = [(tmp_path / name / "metrics.csv").read_text().splitlines() for name in ("one", "two")]
    assert len(metrics[1]) == len(metrics[0]) == 3  # header + 2 steps, logged once
    from wprlhf.metrics import read_metrics

    for a, b in zip(*(read_metrics(tmp_path / name / "metrics.csv") for name in ("one", "two"))):
        for key in ("loss", "accuracy", "margin", "chosen_reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_ppo_cli_on_two_processes_logs_once_and_resumes(tmp_path):
    """`wprlhf ppo` under the launcher: one metrics row per step (not per process), a checkpoint, --resume."""
    out = tmp_path / "run"
    common = ["--policy", "tiny", "--batch-size", 4, "--num-minibatches", 2, "--response-length", 4,
              "--checkpoint-every", 1, "--device", "cpu", "--log-samples", 1, "--out", out]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "wprlhf.cli", "ppo"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for steps, extra in ((2, []), (3, ["--resume"])):
        command = [*launch[:3], f"--master_port={_free_port()}", *launch[3:], "--steps", steps, *common, *extra]
        result = subprocess.run(list(map(str, command)), check=False, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3, rows  # header + steps 1..3, each written once
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert (out / "policy" / "model.safetensors").exists() and (out / "value" / "model.safetensors").exists()
    from wprlhf.metrics import read_metrics

    assert [r["episodes"] for r in read_metrics(out / "metrics.csv")] == [4, 8, 12]  # global episodes, not per process
