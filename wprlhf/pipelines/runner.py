"""The one pipeline runner: a run folder whose state file lists the phases finished, what each took and what it
left, so a killed run resumes after its last finished phase; and the cache of trained models runs share.

`stories`, `compare` and `loop` each open their folder with `Runner(...)`, ask `runner.wanted(phase)` before a
phase and call `runner.finish(phase, **facts)` after it. The rules of a resume live here, once: a folder that holds
a run is refused without --resume; a resume whose inputs changed since the run started is refused
(`files.check_inputs`) unless --allow-changed-inputs; a resume whose settings differ where a finished phase
depends on them is refused, naming each setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import UserError
from ..files import building_beside, check_inputs, input_fingerprints, write_json_atomic


class Runner:
    """A run folder and its state file (JSON: done, timings_s, elapsed_s, config, inputs, and each phase's facts).

    what: the run's name in messages ("stories run"); config: the run's config dataclass, stored in the state;
    inputs: its config fields whose content a resume compares (`files.input_fingerprints`).
    depends(phase) -> the config fields a finished phase depends on (None: no field is compared on resume);
    started: phases under way whose settings count as a finished one's (a PPO phase with checkpoints to continue).
    phases / until: the pipeline's phases in order, and the last one to run ('' = all). quiet: no line per phase.
    """

    def __init__(self, out_dir: str | Path, state_file: str, what: str, config, inputs: Sequence[str],
                 resume: bool = False, allow_changed_inputs: bool = False,
                 depends: Callable[[str], Iterable[str]] | None = None, started: Sequence[str] = (),
                 phases: Sequence[str] = (), until: str = "", quiet: bool = False):  # fmt: skip
        self.out_dir, self.path = Path(out_dir), Path(out_dir) / state_file
        if until and until not in phases:
            raise UserError(f"--until {until!r}: choose one of {', '.join(phases)}")
        self.phases, self.until = list(phases), until
        self.state = self._read()
        if self.state["done"] and not resume:
            raise UserError(f"{self.out_dir} holds a {what}; pass --resume to continue it or --force to start over")
        if depends is not None:
            check_settings(config, self.state.get("config"), [*self.state["done"], *started], depends)
        fingerprints = input_fingerprints({name: getattr(config, name) for name in inputs})
        check_inputs(self.state.get("inputs"), fingerprints, allow_changed_inputs, f"the {what} in {self.out_dir}")
        self.state["config"], self.state["inputs"] = dataclasses.asdict(config), fingerprints
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        if self.done and not quiet:  # say what a resumed run skips
            print(f"== resuming {self.out_dir}: phases finished before ({', '.join(self.done)}) are kept; an "
                  "unfinished one starts over", flush=True)  # fmt: skip
        self.clock = time.perf_counter()
        self.origin = self.clock - self.state.get("elapsed_s", 0.0)  # a resumed run's clock goes on from its total

    def _read(self) -> dict:
        if not self.path.exists():
            return {"done": [], "timings_s": {}}
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{self.path} is corrupt ({err}); delete the run directory or restore the file") from err
        if not isinstance(state, dict) or not isinstance(state.get("done"), list):
            raise UserError(f"{self.path} is not a run's state (no 'done' list); delete the run directory or restore "
                            "the file")  # fmt: skip
        state.setdefault("timings_s", {})
        return state

    @property
    def done(self) -> list[str]:
        return self.state["done"]

    def wanted(self, phase: str) -> bool:
        """Whether `phase` is still to run: not finished, and not after --until's phase."""
        if phase in self.done:
            return False
        return not self.until or self.phases.index(phase) <= self.phases.index(self.until)

    def restart_clock(self) -> None:
        """Time the next phase from now: the work since the last phase finished is not its own."""
        self.clock = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds the run has taken so far, over every session that resumed it."""
        return time.perf_counter() - self.origin

    def seconds(self) -> float:
        """Seconds since the last phase finished (or the clock was restarted)."""
        return time.perf_counter() - self.clock

    def save(self) -> None:
        """Write the state file as it is now (atomically)."""
        self.state["elapsed_s"] = self.elapsed()
        write_json_atomic(self.path, self.state)

    def finish(self, phase: str, **facts) -> None:
        """Record `phase` as finished, the seconds since the last phase finished (or the run opened), the run's
        total, and `facts` (what later phases read, e.g. a model's directory); the state file is rewritten
        atomically, so a kill leaves the old state or the new one."""
        seconds = self.seconds()
        self.done.append(phase)
        self.state["timings_s"][phase] = seconds
        self.state.update(facts)
        self.save()
        if not self.quiet:
            print(f"== {phase} done in {seconds / 60:.1f} min", flush=True)
        self.restart_clock()


def check_settings(config, saved: dict | None, phases: Iterable[str], depends: Callable[[str], Iterable[str]]) -> None:
    """UserError naming each setting of `config` that differs from the run's `saved` config where one of `phases`
    depends on it (a section's name, e.g. 'sft', stands for each of its settings). A field added since the run was
    made is missing from `saved`: the run held its default; a flat key of an earlier version is read where it lives
    now (the config class's RENAMED)."""
    from ..checkpoint import flat_settings, upgrade_keys

    if not saved:
        return
    defaults = flat_settings(dataclasses.asdict(type(config)()))
    was = defaults | {k: v for k, v in flat_settings(upgrade_keys(type(config), saved)).items() if k in defaults}
    now = flat_settings(dataclasses.asdict(config))
    wanted = {name for phase in phases for name in depends(phase)}
    changed = sorted(n for n in defaults if was[n] != now[n] and any(n == w or n.startswith(w + ".") for w in wanted))
    if changed:
        then = ", ".join(f"--{n.replace('.', '-').replace('_', '-')} {was[n]!r} (now {now[n]!r})" for n in changed)
        raise UserError(f"this run was made with {then}: its finished phases depend on them. Resume with the run's own "
                        "settings, or start a new --out")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The model cache: a trained model reused by any run whose training text and settings are the same


def cache_root(cache_dir: str) -> Path | None:
    """The folder of cached models: cache_dir, or $WPRLHF_CACHE/stories, or ~/.cache/wprlhf/stories; None for
    'none' (no cache: each run trains its own)."""
    if cache_dir == "none":
        return None
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("WPRLHF_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "wprlhf") / "stories"


def model_key(*parts) -> str:
    """A short hash of what a cached model was trained on: the text it read and every setting."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_cached(root: Path | None, out_dir: Path, phase: str, key: str, marker: str, train) -> Path:
    """Run `train(dir)` into the cache `root` (or into out_dir/phase when root is None) unless a finished copy with
    this key exists; returns the directory, linked as out_dir/phase. Training goes to a temporary folder renamed
    into place when it is done (`marker`, a file the training writes last, is checked), so a killed training or a
    second run of the same key never leaves or deletes a half-written model (`files.building_beside`)."""
    target = (root / f"{phase}-{key}") if root is not None else out_dir / phase
    if (target / marker).exists():
        print(f"{phase}: reusing {target} (cached: the same training text and settings)", flush=True)
        return _link(out_dir / phase, target)
    with building_beside(target) as tmp:  # and a killed run's half-trained folders go
        train(tmp)
        if not (tmp / marker).exists():
            raise UserError(f"{phase}: the training wrote no {marker}; see the messages above")
        if not target.exists():  # else a copy left by an older version, or a run that finished first: keep it
            tmp.rename(target)
    return _link(out_dir / phase, target)


def _link(name: Path, target: Path) -> Path:
    """RUN/sft, RUN/rm, RUN/judge: a link to the cached model, so commands can name it by the run
    (`--judge rm:RUN/judge`); returns target."""
    if name != target:
        if name.is_symlink():
            name.unlink()
        if not name.exists():
            name.symlink_to(target.resolve(), target_is_directory=True)
    return target
