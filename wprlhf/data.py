"""Read prompts, karma-scored responses and comparisons (CSV, JSONL, Parquet, hub); karma -> comparisons.

Vocabulary (as in lm-human-preferences): a `Response` is one story written for a prompt, with its Reddit karma
(`score`) when known; a `Comparison` shows k >= 2 responses to one prompt and says which is `best` (k = 2 is a
pair). Karma becomes comparisons only inside one thread (`prompt_id`), where scores are comparable.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError
from .files import atomic_writer, iter_jsonl, open_text
from .text import clean_meta, clean_prompt

PROMPT_FIELDS = ("prompt", "text", "query")
# Stories run to ~40k characters, near csv's default 128 KiB field limit; 2**31 - 1 still fits a C long on Windows.
CSV_FIELD_LIMIT = 2**31 - 1
ON_ERROR = ("fail", "skip")


def builtin_prompts() -> list[str]:
    """Original r/WritingPrompts-style prompts shipped with the package (no network, no ../shared needed)."""
    text = resources.files("wprlhf").joinpath("prompts/writing_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


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
    .csv / .csv.gz: a 'prompt' column (stories may span lines inside quoted fields), passed through `clean_prompt`
    so Fan et al.'s tokenised prompts (`[ WP ] Dad , why ca n't ...`) read as written (`[WP] Dad, why can't ...`).
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
        elif name.endswith(FORMATS):
            rows = read_rows(path)
            tabular = not name.endswith((".jsonl", ".jsonl.gz"))
            if tabular and not set(PROMPT_FIELDS) & set(rows.columns):
                raise UserError(f"{path} has no 'prompt' column (columns: {rows.columns}); add a header "
                                "row with a 'prompt' column")  # fmt: skip
            tidy = clean_prompt if tabular else str.strip
            prompts = [tidy(_field(row, path, where) or "") for row, where in zip(rows, rows.where)]
        else:
            raise UserError(f"prompts file {path}: unknown format; use .txt, .jsonl, .csv, .csv.gz or .parquet")
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {path} is not UTF-8 text ({err.reason}); is it the right file?")
    except (gzip.BadGzipFile, EOFError, csv.Error) as err:
        raise UserError(f"prompts file {path} could not be read: {err}")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts; it needs at least one non-empty prompt")
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Rows from a file, a directory or the hub
# ---------------------------------------------------------------------------------------------------------------

FORMATS = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")


def is_hub_id(source: str) -> bool:
    """True when `source` reads as a Hugging Face hub id ('owner/name', optionally ':file') rather than a path."""
    return bool(_HUB_ID.match(str(source))) and not Path(str(source)).exists()


class Loaded(list):
    """A list of rows (or records built from them) that also says where they came from.

    source: the file or hub id read; columns: the CSV header, or the keys seen (JSONL, Parquet, hub);
    where: for each item, its place in the source for error messages ("row 3 (line 7)", "line 7", "row 3");
    skipped: one message per row left out under on_error="skip", naming its place and the problem.
    """

    def __init__(self, items=(), source: str = "", columns=(), where=(), skipped=()):
        super().__init__(items)
        self.source, self.columns, self.where, self.skipped = source, list(columns), list(where), list(skipped)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r} is not one of {ON_ERROR}")


def _resolve(source: str | Path, names: Sequence[str]) -> Path | str:
    """A local file (a directory resolved to the first of `names` in it), or a hub id as a string."""
    path = Path(source)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        wanted = f"none of {', '.join(names)}" if names else "no file this loader knows to pick"
        raise UserError(f"{path} is a directory holding {wanted}; pass the file itself")
    if path.exists():
        return path
    # "owner/name" or "owner/name:FILE"; "dir/file.csv" is a missing local file, not a hub id
    if _HUB_ID.match(str(source)) and not str(source).partition(":")[0].lower().endswith(FORMATS):
        return str(source)
    raise UserError(f"{source} does not exist (neither a file, a directory nor a hub id like owner/name)")


def read_rows(source: str | Path, names: Sequence[str] = (), hub_file: str | None = None,
              on_error: str = "fail") -> Loaded:  # fmt: skip
    """Rows (dicts keyed by column name) of a CSV / CSV.GZ / JSONL(.gz) / Parquet file, a directory or a hub data set.

    names: for a directory, the file names to look for in it, first found wins.
    A hub id `owner/name` (not a local path) loads its train split with `datasets.load_dataset`; `owner/name:FILE`
    or `hub_file` pick one file of the data set. CSV values are strings ('' = unknown); JSONL, Parquet and hub
    values keep their types. on_error="fail" raises UserError at the first malformed row, naming file and line;
    "skip" leaves such rows out and lists them in `.skipped`.
    """
    _check_on_error(on_error)
    resolved = _resolve(source, names)
    if isinstance(resolved, str):
        return _hub_rows(resolved, hub_file)
    name = resolved.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return _csv_rows(resolved, on_error)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(resolved, on_error)
    if name.endswith(".parquet"):
        return _parquet_rows(resolved)
    raise UserError(f"{resolved}: unknown format; use one of {', '.join(FORMATS)}")


def _csv_rows(path: Path, on_error: str) -> Loaded:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    out = Loaded(source=str(path))
    with open_text(path) as f:
        # strict: a stray quote is an error with a line number, not a silently merged field
        reader = csv.reader(f, strict=True)
        try:
            out.columns = next(reader)
        except StopIteration:
            raise UserError(f"{path} is empty; a CSV needs a header row naming its columns")
        except csv.Error as err:
            raise UserError(f"{path} line 1 (the header) is not valid CSV: {err}")
        n_row = 0
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                n_row += 1
                hint = "; a quoted field is never closed" if "unexpected end" in str(err) else ""
                _reject(out, f"{path} row {n_row} (line {start}) is not valid CSV: {err}{hint}", on_error)
                continue
            if not record:  # a blank line
                continue
            n_row += 1
            if len(record) != len(out.columns):
                problem = f"has {len(record)} fields but the header has {len(out.columns)}"
                _reject(out, f"{path} row {n_row} (line {start}) {problem}; quote fields that hold commas, quotes or "
                             "newlines", on_error)  # fmt: skip
                continue
            out.append(dict(zip(out.columns, record)))
            out.where.append(f"row {n_row} (line {start})")
    return out


def _jsonl_rows(path: Path, on_error: str) -> Loaded:
    out = Loaded(source=str(path))
    # "fail": iter_jsonl raises UserError naming the line; "skip": the line is listed in out.skipped
    skip = None if on_error == "fail" else lambda n, problem: out.skipped.append(f"{path} line {n} {problem}")
    for n, row in iter_jsonl(path, skip):
        out.columns += [key for key in row if key not in out.columns]
        out.append(row)
        out.where.append(f"line {n}")
    return out


def _parquet_rows(path: Path) -> Loaded:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to CSV or JSONL)")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for a damaged or non-Parquet file
        raise UserError(f"{path} could not be read as Parquet ({type(err).__name__}: {err}); is it the right file?")
    rows = table.to_pylist()
    return Loaded(rows, str(path), table.column_names, [f"row {i}" for i in range(1, len(rows) + 1)])


def _hub_rows(hub_id: str, hub_file: str | None) -> Loaded:
    repo, _, file = hub_id.partition(":")
    file = file or hub_file
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"{hub_id} is not a local file, and loading it from the Hugging Face hub needs the "
                        "`datasets` package: pip install datasets, or download the file and pass its path")  # fmt: skip
    try:
        dataset = load_dataset(repo, data_files=file, split="train")
    except Exception as err:  # offline, unknown id, missing file: datasets raises many types; all are the user's to fix
        raise UserError(f"could not load {repo}{' file ' + file if file else ''} from the Hugging Face hub "
                        f"({type(err).__name__}: {err}); check the id and your network, or download the file "
                        "and pass its path (a missing local path also ends up here)")  # fmt: skip
    rows = [dict(row) for row in dataset]
    columns = list(getattr(dataset, "column_names", None) or (rows[0] if rows else []))
    return Loaded(rows, hub_id, columns, [f"row {i}" for i in range(1, len(rows) + 1)])


def _reject(out: Loaded, message: str, on_error: str) -> None:
    if on_error == "fail":
        raise UserError(message)
    out.skipped.append(message)


def _require(rows: Loaded, needed: Sequence[str], what: str) -> None:
    if not rows and not rows.columns:  # an empty or blank JSONL has no columns to name
        raise UserError(f"{rows.source} holds no rows; {what}")
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise UserError(f"{rows.source} lacks column(s) {', '.join(missing)} (has: {', '.join(rows.columns)}); "
                        f"{what}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Records: responses with karma, comparisons
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Response:
    """One story for a prompt. score: Reddit karma (None = unknown); rank: 0 = highest karma in its thread."""

    prompt_id: str
    prompt: str
    response_id: str
    response: str
    score: float | None = None
    rank: int | None = None


@dataclass
class Comparison:
    """k >= 2 responses to one prompt and the index of the best; k = 2 is a pair (best 0 = A, 1 = B).

    labeler: who judged ("karma", a labeler name, "" = unknown); tie: the labeler saw no clear winner (best is
    then arbitrary and losses may skip or down-weight it); prompt_id: the thread, when known. strength: how
    clearly the best one won, a finite weight > 0 that a reward model's loss may use (`RewardConfig.pair_weight`):
    1 = an ordinary label; karma pairs carry `vote_strength` of their two scores, and a labeler's "clearly
    better" could carry more than a "slightly better".
    """

    prompt: str
    responses: list[str]
    best: int
    labeler: str = ""
    tie: bool = False
    prompt_id: str = ""
    strength: float = 1.0

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt is empty; every comparison needs its prompt")
        if not isinstance(self.responses, list) or len(self.responses) < 2:
            raise ValueError(f"responses must be a list of at least 2 texts, got {self.responses!r:.80}")
        for i, text in enumerate(self.responses):
            # An empty response is legal: a policy whose first token is end-of-turn writes one, and it gets labelled.
            if not isinstance(text, str):
                raise ValueError(f"response {i} is not text ({text!r:.40})")
        if isinstance(self.best, bool) or not isinstance(self.best, int) or not 0 <= self.best < len(self.responses):
            raise ValueError(f"best={self.best!r} must be an integer index into the {len(self.responses)} responses "
                             f"(0..{len(self.responses) - 1})")  # fmt: skip
        if not isinstance(self.labeler, str) or not isinstance(self.tie, bool):
            raise ValueError(f"labeler must be text and tie true/false, got {self.labeler!r} and {self.tie!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not math.isfinite(self.strength) or self.strength <= 0:  # fmt: skip
            raise ValueError(f"strength {self.strength!r} must be a finite number above 0 (1 = an ordinary label)")


RESPONSE_FILES = ("prompt_responses.csv.gz", "prompt_responses_full.csv", "prompt_responses.csv")
RESPONSE_COLUMNS = ("prompt_id", "prompt", "response_id", "response")
COMPARISON_FILES = ("comparisons.jsonl", "comparisons.jsonl.gz", "comparisons.csv", "comparisons.csv.gz")
PAIR_COLUMNS = ("prompt", "response_a", "response_b", "label")


def _text(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{column} must be text, got {type(value).__name__} {value!r:.40}")
    return value.strip()


def _id(value) -> str:
    """An id column as text; ids read from Parquet or the hub may be numbers."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


def _number(value, column: str) -> float | None:
    """A CSV string, int or float as float; '' / None / NaN (pandas' empty) = unknown."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{column} {value!r:.40} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"{column} {value!r:.40} is not a finite number")
    return number


def _int(value, column: str) -> int | None:
    number = _number(value, column)
    if number is not None and number != int(number):
        raise ValueError(f"{column} {value!r:.40} is not a whole number")
    return None if number is None else int(number)


def load_responses(source: str | Path, keep_meta: bool = False, on_error: str = "fail") -> Loaded:
    """Karma-scored stories: a list of `Response` in file order (a `Loaded`, so `.skipped` lists rows left out).

    source: a file, a directory holding one of RESPONSE_FILES, or a hub id (rewardsignal/reddit_writing_prompts
    reads its prompt_responses_full.csv). Columns as in that file: prompt_id, prompt, response_id, response are
    required; response_score (karma) and response_rank (0 = best) are read when present; others are ignored.
    keep_meta=False runs `clean_meta` on every response. Empty texts, bad numbers and repeated response ids are
    errors naming the row (on_error="skip": left out and listed in `.skipped`).
    """
    rows = read_rows(source, RESPONSE_FILES, "prompt_responses_full.csv", on_error)
    _require(rows, RESPONSE_COLUMNS, "expected the columns of rewardsignal/reddit_writing_prompts "
                                     "prompt_responses_full.csv")  # fmt: skip
    out = Loaded(source=rows.source, columns=rows.columns, skipped=rows.skipped)
    first_seen: dict[str, str] = {}
    for row, where in zip(rows, rows.where):
        try:
            response = _response(row, keep_meta)
        except ValueError as err:
            _reject(out, f"{rows.source} {where}: {err}", on_error)
            continue
        if response.response_id in first_seen:
            _reject(out, f"{rows.source} {where}: response_id {response.response_id} repeats "
                         f"{first_seen[response.response_id]}; response ids must be unique", on_error)  # fmt: skip
            continue
        first_seen[response.response_id] = where
        out.append(response)
        out.where.append(where)
    return out


def _response(row: dict, keep_meta: bool) -> Response:
    # .get: a JSONL line may lack a key that other lines have
    texts = {c: _text(row.get(c), c) if c in ("prompt", "response") else _id(row.get(c)) for c in RESPONSE_COLUMNS}
    for column in RESPONSE_COLUMNS:
        if not texts[column]:
            raise ValueError(f"{column} is empty; fill it in or remove the row")
    response = texts["response"] if keep_meta else clean_meta(texts["response"])
    if not response:
        raise ValueError("response holds only Reddit meta lines (edits, links); remove the row or pass keep_meta=True")
    score, rank = _number(row.get("response_score"), "response_score"), _int(row.get("response_rank"), "response_rank")
    return Response(texts["prompt_id"], texts["prompt"], texts["response_id"], response, score, rank)


def load_comparisons(source: str | Path, keep_meta: bool = False, on_error: str = "fail") -> Loaded:
    """Comparisons from a pair file or a comparisons JSONL: a list of `Comparison` (a `Loaded`).

    Pair format (CSV, e.g. ../shared/data/writing_prompts/comparisons_test.csv): prompt, response_a, response_b,
    label (0 = A is better, 1 = B), optional prompt_id and labeler; other columns (ids, scores) are not kept.
    JSONL format (what `write_comparisons` writes): {"prompt", "responses": [...], "best", "labeler", "tie",
    "prompt_id"}, the last three optional. A file with a `responses` column is read as JSONL format, any other
    as pairs. keep_meta=False runs `clean_meta` on every response.
    """
    rows = read_rows(source, COMPARISON_FILES, on_error=on_error)
    k_way = "responses" in rows.columns
    if k_way:
        _require(rows, ("prompt", "responses", "best"), "a comparisons JSONL needs prompt, responses and best")
    else:
        _require(rows, PAIR_COLUMNS, "a pair file needs prompt, response_a, response_b and label (0 if A is better, "
                                     "1 if B); a comparisons JSONL needs prompt, responses and best")  # fmt: skip
    out = Loaded(source=rows.source, columns=rows.columns, skipped=rows.skipped)
    for row, where in zip(rows, rows.where):
        try:
            comparison = (_k_way if k_way else _pair)(row, (lambda text: text) if keep_meta else clean_meta)
        except ValueError as err:
            _reject(out, f"{rows.source} {where}: {err}", on_error)
            continue
        out.append(comparison)
        out.where.append(where)
    return out


def _pair(row: dict, tidy) -> Comparison:
    """One pair-format row; tidy(text) -> text is applied to both responses (clean_meta or identity)."""
    label = _int(row.get("label"), "label")
    if label not in (0, 1):
        raise ValueError(f"label {row.get('label')!r} must be 0 (response_a is better) or 1 (response_b is better)")
    responses = [tidy(_text(row.get("response_a"), "response_a")), tidy(_text(row.get("response_b"), "response_b"))]
    strength = _number(row.get("strength"), "strength")
    if strength is None:  # the shared karma pair files carry both scores instead
        a, b = _number(row.get("score_a"), "score_a"), _number(row.get("score_b"), "score_b")
        strength = 1.0 if a is None or b is None else vote_strength(max(a, b), min(a, b))
    return Comparison(_text(row.get("prompt"), "prompt"), responses, label, _text(row.get("labeler"), "labeler"),
                      prompt_id=_id(row.get("prompt_id")), strength=strength)  # fmt: skip


def _k_way(row: dict, tidy) -> Comparison:
    """One comparisons-JSONL row; tidy as in `_pair`. Comparison's own checks catch a bad best, tie or k < 2."""
    responses = row.get("responses")
    if not isinstance(responses, list):
        raise ValueError(f"responses must be a JSON list of texts, got {type(responses).__name__}")
    responses = [tidy(_text(text, "responses")) for text in responses]
    labeler, tie = _text(row.get("labeler"), "labeler"), row.get("tie", False)
    strength = row.get("strength", 1.0)
    return Comparison(
        _text(row.get("prompt"), "prompt"), responses, row.get("best"), labeler, tie, _id(row.get("prompt_id")),
        1.0 if strength is None else strength,
    )


def write_comparisons(path: str | Path, comparisons: Iterable[Comparison]) -> Path:
    """Write comparisons as JSONL (gzipped when the name ends .gz), one object a line, fields as in `Comparison`.

    Atomic: the file is written beside its target and moved into place, so a crash leaves the old file or the
    new one, never half of one. Returns the path.
    """
    path = Path(path)
    with atomic_writer(path) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
        for c in comparisons:
            c.__post_init__()  # refuse to write what load_comparisons would reject
            stream.write((json.dumps(asdict(c), ensure_ascii=False) + "\n").encode("utf-8"))
        if stream is not raw:
            stream.close()
    return path


# ---------------------------------------------------------------------------------------------------------------
# Karma -> comparisons, and a split that keeps each prompt on one side
# ---------------------------------------------------------------------------------------------------------------


def clearly_better(hi: float, lo: float, min_gap: float = 20, min_ratio: float = 2.0) -> bool:
    """The pair rule of ../shared/data/writing_prompts/README.md: karma `hi` clearly beats `lo` when
    hi - lo >= min_gap and max(hi, 1) / max(lo, 1) >= min_ratio (karma of 0 or below counts as 1 in the ratio:
    a story at -5 is not "infinitely" worse than one at 30).

    >>> clearly_better(40, 20), clearly_better(60, 35), clearly_better(30, 11), clearly_better(21, -3)
    (True, False, False, True)
    """
    return hi - lo >= min_gap and max(hi, 1) / max(lo, 1) >= min_ratio


def vote_strength(hi: float, lo: float) -> float:
    """A karma pair's strength: log2 of its vote ratio, max(hi, 1) / max(lo, 1) (the ratio of `clearly_better`),
    floored at 1, so a pair at the rule's 2x counts as an ordinary label and one at 64x counts 6 times as much.

    >>> vote_strength(40, 20), vote_strength(640, 10), vote_strength(30, -4)
    (1.0, 6.0, 4.906890595608519)
    """
    return max(1.0, math.log2(max(hi, 1) / max(lo, 1)))


def length_ratio(texts: Sequence[str]) -> float:
    """The longest text's words over the shortest's (an empty text counts one word): 1 = equal lengths."""
    words = [max(1, len(t.split())) for t in texts]
    return max(words) / min(words)


def _by_prompt(responses: Iterable[Response]) -> list[list[Response]]:
    """Scored responses grouped by thread, threads in prompt-id order, responses in response-id order (so the
    result does not depend on the input's order)."""
    groups: dict[str, list[Response]] = {}
    for r in responses:
        if r.score is not None:
            groups.setdefault(r.prompt_id, []).append(r)
    return [sorted(groups[key], key=lambda r: r.response_id) for key in sorted(groups)]


def _check_scored(responses: Sequence[Response]) -> None:
    if responses and all(r.score is None for r in responses):
        raise UserError("no response has a karma score (response_score is empty or missing); karma comparisons "
                        "need scores")  # fmt: skip


def karma_pairs(responses: Sequence[Response], min_gap: float = 20, min_ratio: float = 2.0,
                max_pairs_per_prompt: int | None = 20, seed: int = 42,
                max_length_ratio: float | None = None) -> list[Comparison]:  # fmt: skip
    """Pairs of responses to one prompt whose karma differs clearly (`clearly_better`), as in the shared data.

    Threads are taken in prompt-id order; a thread's pairs are (i, j), i < j, with its responses in response-id
    order. Where a thread has more than max_pairs_per_prompt pairs (None or 0: keep all), that many are drawn
    with one `random.Random(seed).sample` over all threads, and kept in pair order. The better response is A
    when a second `random.Random(seed).random() < 0.5` (one draw per pair), else B, so labels are balanced and
    position tells nothing. Responses without a score are left out. With the defaults this rebuilds
    comparisons_train + comparisons_test of ../shared/data/writing_prompts exactly, pair for pair.
    max_length_ratio: keep only pairs whose `length_ratio` is at most this (a length-debiased set: where lengths
    are close, a longer story cannot win for being longer); applied before the per-thread cap.
    Returns Comparisons with k = 2, best 0 or 1, labeler "karma", strength `vote_strength`.
    """
    _check_scored(responses)
    sample_rng, order_rng = random.Random(seed), random.Random(seed)
    pairs = []
    for group in _by_prompt(responses):
        candidates = []
        for a, b in itertools.combinations(group, 2):
            hi, lo = (a, b) if a.score >= b.score else (b, a)
            if clearly_better(hi.score, lo.score, min_gap, min_ratio) and (
                    max_length_ratio is None or length_ratio([hi.response, lo.response]) <= max_length_ratio):
                candidates.append((hi, lo))
        if max_pairs_per_prompt and len(candidates) > max_pairs_per_prompt:
            keep = sample_rng.sample(range(len(candidates)), max_pairs_per_prompt)  # the same draw as on the list
            candidates = [candidates[i] for i in sorted(keep)]
        for hi, lo in candidates:
            best = 0 if order_rng.random() < 0.5 else 1
            texts = [hi.response, lo.response] if best == 0 else [lo.response, hi.response]
            pairs.append(Comparison(hi.prompt, texts, best, "karma", prompt_id=hi.prompt_id,
                                    strength=vote_strength(hi.score, lo.score)))  # fmt: skip
    return pairs


def karma_pairs_of(prompts: Sequence[Comparison], responses: Sequence[Response], **rule) -> list[Comparison]:
    """`karma_pairs(responses, **rule)` of the prompts of some comparisons only (by `prompt_key`, so reposts go
    with them): a split's pairs rebuilt from its stories, e.g. all of them (max_pairs_per_prompt=None) where the
    shipped file kept 20 a prompt."""
    keys = {prompt_key(c.prompt) for c in prompts}
    return karma_pairs([r for r in responses if prompt_key(r.prompt) in keys], **rule)


def best_of_k(responses: Sequence[Response], k: int = 4, seed: int = 42, min_gap: float = 20,
              min_ratio: float = 2.0, max_sets_per_prompt: int | None = 5) -> list[Comparison]:  # fmt: skip
    """k-way comparisons (lm-human-preferences' 4-way questions) with one clear winner, from karma.

    Rule: in one thread, every response with at least k - 1 others it `clearly_better`-beats is a winner; its set
    is the winner plus k - 1 of those others drawn at random. So the winner beats each other member by the pair
    rule, while the others' order among themselves is unknown, which a best-of-k label does not need. One set per
    winner, at most max_sets_per_prompt sets per thread (a random subset; None or 0: all), members shuffled so
    `best` is uniform over positions. Threads in prompt-id order; labeler "karma".
    """
    if k < 2:
        raise UserError(f"best_of_k needs k >= 2 (got {k}); k = 2 is karma_pairs")
    _check_scored(responses)
    rng = random.Random(seed)
    sets = []
    for group in _by_prompt(responses):
        found = []
        for winner in group:
            losers = [r for r in group if r is not winner and clearly_better(winner.score, r.score, min_gap, min_ratio)]
            if len(losers) >= k - 1:
                members = [winner, *rng.sample(losers, k - 1)]
                rng.shuffle(members)
                found.append(Comparison(winner.prompt, [m.response for m in members], members.index(winner),
                                        "karma", prompt_id=winner.prompt_id))  # fmt: skip
        if max_sets_per_prompt and len(found) > max_sets_per_prompt:
            found = rng.sample(found, max_sets_per_prompt)
        sets.extend(found)
    return sets


def prompt_key(prompt: str) -> str:
    """The text by which reposts of one prompt are recognised: Unicode-normalised (NFKC, so a full-width or
    ligature spelling is the plain one), format characters (category Cf: zero-width spaces and joiners, soft
    hyphens, direction marks) dropped, case folded, punctuation and tags' brackets gone. Two spellings of one
    prompt share a key, so they fall on one side of every split.

    >>> prompt_key("[WP] You're  an immortal!") == prompt_key("[ wp ] you re an immortal")
    True
    >>> prompt_key("\uff37\uff30 im\u200bmortal") == prompt_key("WP immortal")
    True
    >>> prompt_key("İstanbul"), prompt_key("🐉🔥") == prompt_key("🌙")
    ('istanbul', False)
    """
    text = "".join(c for c in unicodedata.normalize("NFKC", prompt) if unicodedata.category(c) != "Cf")
    # Case folding can leave a lone combining mark ('İ' -> 'i' + U+0307): normalise again and drop those marks, so a
    # word is not split in two at one.
    folded = "".join(c for c in unicodedata.normalize("NFKC", text.casefold()) if unicodedata.category(c) != "Mn")
    # A prompt with no letters or digits at all (emoji, symbols) keeps its symbols: it is not a repost of every
    # other such prompt.
    return " ".join(re.sub(r"[\W_]+", " ", folded).split()) or "".join(folded.split())


def split_by_prompt(items: Sequence, test_fraction: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """(train, test): items grouped by `prompt_key` of their prompt, so no prompt (nor a repost of it) is on both
    sides. Items are anything with a `.prompt` (Response, Comparison) or prompt strings; each keeps its order.

    Groups are sorted by their smallest prompt_id (items without one: by their smallest prompt text), shuffled
    with random.Random(seed), and the first round(test_fraction x groups) go to test. That is the rule
    ../shared/data/writing_prompts/README.md used: split_by_prompt(load_responses(...)) puts exactly the
    prompts of comparisons_test.csv on the test side.
    """
    if not 0 <= test_fraction < 1:
        raise UserError(f"test_fraction={test_fraction} must be in [0, 1)")
    key = [prompt_key(getattr(item, "prompt", item)) for item in items]
    order: dict[str, tuple[str, str]] = {}  # group -> the smallest (prompt_id, prompt) among its items
    for item, k in zip(items, key):
        here = (getattr(item, "prompt_id", "") or "", getattr(item, "prompt", item))
        order[k] = min(here, order.get(k, here))
    groups = sorted(order, key=order.__getitem__)
    random.Random(seed).shuffle(groups)
    test_keys = set(groups[: round(test_fraction * len(groups))])
    train = [item for item, k in zip(items, key) if k not in test_keys]
    test = [item for item, k in zip(items, key) if k in test_keys]
    return train, test
