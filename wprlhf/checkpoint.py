"""Atomic save/load of model weights, optimizer, RNG and step, so a killed run resumes where it stopped.

A checkpoint is a folder written under a temporary name, flushed to disk and renamed into place;
`checkpoints/latest` names the newest one and is itself replaced atomically. The two newest are kept, so one
damaged after the fact (a full disk, a cut copy) leaves the one before it to resume from. Models inside are in
Hugging Face format.

    out/checkpoints/step-000008/              the one before the newest, laid out the same way
    out/checkpoints/step-000010/policy/       save_pretrained + tokenizer (+ value_head.safetensors if shared)
    out/checkpoints/step-000010/value/        save_pretrained (separate value model)
    out/checkpoints/step-000010/trainer_state.pt
    out/checkpoints/latest                    "step-000010"
    out/checkpoints/step-000012.broken/       a folder a resume skipped as unreadable, moved aside (not deleted)
                                              when the run saved step 12 again; safe to delete once inspected

Resuming reads and checks every file of a checkpoint before it changes anything in the live models, tries the
folder `latest` names first and then the other step-N folders, newest first, and says what was wrong with each
one it skipped. It never deletes, moves or writes a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .files import write_text_atomic

STATE_FILE = "trainer_state.pt"
VALUE_HEAD_FILE = "value_head.safetensors"
STEP_FOLDER = re.compile(r"step-(\d+)")  # a complete checkpoint's name; NAME.tmp-* and NAME.broken are not


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping of config keys, with a clear error for a missing or malformed file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist or is not a file; give the path of a YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason}); is it the right file?") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}; "
                        "fix the place the error names")  # fmt: skip
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}; "
                        "write one `key: value` per line")  # fmt: skip
    _check_keys(data, path)
    return data


def _check_keys(data: dict, path: Path, where: str = "") -> None:
    """UserError for a key that is not a name (`1: 2`, `null:`), at any depth of sections."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"config file {path}: key {where}{key!r} is not a setting's name; keys are names such as "
                            "`steps` (see the command's -h)")  # fmt: skip
        if isinstance(value, dict):
            _check_keys(value, path, f"{where}{key}.")


def load_config(cls, path: str | Path | None, overrides: dict, base: dict | None = None, upgrade=None):
    """A config dataclass from `base` (e.g. a preset), then a YAML/JSON file, then explicit overrides (None = not
    given), each a mapping of its fields in which a section (a field that is itself a config dataclass, e.g.
    StoriesConfig.ppo) is a mapping of its own. `upgrade(dict) -> dict` translates a file's keys of earlier versions,
    as does the class's RENAMED table (old flat key -> 'section.field'). Unknown keys are errors that list the known
    ones."""
    values = upgrade_keys(cls, dict(base or {}))
    if path:
        values = merge_settings(values, upgrade_keys(cls, upgrade(read_config_file(path)) if upgrade
                                                     else read_config_file(path)))  # fmt: skip
    return build_config(cls, merge_settings(values, upgrade_keys(cls, _given(overrides))))


def _given(overrides: dict) -> dict:
    """The overrides actually given: None means a flag not typed, at any depth."""
    return {k: _given(v) if isinstance(v, dict) else v for k, v in overrides.items() if v is not None}


def upgrade_keys(cls, values: dict) -> dict:
    """`values` with the keys of cls.RENAMED (flat keys of earlier versions, e.g. 'sft_lr') moved to where they
    live now ('sft.lr'). UserError for a setting given both ways with two values (which one was meant?)."""
    renamed = getattr(cls, "RENAMED", {})
    out: dict = {}
    for key, value in values.items():
        if key not in renamed or isinstance(value, dict):  # 'sft: {lr: ...}' is the section, 'sft: false' the old flag
            out = merge_settings(out, {key: value})
            continue
        *sections, name = renamed[key].split(".")
        given = values
        for section in sections:
            given = given.get(section) if isinstance(given, dict) else None
        if isinstance(given, dict) and name in given and given[name] != value:
            raise UserError(f"{key}: {value!r} and {renamed[key]}: {given[name]!r} name one setting twice ({key} is "
                            f"its name of earlier versions); keep {renamed[key]} only")  # fmt: skip
        moved: dict = {name: value}
        for section in reversed(sections):
            moved = {section: moved}
        out = merge_settings(moved, out)
    return out


def merge_settings(base: dict, more: dict) -> dict:
    """`base` updated by `more`, sections (nested mappings) merged key by key rather than replaced."""
    out = dict(base)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def build_config(cls, values: dict, where: str = ""):
    """A config dataclass from a mapping of its fields; a section field takes a mapping of its own fields (a YAML
    block such as `ppo: {steps: 40}`). UserError naming unknown keys, with the known ones."""
    import typing

    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(values) - set(known)):
        raise UserError(f"unknown {cls.__name__} keys {[where + k for k in unknown]}; rename or remove them (known "
                        f"keys: {[where + k for k in known]})")  # fmt: skip
    kwargs = {}
    for name, value in values.items():
        section = hints[name]
        if dataclasses.is_dataclass(section) and not isinstance(value, section):
            if not isinstance(value, dict):
                raise UserError(f"{where}{name} is a section of settings, not a value; write it as a mapping, e.g. "
                                f"`{name}: {{{dataclasses.fields(section)[0].name}: ...}}`, or give --{name}-... flags")  # fmt: skip
            value = build_config(section, value, f"{where}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def flat_settings(values: dict, prefix: str = "") -> dict:
    """A config's asdict with its sections flattened: {'ppo': {'lr': 1e-5}} -> {'ppo.lr': 1e-5}."""
    out: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------- finding


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def _step_folders(root: Path) -> list[Path]:
    """The step-N folders under checkpoints/, newest first (temporary and .broken folders left out)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def find_checkpoints(out_dir: Path) -> tuple[list[Path], str | None]:
    """The checkpoint folders of a run in the order a resume tries them, and what is wrong with `latest` (or None).

    The folder `latest` names comes first, then every other step-N folder, newest first. A step-N folder got its
    name only once it was complete, so a missing or garbled pointer loses nothing. Reads no checkpoint file.
    """
    root = Path(out_dir) / "checkpoints"
    folders = _step_folders(root)
    pointer = root / "latest"
    if not pointer.exists():
        return folders, (f"{pointer} is missing" if folders else None)
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return folders, f"{pointer} is unreadable ({err.__class__.__name__})"
    if not STEP_FOLDER.fullmatch(name):
        return folders, f"{pointer} holds {name[:40]!r}, not the name of a step-N folder"
    if root / name not in folders:
        return folders, f"{pointer} names {name}, which is missing"
    folders.remove(root / name)
    return [root / name, *folders], None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint folder a resume tries first, or None if the run has none. Reads no checkpoint file."""
    folders, _ = find_checkpoints(out_dir)
    return folders[0] if folders else None


# ---------------------------------------------------------------------------------------------- saving


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


def _fsync_files(directory: Path) -> None:
    """Flush every file under `directory` to disk, so the rename that publishes it never outruns its contents."""
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _move_aside(path: Path, target: Path) -> None:
    """Rename `path` to `target`, replacing whatever was at `target`."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.replace(path, target)


def save_checkpoint(directory: Path, models: dict[str, nn.Module], tokenizer, state: dict,
                    value_head: nn.Module | None = None, keep_last: int = 2) -> None:  # fmt: skip
    """Write models + trainer state to `directory` atomically, point `latest` at it, and delete step-N folders older
    than the keep_last newest up to it (0 keeps all). Whatever already sits at `directory` (a checkpoint a resume
    skipped as unreadable) is moved to NAME.broken, not deleted; temporary folders of killed saves are deleted."""
    directory = Path(directory)
    root = directory.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):  # a save killed half-way; never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=directory.name + ".tmp-"))
    try:
        _save_models(tmp, models, tokenizer, value_head)
        torch.save(state, tmp / STATE_FILE)
        _fsync_files(tmp)
        if directory.exists() or directory.is_symlink():
            _move_aside(directory, root / (directory.name + ".broken"))
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / "latest"
    if pointer.is_dir() and not pointer.is_symlink():  # garbage where the pointer goes must not stop the save
        _move_aside(pointer, root / "latest.broken")
    write_text_atomic(pointer, directory.name)
    if keep_last and (match := STEP_FOLDER.fullmatch(directory.name)):
        # Only older ones: a newer folder is one a resume skipped, and this run saves over (moves aside) it later.
        older = [p for p in _step_folders(root) if int(p.name[5:]) < int(match.group(1))]
        for path in older[keep_last - 1 :]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- loading


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded: a file missing, corrupt, truncated or not from this run's models."""

    def __init__(self, reason: str, directory: Path | None = None):
        self.reason, self.directory = reason, directory
        where = f"checkpoint {directory}: " if directory is not None else ""
        super().__init__(f"{where}{reason}; load an older checkpoint folder of the run")


class NoUsableCheckpoint(UserError):
    """A resume found no checkpoint it could read. `problems` says what was wrong with each folder (and `latest`);
    `restart` is the one thing to do instead, so a caller that knows its own command can say it differently."""

    def __init__(self, root: Path, problems: list[str], restart: str):
        self.root, self.problems, self.restart = Path(root), problems, restart
        found = f"has no usable checkpoint ({'; '.join(problems)})" if problems else "holds no checkpoint"
        super().__init__(f"cannot resume: {self.root} {found}. Nothing was deleted. To go on, {restart}")


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory and checked against the run's models, not yet applied to them."""

    path: Path
    state: dict
    weights: dict[str, dict[str, torch.Tensor]]  # model name -> tensors as saved
    value_head: dict[str, torch.Tensor] | None


def _read_safetensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")  # on the CPU: load_state_dict copies onto the models' devices
    except FileNotFoundError:
        raise CheckpointError(f"{label} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{label} is corrupt or truncated ({str(err)[:120]})") from None


def _mismatch(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], tied_ok: bool) -> str | None:
    """What keeps `loaded` from loading into a module whose state_dict is `expected`, or None if it fits.

    tied_ok: a missing tensor is fine when it shares storage with one that is there (save_pretrained writes tied
    weights, e.g. lm_head = embeddings, once)."""
    if unexpected := sorted(loaded.keys() - expected.keys()):
        return f"unexpected tensors {unexpected[:3]}"
    present = {expected[k].data_ptr() for k in loaded} if tied_ok else set()
    if missing := sorted(k for k in expected.keys() - loaded.keys() if expected[k].data_ptr() not in present):
        return f"missing tensors {missing[:3]}"
    if shapes := [k for k in loaded if loaded[k].shape != expected[k].shape]:
        k = shapes[0]
        return f"{k} has shape {tuple(loaded[k].shape)}, the model {tuple(expected[k].shape)}"
    return None


def read_checkpoint(directory: Path, models: dict[str, nn.Module], value_head: nn.Module | None = None,
                    check_state: Callable[[dict], None] | None = None) -> Checkpoint:  # fmt: skip
    """Read every file of a checkpoint into memory and check it fits `models`; changes nothing.

    check_state(state) runs on the trainer state before the weights are read: it raises CheckpointError for a
    state that is unusable, or a plain UserError to stop (e.g. the run's settings differ).
    Raises CheckpointError naming the file that is missing, corrupt, truncated or not from these models.
    """
    directory = Path(directory)
    try:
        try:
            state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise CheckpointError(f"{STATE_FILE} is missing: the checkpoint is incomplete") from None
        except Exception as err:  # a cut zip, a bad pickle: whatever torch.load chokes on
            raise CheckpointError(f"{STATE_FILE} is corrupt ({err.__class__.__name__})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{STATE_FILE} is corrupt (holds a {type(state).__name__}, not a trainer state)")
        if check_state is not None:
            check_state(state)
        weights = {}
        for name, model in models.items():
            lora = hasattr(model, "peft_config")
            label = f"{name}/{'adapter_model' if lora else 'model'}.safetensors"
            weights[name] = _read_safetensors(directory / label, label)
            if lora:
                from peft import get_peft_model_state_dict

                expected = get_peft_model_state_dict(model)  # the names and shapes save_pretrained wrote
            else:
                expected = model.state_dict()
            if problem := _mismatch(expected, weights[name], tied_ok=not lora):
                raise CheckpointError(f"{label} does not fit the {name} model of this run ({problem})")
        head = None
        if value_head is not None:
            label = f"policy/{VALUE_HEAD_FILE}"
            head = _read_safetensors(directory / label, label)
            if problem := _mismatch(value_head.state_dict(), head, tied_ok=False):
                raise CheckpointError(f"{label} does not fit the value head of this run ({problem})")
    except CheckpointError as err:
        if err.directory is None:
            raise CheckpointError(err.reason, directory) from None
        raise
    return Checkpoint(directory, state, weights, head)


def apply_checkpoint(checkpoint: Checkpoint, models: dict[str, nn.Module], value_head: nn.Module | None = None) -> dict:
    """Copy a checked checkpoint's weights into `models` (and value_head) in place; returns its trainer state."""
    for name, model in models.items():
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, checkpoint.weights[name])
        else:
            model.load_state_dict(checkpoint.weights[name], strict=False)  # strict=False: tied weights are saved once
    if value_head is not None:
        value_head.load_state_dict(checkpoint.value_head)
    return checkpoint.state


def load_checkpoint(directory: Path, models: dict[str, nn.Module], value_head: nn.Module | None = None,
                    check_state: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Load one checkpoint into `models` (and value_head) in place and return the trainer state dict. Everything
    is read and checked first: on a CheckpointError the models are as they were."""
    return apply_checkpoint(read_checkpoint(directory, models, value_head, check_state), models, value_head)


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resume_checkpoint(out_dir: Path, models: dict[str, nn.Module], value_head: nn.Module | None = None,
                      check_state: Callable[[dict], None] | None = None, restart: str = "start a new run",
                      warn: Callable[[str], None] | None = print_warning) -> Checkpoint:  # fmt: skip
    """The newest checkpoint of a run that reads back whole and fits `models`, read but not applied.

    Tries the folders of find_checkpoints in turn; when it skips any (or `latest` is broken), `warn` (None: quiet)
    says what was wrong with each and which folder it resumes from. Raises NoUsableCheckpoint, whose message ends
    with `restart`, when none is usable, and passes on the UserError of check_state at once. Deletes nothing.
    """
    folders, pointer_problem = find_checkpoints(out_dir)
    problems = [pointer_problem] if pointer_problem else []
    for folder in folders:
        try:
            found = read_checkpoint(folder, models, value_head, check_state)
        except CheckpointError as err:
            problems.append(f"{folder.name}: {err.reason}")
            continue
        if problems and warn is not None:
            kept = (" Nothing was deleted: a skipped folder stays as it is, and moves to NAME.broken when the run "
                    "saves that step again.") if folder != folders[0] else ""  # fmt: skip
            warn(f"{'; '.join(problems)}. Resuming from {folder}.{kept}")
        return found
    raise NoUsableCheckpoint(Path(out_dir) / "checkpoints", problems, restart)


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


def keep_saved_precision(config, out_dir: str | Path):
    """`config` (a dataclass with `mixed_precision`) as a resumed run should use it. A resumed run keeps the precision it started with (its config.json), whatever 'auto' would pick on the
    machine it resumes on; an explicit --mixed-precision is left for check_resumable to compare."""
    saved = Path(out_dir) / "config.json"
    if config.mixed_precision != "auto" or not saved.exists():
        return config
    try:
        precision = json.loads(saved.read_text(encoding="utf-8")).get("mixed_precision", "no")
    except (ValueError, AttributeError):
        return config  # an unreadable config.json: the checkpoint's own copy of the config decides
    return dataclasses.replace(config, mixed_precision=precision)
