"""Where this process runs: its device, whether it is the main process, and what data-parallel training needs.

`resolve_device` is the one place a `--device` name becomes a device, and `is_main_process` the one test for the
process that writes files and prints. Every trainer makes one `Accelerator`; launched plainly it is one process
and every helper below returns its input. Under `accelerate launch` (DDP, or DeepSpeed through a config file)
each process holds a contiguous shard of the global batch (`shard`), and whatever must be computed over the
global batch (whitening, advantages, loss normalisers, logged means) is computed from `gather_padded` tensors or
`reduce_sum`-med statistics, so the result is the one a single process would get on the whole batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from accelerate import Accelerator

from .errors import NonFiniteError, UserError


def resolve_device(name: str | torch.device) -> torch.device:
    """A `--device` setting as a device: 'auto' is the GPU where torch sees one, else the CPU; 'cpu', 'cuda',
    'cuda:1' as named ('cuda' without a GPU is a UserError); a torch.device is returned as it is.

    Trainers hand the result to `make_accelerator` and then use `device_of(accelerator)`: under a launcher,
    accelerate gives each process its own GPU. Everything else (sampling, scoring, loading) moves models to it.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but torch sees no GPU; install a CUDA build of torch or use --device cpu")
    return torch.device(name)


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def check_mixed_precision(value: str) -> None:
    """UserError unless value is one of MIXED_PRECISION (every trainer's config checks it up front)."""
    if value not in MIXED_PRECISION:
        raise UserError(f"mixed_precision must be one of {MIXED_PRECISION}, got {value!r}; set --mixed-precision")


def cpu_runs_bf16_fast() -> bool:
    """True where torch's CPU kernels are AVX-512 ones and the CPU has AVX-512 BF16 or AMX: a bf16 matmul then runs
    about twice as fast as fp32. On AVX2 (or with ATEN_CPU_CAPABILITY forcing AVX2 kernels) bf16 takes a slow path,
    several times slower than fp32."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:  # not Linux: no way to tell, and fp32 is never the slow choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(value: str, device: torch.device) -> str:
    """A --mixed-precision setting as the precision a run uses: 'auto' is 'bf16' where `device` runs it faster than
    fp32 (a GPU with bf16, `cpu_runs_bf16_fast`), else 'no'; the environment variable WPRLHF_MIXED_PRECISION, when
    set, replaces 'auto' (the test suite pins 'no' with it). Any other value is returned as it is."""
    check_mixed_precision(value)
    if value != "auto":
        return value
    if forced := os.environ.get("WPRLHF_MIXED_PRECISION"):
        if forced not in MIXED_PRECISION[1:]:
            raise UserError(f"WPRLHF_MIXED_PRECISION must be one of {MIXED_PRECISION[1:]}, got {forced!r}")
        return forced
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if device.type == "cpu" and cpu_runs_bf16_fast() else "no"


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype a resolved mixed_precision ('no'|'bf16'|'fp16') runs matmuls in under autocast; None for 'no'."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def make_accelerator(device: torch.device, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator on `device` ('cpu' forces the CPU even where a GPU exists); mixed_precision 'no'|'bf16'|'fp16'."""
    check_mixed_precision(mixed_precision)
    check_launch_environment()
    # Gradient accumulation stays ours (micro-batches share one loss normaliser), so accelerate's is left at 1.
    try:
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    except ValueError:
        # accelerate keeps one process-wide state; a second trainer in the same process (the loop, tests) may want
        # another precision or device. Safe to start over on one process; under a launcher it is a real conflict.
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def check_launch_environment(environ=os.environ) -> int:
    """The process count the environment gives (WORLD_SIZE; 1 when unset), or a UserError when it is not a count
    >= 1, or says several processes while no launcher set up their rendezvous (MASTER_ADDR, MASTER_PORT, RANK): a
    WORLD_SIZE left over in a shell would otherwise fail deep inside torch.distributed."""
    if "WORLD_SIZE" not in environ:
        return 1
    world = environ["WORLD_SIZE"].strip()
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} is set in the environment but is not a process count "
                        ">= 1; unset it (`unset WORLD_SIZE`) for a one-process run")  # fmt: skip
    if int(world) == 1:
        return 1
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not environ.get(name)]
    if missing:
        names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise UserError(f"WORLD_SIZE={world} is set in the environment, but {names} {'is' if len(missing) == 1 else 'are'}"
                        " not: no launcher started this process. For one process, unset WORLD_SIZE (`unset "
                        "WORLD_SIZE`); for several, start the command with `accelerate launch` or `torchrun`, which "
                        "set them all")  # fmt: skip
    return int(world)


def device_of(accelerator: Accelerator) -> torch.device:
    """The accelerator's device, with 'cpu:0' (what a multi-process CPU run reports) spelled 'cpu', the name
    torch.load and safetensors accept."""
    device = accelerator.device
    return torch.device("cpu") if device.type == "cpu" else device


def is_main_process() -> bool:
    """True on the process that writes files and prints: the only one, or rank 0 under a launcher.

    Read from the launcher's RANK variable (torchrun and `accelerate launch` set it; it equals the accelerator's
    process_index) rather than from accelerate's state, which must not be created before the trainer creates it
    with the right device, so the CLI can ask before any trainer starts and the trainers ask the same way.
    """
    return os.environ.get("RANK", "0") == "0"


def check_divisible(n: int, what: str, accelerator: Accelerator) -> int:
    """n / num_processes, or a UserError: shards must be equal for the processes to step together."""
    world = accelerator.num_processes
    if n % world:
        raise UserError(f"{what} {n} is not divisible by the {world} processes; pick a multiple of {world}")
    return n // world


def shard(items: Sequence, accelerator: Accelerator) -> list:
    """This process's contiguous slice of a global batch (all of it on one process)."""
    n = check_divisible(len(items), "batch size", accelerator)
    start = accelerator.process_index * n
    return list(items[start : start + n])


def gather_padded(accelerator: Accelerator, tensor: torch.Tensor, pad_value, side: str = "right") -> torch.Tensor:
    """Concatenate every process's (b, T_p, ...) tensor along dim 0, padding dim 1 to the longest T_p first.

    side 'left' for left-padded queries. One process: the tensor itself.
    """
    if accelerator.num_processes == 1:
        return tensor
    # accelerate pads a bool tensor into an int64 one; a process that needs no padding would then send bools
    # to the others' int64s. Masks travel as int64 on every process and come back as bools.
    is_mask = tensor.dtype == torch.bool
    tensor = tensor.long() if is_mask else tensor
    tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value, pad_first=side == "left")
    tensor = accelerator.gather(tensor.contiguous())
    return tensor.bool() if is_mask else tensor


def reduce_sum(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Sum each statistic over processes, in one all-reduce. One process: the dict itself."""
    if accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum")
    return dict(zip(keys, values.tolist()))


def check_finite(accelerator: Accelerator | None, step: int, where: str, fix: str, **quantities) -> None:
    """Stop a run before its optimizer step when a loss or gradient norm is NaN or inf, on every process at once.

    quantities: name -> float (or 0-d tensor), this process's values. They are summed over processes in one
    all-reduce, so a NaN anywhere is a NaN everywhere and every process raises together (no process is left
    waiting in the next collective); accelerator None = one process. Raises NonFiniteError naming the step, the quantities and `fix`.
    """
    names = sorted(quantities)
    values = torch.tensor([float(torch.as_tensor(quantities[k]).detach()) for k in names], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()
    bad = [f"{k} = {v}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{where}, step {step}: {', '.join(bad)}; stopped before the optimizer step, so no NaN or "
                             f"inf reached the weights and the last checkpoint is as it was. {fix}")  # fmt: skip
