"""Atomic file writes, and the readers of wprlhf's own JSONL and metrics CSV files: each written once, here.

In the lowest group of the ground: imports nothing from wprlhf but `errors`, and no torch, so `report.py` (which
never loads a model) and every other module can use it. `labeling/` keeps its own small reader and writer, as
it imports no wprlhf module.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import UserError


@contextlib.contextmanager
def building_beside(target: str | Path) -> Iterator[Path]:
    """A new empty folder `.NAME.tmp-*` beside `target` to build it in (the block renames it to target when the
    build is whole), removed when the block ends if it is still there. A lock file beside it is held while the
    block runs, so a process that is killed mid-build (SIGKILL, out of memory) leaves a folder whose lock nobody
    holds: the next call removes every such folder of target's. Another process's live build keeps its folder."""
    from filelock import FileLock, Timeout

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for lock_path in target.parent.glob(f"{prefix}*.lock"):
        try:
            with FileLock(lock_path, timeout=0):  # free: its builder is gone
                shutil.rmtree(lock_path.with_suffix(""), ignore_errors=True)
        except Timeout:
            continue  # a live build
        lock_path.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    lock = FileLock(f"{tmp}.lock")
    try:
        with lock:
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        Path(f"{tmp}.lock").unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the `with` block ends without error: it is written beside `path`,
    flushed to disk (fsync) and renamed over it, so a reader sees the old file or the new one, never half of one.
    On any error the temporary file is removed and `path` is left as it was. Creates the parent folder; the file
    is readable by everyone (0644), not private as mkstemp makes it (reports and data files are for sharing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `atomic_writer`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj, allow_nan: bool = False) -> None:
    """`obj` as indented JSON (objects it cannot encode, such as paths, as str), written atomically.

    Strict by default: Python writes NaN and infinities as bare NaN / Infinity, which strict JSON parsers
    (JavaScript's JSON.parse, jq, most languages) reject, so a NaN raises ValueError ("Out of range float values
    ...") before anything is written. allow_nan=True is for files in which NaN is a documented value.
    """
    try:
        text = json.dumps(obj, indent=2, default=str, allow_nan=allow_nan)
    except ValueError as err:
        raise ValueError(f"{path} not written: {err}") from err
    write_text_atomic(path, text + "\n")


@contextlib.contextmanager
def open_text(path: str | Path) -> Iterator[TextIO]:
    """A text file to read, gunzipped when its name ends .gz. A file that turns out not to be UTF-8, or a broken
    gzip file, is a UserError naming it, wherever in the `with` block the bad byte is read.

    utf-8-sig: a file saved by Excel or some Windows editors starts with a byte-order mark, which would otherwise
    stick to the first column name or break the first JSON line. newline="": csv reads quoted line breaks itself.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            yield f
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason}); is it the right file?") from None
    except (gzip.BadGzipFile, EOFError) as err:
        raise UserError(f"{path} is not a complete gzip file ({err}); download or write it again") from None


def _has_lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a string with a lone surrogate (JSON allows the escape; no text can hold it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def iter_jsonl(path: str | Path, on_bad: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, gzipped when its name ends .gz.

    A line that is not a JSON object raises UserError naming the file and the line, or, given on_bad, is left
    out and reported as on_bad(line_number, problem), problem being "is not valid JSON (...); fix ..." or "is a
    JSON list, not an object; ...". A file that is not UTF-8 or a broken gzip file is a UserError either way.
    """
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"is not valid JSON ({err.msg}); fix or remove that line"
            else:
                problem = None if isinstance(row, dict) else (
                    f"is a JSON {type(row).__name__}, not an object; write one {{...}} object per line")
                if problem is None and _has_lone_surrogate(row):
                    problem = ("holds a lone UTF-16 surrogate escape (such as \\ud800), which is no character and "
                               "cannot be encoded; fix the text of that line")  # fmt: skip
            if problem is None:
                yield n, row
            elif on_bad is None:
                raise UserError(f"{path} line {n} {problem}")
            else:
                on_bad(n, problem)


def read_csv_floats(path: str | Path) -> list[dict[str, float]]:
    """A CSV of numbers (metrics.csv, loop_metrics.csv) -> one {name: float} dict a row, empty cells left out.
    Metric files are read through `metrics.read_metrics`, which also translates old metric names.

    A cell that is not a number raises UserError naming the file, the line and the column.
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            numbers = {}
            for name, value in row.items():
                if value in ("", None):
                    continue
                try:
                    numbers[name] = float(value)
                except (TypeError, ValueError):
                    raise UserError(f"{path} line {reader.line_num} has a cell that is not a number ({name}: "
                                    f"{value!r}); is the file damaged?") from None  # fmt: skip
            rows.append(numbers)
    return rows


# ---------------------------------------------------------------------------------------- a run's inputs, fingerprinted
# A resumed run must train on what it started on: the config compares settings and paths, and these compare what
# the paths hold. Training runs keep their fingerprints in INPUTS_FILE; pipelines in their state file.

INPUTS_FILE = "inputs.json"
"""Where a training run (PPO, RLOO, GRPO, DPO, SFT) records its inputs' fingerprints when it starts."""

ALLOW_CHANGED = "--allow-changed-inputs"
"""The flag (`allow_changed_inputs=True` in Python) that resumes a run whose inputs changed."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?")  # as data.is_hub_id reads one
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")
_DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".txt", ".gz", ".parquet", ".arrow")


def _counted(path: Path) -> bool:
    """Whether a file inside a directory input is one of what it is: weights, config, tokenizer, data. Not the
    reports a later command writes beside them (`rm eval`'s eval-*.json), which do not change the model."""
    name = path.name.lower()
    return (name.endswith(_MODEL_SUFFIXES + _DATA_SUFFIXES) or (name.endswith(".json") and "config" in name)
            or name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")))  # fmt: skip


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _directory_digest(root: Path) -> str:
    """sha256 of the (relative name, size) of the directory's weight, config, tokenizer and data files: gigabytes
    of weights are never read, so a model retrained in place with the same shapes (same file sizes) is not seen;
    a different architecture, dtype, tokenizer or training record is. Checkpoints, TensorBoard logs and
    hidden entries are left out."""
    root = root.resolve()
    rows = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("checkpoints", "tb"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and _counted(path) and path.is_file():
                rows.append([path.relative_to(root).as_posix(), path.stat().st_size])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _path_fingerprint(path: Path) -> str | None:
    if path.is_file():
        return f"file sha256:{_file_digest(path)}"
    if path.is_dir():
        return f"directory sha256:{_directory_digest(path)}"
    return None


def fingerprint(value: str) -> str | None:
    """What the input `value` names, as a string that changes when it does; None for a name with nothing on disk.

    - an existing file (prompts, comparisons, a config file): the sha256 of its content;
    - an existing directory (a policy, a reward model, a data set): a sha256 of its weight, config, tokenizer and
      data files' names and sizes (`_directory_digest`);
    - a reward SPEC (`spec.load_reward`): `rm:DIR` is the directory's; `path/file.py:function` the .py file's
      content (the modules it imports are the user's business: a change there is not seen); a weighted sum
      combines its terms'; a leading `sim:` is dropped;
    - a hub id ('owner/name'), not a path: the name itself (no config names a revision, so the name is all there is);
    - a built-in name ('vowels', 'tiny', 'smollm2'), a `module:function`, '' or a missing path: None, nothing to
      compare.
    """
    spec = str(value).strip()
    if not spec:
        return None
    if (found := _path_fingerprint(Path(spec).expanduser())) is not None:
        return found
    for prefix in ("sim:", "rm:"):
        if spec.startswith(prefix):
            return fingerprint(spec[len(prefix) :])
    if "+" in spec or "*" in spec:  # a weighted sum: '0.5*length+rm:runs/rm', '0.5*rw.py:fn+vowels'
        terms = []
        for term in spec.split("+"):
            weight, star, name = term.partition("*")
            try:
                float(weight)
            except ValueError:
                star = ""
            terms.append(fingerprint(name if star else term))
        if not any(terms):
            return None
        return terms[0] if len(terms) == 1 else f"sum sha256:{hashlib.sha256(json.dumps(terms).encode()).hexdigest()}"
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        return _path_fingerprint(Path(target).expanduser())
    if _HUB_ID.fullmatch(spec):
        return f"hub {spec}"
    return None


def fingerprint_texts(texts: Sequence) -> str:
    """sha256 of a list given in memory (prompts, comparisons as tuples of text): its items, in order."""
    return f"list sha256:{hashlib.sha256(json.dumps(list(texts), default=str).encode()).hexdigest()}"


def input_fingerprints(specs: dict[str, str], lists: dict[str, Sequence] | None = None) -> dict[str, dict]:
    """{name: {"spec": what the config says, "fingerprint": ...}} of a run's inputs: each of `specs` (config field ->
    its value) that names something to compare (`fingerprint`), and each of `lists` (what train() was handed in
    memory, such as the prompts: spec 'N items')."""
    out = {}
    for name, spec in specs.items():
        if (found := fingerprint(spec)) is not None:
            out[name] = {"spec": str(spec), "fingerprint": found}
    for name, items in (lists or {}).items():
        out[name] = {"spec": f"{len(items)} items", "fingerprint": fingerprint_texts(items)}
    return out


def check_inputs(saved: dict | None, current: dict, allow_changed: bool = False, run: str = "the run") -> list[str]:
    """Refuse to resume `run` on inputs that changed since it started: UserError naming each input of `saved`
    (`input_fingerprints` when it started) whose fingerprint now differs or is gone, and the two ways on. With
    allow_changed, a note on stderr instead. Returns a line per changed input. saved None or {} (a run written before
    fingerprints were kept) checks nothing: unknown is not changed."""
    changed = []
    for name, then in (saved or {}).items():
        if not isinstance(then, dict) or "fingerprint" not in then:
            continue  # an entry this version cannot read: unknown
        now = current.get(name)
        if now is not None and now["fingerprint"] == then["fingerprint"]:
            continue
        spec = then.get("spec", "")
        if now is None:
            changed.append(f"{name} ({spec}) is gone or names nothing on disk now")
        elif now["spec"] != spec:
            changed.append(f"{name} ({spec}) is now {now['spec']}")
        else:
            changed.append(f"{name} ({spec}) has changed")
    if changed and not allow_changed:
        raise UserError(f"{run} cannot resume: inputs changed since it started: {'; '.join(changed)}. Its steps so "
                        f"far trained on the old ones. Start a new run in another --out, or pass {ALLOW_CHANGED} "
                        "(allow_changed_inputs=True in Python) to continue on the new ones anyway")  # fmt: skip
    if changed:
        print(f"note: {run} continues on changed inputs ({ALLOW_CHANGED}): {'; '.join(changed)}", file=sys.stderr)
    return changed


def read_inputs(out_dir: str | Path) -> dict | None:
    """The fingerprints a training run in out_dir recorded when it started (INPUTS_FILE), None when it has none."""
    path = Path(out_dir) / INPUTS_FILE
    if not path.exists():
        return None
    fix = "restore it, or delete it to resume without comparing the run's inputs"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{path} cannot be read as JSON ({err}); {fix}") from None
    entries_ok = isinstance(found, dict) and all(
        isinstance(v, dict) and isinstance(v.get("fingerprint"), str) and isinstance(v.get("spec", ""), str)
        for v in found.values())  # fmt: skip
    if not entries_ok:  # a hand-edited file must not turn the check off in silence
        raise UserError(f"{path} is not what wprlhf writes there ({{name: {{\"spec\", \"fingerprint\"}}}}); {fix}")
    return found
