"""Read prompt sets from files (.txt, .jsonl, .csv, .csv.gz) or the built-in writing prompts, with clear errors."""

from __future__ import annotations

import csv
import gzip
import json
from importlib import resources
from pathlib import Path

from .errors import UserError

PROMPT_FIELDS = ("prompt", "text", "query")


def builtin_prompts() -> list[str]:
    """Original r/WritingPrompts-style prompts shipped with the package (no network, no ../shared needed)."""
    text = resources.files("wprlhf").joinpath("prompts/writing_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(path, encoding="utf-8", newline="")


def _field(row: dict, path: Path, where: str) -> str:
    for name in PROMPT_FIELDS:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise UserError(f"{path} {where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    raise UserError(f"{path} {where}: no 'prompt' field (found {sorted(row)}); name the prompt column 'prompt'")


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file; None or '' gives the built-in prompts.

    .txt: one prompt a line (blank lines skipped); .jsonl: objects with a 'prompt' field;
    .csv / .csv.gz: a 'prompt' column (stories may span lines inside quoted fields).
    Raises UserError for a missing file, an unknown format, a missing column, a malformed line or no prompts.
    """
    if not path:
        return builtin_prompts()
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompts file {path} does not exist")
    name = path.name.lower()
    prompts: list[str] = []
    try:
        if name.endswith(".txt"):
            prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        elif name.endswith((".jsonl", ".jsonl.gz")):
            with _open_text(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line")
                    if not isinstance(row, dict):
                        raise UserError(f"{path} line {n}: expected a JSON object with a 'prompt' field")
                    prompts.append(_field(row, path, f"line {n}").strip())
        elif name.endswith((".csv", ".csv.gz")):
            with _open_text(path) as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not set(PROMPT_FIELDS) & set(reader.fieldnames):
                    raise UserError(f"{path} has no 'prompt' column (columns: {reader.fieldnames}); add a header "
                                    "row with a 'prompt' column")  # fmt: skip
                for row in reader:
                    prompts.append((_field(row, path, f"row {reader.line_num}") or "").strip())
        else:
            raise UserError(f"prompts file {path}: unknown format; use .txt, .jsonl, .csv or .csv.gz")
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {path} is not UTF-8 text ({err.reason}); is it the right file?")
    except (gzip.BadGzipFile, EOFError, csv.Error) as err:
        raise UserError(f"prompts file {path} could not be read: {err}")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts; it needs at least one non-empty prompt")
    return prompts
