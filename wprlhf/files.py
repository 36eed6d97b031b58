"""Atomic file writes, and the readers of wprlhf's own JSONL and metrics CSV files: each written once, here.

Tier 0: imports nothing from wprlhf but `errors`, and no torch, so `report.py` (which never loads a model) and
every other module can use it. `labeling/` keeps its own small reader and writer, as it imports no wprlhf module.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import UserError


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
