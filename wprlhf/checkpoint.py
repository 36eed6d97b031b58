"""Atomic save/load of model weights, optimizer, RNG and step, so a killed run resumes where it stopped.

A checkpoint is a folder written under a temporary name and renamed into place; `checkpoints/latest` names
the newest complete one and is itself replaced atomically. Models inside are in Hugging Face format.

    out/checkpoints/step-000010/policy/       save_pretrained + tokenizer (+ value_head.safetensors if shared)
    out/checkpoints/step-000010/value/        save_pretrained (separate value model)
    out/checkpoints/step-000010/trainer_state.pt
    out/checkpoints/latest                    "step-000010"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

STATE_FILE = "trainer_state.pt"
VALUE_HEAD_FILE = "value_head.safetensors"


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping of config keys, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(cls, path: str | Path | None, overrides: dict, base: dict | None = None):
    """A config dataclass from `base` (e.g. a preset), then a YAML/JSON file, then explicit overrides (None = not
    given). Unknown keys are errors that list the known ones."""
    import dataclasses

    values = dict(base or {})
    if path:
        values.update(read_config_file(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - known):
        raise UserError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none."""
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise UserError(f"{pointer} points at {path.name}, which is missing; delete {pointer} to start over")
    return path


def _save_models(directory: Path, models: dict[str, nn.Module], tokenizer, value_head: nn.Module | None) -> None:
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard would interleave with the training bar at every checkpoint
    try:
        for name, model in models.items():
            model.save_pretrained(directory / name)  # a LoRA (peft) model writes its adapters only
            tokenizer.save_pretrained(directory / name)
    finally:
        hf_logging.enable_progress_bar()
    if value_head is not None:
        # Shared-backbone variant: the head sits beside the policy it reads from.
        save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, directory / "policy" / VALUE_HEAD_FILE)


def save_checkpoint(directory: Path, models: dict[str, nn.Module], tokenizer, state: dict,
                    value_head: nn.Module | None = None, keep_last: int = 1) -> None:  # fmt: skip
    """Write models + trainer state to `directory` atomically and point `latest` at it; keep the newest keep_last."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp-"))
    try:
        _save_models(tmp, models, tokenizer, value_head)
        torch.save(state, tmp / STATE_FILE)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(directory.parent / "latest", directory.name)
    older = sorted(p for p in directory.parent.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for path in older[:-keep_last] if keep_last else []:
        if path != directory:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(directory: Path, models: dict[str, nn.Module], value_head: nn.Module | None,
                    device: torch.device) -> dict:  # fmt: skip
    """Load weights into `models` (and value_head) in place and return the trainer state dict.

    Raises UserError naming the file when the checkpoint is incomplete, corrupt, or from other models.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        state = torch.load(directory / STATE_FILE, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete; delete it and resume again")
    except Exception as err:
        raise UserError(f"checkpoint {directory / STATE_FILE} is corrupt ({err.__class__.__name__}); delete the folder")
    for name, model in models.items():
        lora = hasattr(model, "peft_config")
        weights = directory / name / ("adapter_model.safetensors" if lora else "model.safetensors")
        try:
            loaded = load_file(weights, device=str(device))
        except FileNotFoundError:
            raise UserError(f"checkpoint {directory} has no {name}/{weights.name}; it is incomplete or not a wprlhf run")
        except (SafetensorError, OSError) as err:
            raise UserError(f"checkpoint weights {weights} are corrupt ({err}); delete the checkpoint and resume again")
        try:
            if lora:
                from peft import set_peft_model_state_dict

                result = set_peft_model_state_dict(model, loaded)
            else:
                # strict=False: tied weights (lm_head = embeddings) are saved once, so their second name is absent.
                result = model.load_state_dict(loaded, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"unexpected tensors {result.unexpected_keys[:3]}")
        except RuntimeError as err:
            raise UserError(f"checkpoint {weights} does not match the {name} model of this run ({err}); "
                            "resume with the same --policy")  # fmt: skip
    if value_head is not None:
        value_head.load_state_dict(load_file(directory / "policy" / VALUE_HEAD_FILE, device=str(device)))
    return state


def export_models(out_dir: Path, models: dict[str, nn.Module], tokenizer, value_head: nn.Module | None = None) -> None:
    """Final models at out_dir/policy (and out_dir/value), each loadable with from_pretrained, written atomically."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix="export.tmp-"))
    try:
        _save_models(tmp, models, tokenizer, value_head)
        for name in os.listdir(tmp):
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
