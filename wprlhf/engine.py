"""The one training engine under every optimiser loop: accelerate and precision, AdamW and its schedule,
micro-batches, the backward's scale, per-network clipping, the non-finite guard and the optimizer step.

A method keeps its maths and its loop, and hands the engine its loss at one level (SFT, DPO, PPO, RLOO, GRPO, the
reward model and the classifier all do):

    config, accelerator = engine.prepare_precision(config)
    engine = Engine(accelerator, model, {"grad_norm": (params, lr)}, weight_decay=..., schedule=..., ...)
    for rows in engine.micro_batches(local_rows, micro_batch_size):
        engine.backward(loss_of(rows))          # a share of the step's loss
    stats = engine.step(step, loss=loss_sum)    # clip, stop on NaN/inf, step, free the gradients

So a fix to the guard or to DeepSpeed's gradient norm is made here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .distributed import (check_finite, check_mixed_precision, device_of, is_main_process, make_accelerator,
                          resolve_device, resolve_mixed_precision)
from .errors import UserError
from .files import write_json_atomic
from .metrics import MetricsLogger
from .models import make_optimizer


@dataclass
class Hardware:
    """Where a run trains and in what precision: the settings every training config extends (SFT, the reward
    model, the classifier)."""

    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    mixed_precision: str = "auto"
    """'auto' (bf16 where the device runs it faster than fp32: a GPU with bf16, a CPU with AVX-512 BF16 or AMX;
    else fp32; the choice is printed and saved), 'no' (fp32), 'bf16' or 'fp16': autocast (accelerate's) for the
    training forwards; weights and AdamW stay fp32. bf16 pays on a GPU and on CPUs with AVX-512 BF16 or AMX; on
    AVX2-only CPUs it is several times slower."""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)


def prepare_precision(config):
    """(config with 'auto' mixed precision resolved to what its device runs fastest, the Accelerator it trains under).

    config: any run config with `device` and `mixed_precision`. The resolved config is what config.json records,
    so a resumed run keeps the precision it started with (`checkpoint.keep_saved_precision`). The one place a run's
    precision is chosen."""
    config = dataclasses.replace(config, mixed_precision=run_precision(config))
    return config, make_accelerator(resolve_device(config.device), config.mixed_precision)


def run_precision(config) -> str:
    """The precision a run with config.device and config.mixed_precision trains in: 'auto' resolved to what that
    device runs fastest ('no', 'bf16'), any other value as it is (`distributed.resolve_mixed_precision`)."""
    return resolve_mixed_precision(config.mixed_precision, resolve_device(config.device))


class Engine:
    """The optimizer over one module (its networks in named groups, each with its own learning rate and gradient
    norm), prepared by accelerate: DDP or DeepSpeed under `accelerate launch`, autocast under mixed precision.

    groups: {norm name: (parameters, learning rate)}, e.g. {"grad_norm": (policy_params, 1e-5),
    "value_grad_norm": (value_params, 1e-5)}; each group's gradient is clipped to max_grad_norm on its own (as
    OpenRLHF's actor and critic: clipped together, a value model's larger gradient would shrink the policy's step),
    and its norm before clipping is reported under its name. A group without parameters is left out.
    clip_together: one norm over every group's parameters, under the first group's name (a value head on the
    policy's own network: its loss reaches the policy's weights, so the two are one network to clip).
    schedule(optimizer_step) -> factor of the learning rate (torch's LambdaLR); stepped by `step(schedule=True)` or
    by the caller (`scheduler.step()`, once per PPO step of several optimizer steps).
    what / fix: the guard's words when a number is not finite ("DPO update", "lower --lr ...").
    optimizer 'adamw' (torch's fused kernel on CPU and CUDA) or 'adamw8bit' (bitsandbytes); eps as AdamW's.
    """

    def __init__(self, accelerator, module: nn.Module, groups: dict[str, tuple[Sequence[nn.Parameter], float]], *,
                 weight_decay: float, schedule: Callable[[int], float], max_grad_norm: float | None, what: str,
                 fix: str, optimizer: str = "adamw", eps: float = 1e-8, clip_together: bool = False):  # fmt: skip
        self.accelerator = accelerator
        self.groups = {name: list(params) for name, (params, _) in groups.items() if len(params)}
        if clip_together:
            self.groups = {next(iter(groups)): [p for params in self.groups.values() for p in params]}
        param_groups = [{"params": list(params), "lr": lr} for params, lr in groups.values() if len(params)]
        built = make_optimizer(optimizer, param_groups, eps, weight_decay, device_of(accelerator))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(built, schedule)
        # The scheduler is not handed to accelerate, which would step it once per process.
        self.model, self.optimizer = accelerator.prepare(module, built)
        self.max_grad_norm = max_grad_norm or math.inf  # inf measures the norm without clipping: the guard needs it
        self.what, self.fix = what, fix

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def micro_batches(self, rows: Sequence, size: int) -> Iterator[Sequence]:
        """rows cut into micro-batches of `size`; the caller's body for each runs inside DDP's no_sync but for the
        last, so gradients are all-reduced once per optimizer step, after its last micro-batch."""
        starts = range(0, len(rows), max(1, size))
        for i, start in enumerate(starts):
            last = i == len(starts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                yield rows[start : start + size]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`, this process's share of the step's loss (the global sum over the step's tokens or
        examples divided by their global count). DDP averages gradients over processes; each process's loss is a
        share of the global one, so it is scaled back by the process count."""
        self.accelerator.backward(loss * self.world)

    def step(self, step: int, groups: Sequence[str] | None = None, schedule: bool = False,
             **losses: float) -> dict[str, float]:  # fmt: skip
        """Clip each group that holds gradients (`groups`: their names, default all), stop before the optimizer step
        when a loss or a gradient norm is NaN or inf (every process at once: `distributed.check_finite`, naming
        `step`, the 1-based step number), step the optimizer (parameters without a gradient stay as they are), free
        the gradients, and step the schedule when asked. Returns {group name: norm before clipping}; no norm under
        DeepSpeed, whose engine clips by its own config and may report none.

        Under fp16 an infinite norm is the loss scaler's business (it skips that step and lowers its scale), so only
        the losses are checked then."""
        acc, names = self.accelerator, list(groups or self.groups)
        norms: dict[str, float] = {}
        if acc.distributed_type == "DEEPSPEED":
            # DeepSpeed's engine clips the joint norm by its own config (gradient_clipping); accelerate reads it back.
            norm = acc.clip_grad_norm_([p for n in names for p in self.groups[n]], self.max_grad_norm)
            if norm is not None:
                norms[names[0]] = float(norm)
        else:
            for i, name in enumerate(names):
                # accelerate unscales fp16 gradients (all the optimizer's) on its first call; the rest are plain.
                clip = acc.clip_grad_norm_ if i == 0 else torch.nn.utils.clip_grad_norm_
                norms[name] = float(clip(self.groups[name], self.max_grad_norm))
        fp16 = getattr(acc, "mixed_precision", "no") == "fp16"
        check_finite(acc, step, self.what, self.fix, **losses, **({} if fp16 else norms))
        self.optimizer.step()
        # A caller's own autocast block around the step would otherwise keep serving bf16 casts of the old weights.
        torch.clear_autocast_cache()
        # Freed, not zeroed: kept gradient buffers raised peak RSS of the smollm2 benchmark by ~650 MiB (they sit
        # beside the next rollout's activations) for no measurable speed-up.
        self.optimizer.zero_grad(set_to_none=True)
        if schedule:
            self.scheduler.step()
        return norms

    @property
    def lr(self) -> float:
        """The first group's learning rate for the next step."""
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        """The optimizer's and the schedule's state, for a checkpoint."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class RunFiles:
    """The files of one training run in out_dir, written the same way by every trainer (PPO, RLOO, GRPO, DPO, SFT,
    the reward model and the classifier): the settings file, inputs.json, metrics.csv + tb/ (`MetricsLogger`, the
    main process only), checkpoints/ with the resume rules, and the progress bar over the steps.

        run = RunFiles(out_dir, resume, resumable=True)      # refuses a run already there, or a resume of nothing
        state = run.restore({"policy": policy}, check_state, restart="...")    # on resume: the newest readable one
        run.open({"config.json": settings, INPUTS_FILE: inputs}, names=..., start=step, announce="...")
        for step in run.steps(start, total, "dpo", progress):
            ...; run.log(step + 1, row)
            if run.checkpoint_due(step + 1, every, total): save(...)
        run.close()

    resumable: the run keeps checkpoints (PPO, RLOO, GRPO, DPO); the others refuse a folder that holds a run, to be
    cleared with --force. held_ok: the folder is the caller's to reuse (a reward model retrained by a pipeline
    phase that a kill interrupted), so one that holds a run is started over. A run that is not resumed starts in
    an empty metrics file.
    """

    def __init__(self, out_dir, resume: bool = False, resumable: bool = True, held_ok: bool = False):
        self.out_dir, self.resume, self.logger = Path(out_dir), resume, None
        if resume and not resumable:
            raise UserError("this training does not resume; rerun it without --resume")
        if resume and not (self.out_dir / "checkpoints").exists():  # before any model is loaded
            raise ckpt.NoUsableCheckpoint(self.out_dir / "checkpoints", [], self.restart)
        if not resume and not held_ok and (self.out_dir / "metrics.csv").exists():
            if resumable and (self.out_dir / "checkpoints").exists():
                again = "use --resume to continue it, --force to start it over,"
            elif resumable:
                again = "it stopped before its first checkpoint, so nothing resumes: pass --force to start it over"
            else:
                again = "pass --force to overwrite it"
            raise UserError(f"{self.out_dir} already holds a run; {again} or choose another --out (from Python: "
                            "another out_dir)")  # fmt: skip

    @property
    def restart(self) -> str:
        """What to do instead of a resume that finds no usable checkpoint."""
        if (self.out_dir / "metrics.csv").exists():
            return ("start a new run: rerun without --resume and with --out set to a new directory (or with --force, "
                    "which deletes this one)")  # fmt: skip
        return "start the run: rerun without --resume"

    def restore(self, models: dict, check_state, value_head=None) -> dict:
        """On resume: the newest checkpoint that reads back whole (past an unreadable one it falls back, saying what
        was wrong), applied to `models` (and value_head); returns its trainer state. {} when not resuming."""
        if not self.resume:
            return {}
        found = ckpt.resume_checkpoint(self.out_dir, models, value_head, check_state, self.restart,
                                       ckpt.print_warning if is_main_process() else None)  # fmt: skip
        return ckpt.apply_checkpoint(found, models, value_head)

    def open(self, files: dict[str, dict], names: Sequence[str] | None = None, start: int = 0,
             announce: str = "") -> None:  # fmt: skip
        """On the main process: create out_dir, write each of `files` ({name: JSON}: the settings, the inputs a
        resume compares) atomically, open the metrics (a resumed run's rows after `start` are dropped: they are
        redone) and print `announce` on a fresh run."""
        from tqdm.auto import tqdm

        if not is_main_process():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, values in files.items():
            write_json_atomic(self.out_dir / name, values)
        kwargs = {"names": tuple(names)} if names is not None else {}
        self.logger = MetricsLogger(self.out_dir, resume_step=start if self.resume else None, **kwargs)
        if announce and not self.resume:
            tqdm.write(announce)

    def steps(self, start: int, total: int, desc: str, progress: bool = True):
        """The steps start..total-1 under a progress bar (the main process's, when progress)."""
        from tqdm.auto import tqdm

        return tqdm(range(start, total), desc=desc, unit="step", disable=not (progress and self.logger is not None),
                    initial=start, total=total)  # fmt: skip

    def log(self, step: int, row: dict) -> None:
        """One metrics row (the main process writes it; the others have no logger)."""
        if self.logger is not None:
            self.logger.log(step, row)

    @staticmethod
    def checkpoint_due(step: int, every: int, total: int) -> bool:
        """Whether a checkpoint is written after `step` (1-based): every `every` steps and at the last."""
        return step % every == 0 or step == total

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
