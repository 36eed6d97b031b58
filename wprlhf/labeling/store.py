"""The SQLite store of human labels: queued comparisons, who labelled what, and who is shown what next.

One file in WAL mode, so readers never wait for the writer. Every write is one `BEGIN IMMEDIATE` transaction
(the write lock is taken before anything is read, so two labelers cannot both see a slot as free and both fill
it), and `labels` has UNIQUE(comparison_id, labeler): a label can be neither lost nor stored twice, even under
many concurrent labelers. Each thread has its own connection, so one Store is safe to share between threads.

A comparison is done when it holds `labels_per_comparison` answers (a pick or a tie; skips don't count). While
a labeler looks at a comparison it is reserved for them (`assignments`, RESERVE_SECONDS), so with N = 1 two
labelers are never shown the same one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

MAX_RESPONSES = 4  # the page has keys 1-4
MAX_NAME = 64
RESERVE_SECONDS = 600  # a labeler who walks away frees their comparison after 10 minutes

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,          -- JSON list of 2..4 strings
    metadata TEXT NOT NULL,           -- JSON object: the input line's other fields
    content_key TEXT NOT NULL UNIQUE, -- hash of prompt + responses: adding a file twice queues nothing twice
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('best', 'tie', 'skip')),
    best INTEGER,                     -- the index picked when kind = 'best', else NULL
    created_at REAL NOT NULL,
    UNIQUE (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS assignments (
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LabelingError(Exception):
    """Bad input to the labeling tools (a file, a request). The message says what is wrong and how to fix it."""

    status = 400  # the HTTP status the web app answers with


class UnknownComparison(LabelingError):
    status = 404


class StaleComparison(LabelingError):
    """The comparison may not take this label any more: this labeler answered it, or it has enough labels."""

    status = 409


def check_labeler(name) -> str:
    """A labeler's name, stripped; 1..MAX_NAME printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise LabelingError("labeler name is missing; enter your name once on the page")
    name = name.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise LabelingError(f"labeler name must be at most {MAX_NAME} printable characters")
    return name


def check_sample(row, where: str) -> tuple[str, list[str], dict]:
    """(prompt, responses, metadata) of one `wprlhf sample` line; `where` names it in errors ("f.jsonl line 3")."""
    if not isinstance(row, dict):
        raise LabelingError(f"{where} is a JSON {type(row).__name__}, not an object; write one {{...}} per line")
    prompt, responses = row.get("prompt"), row.get("responses")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LabelingError(f"{where}: 'prompt' is missing or empty; every comparison needs its prompt")
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
        got = f"{len(responses)} responses" if isinstance(responses, list) else f"{type(responses).__name__}"
        raise LabelingError(f"{where}: 'responses' must be a list of 2 to {MAX_RESPONSES} texts, got {got}; "
                            f"sample with -k 2..{MAX_RESPONSES}")  # fmt: skip
    for i, text in enumerate(responses):
        if not isinstance(text, str) or not text.strip():
            raise LabelingError(f"{where}: response {i} is empty or not text")
    metadata = {k: v for k, v in row.items() if k not in ("prompt", "responses")}
    return prompt, responses, metadata


def read_samples(path: str | Path) -> list[tuple[str, list[str], dict]]:
    """Every line of a `wprlhf sample` JSONL file, checked; the first bad line raises LabelingError."""
    path = Path(path)
    if not path.is_file():
        raise LabelingError(f"samples file {path} does not exist; write one with `wprlhf sample --out FILE`")
    samples = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LabelingError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line")
                samples.append(check_sample(row, f"{path} line {n}"))
    except UnicodeDecodeError as err:
        raise LabelingError(f"{path} is not UTF-8 text ({err.reason}); is it the right file?")
    if not samples:
        raise LabelingError(f"{path} holds no samples; expected one {{\"prompt\": ..., \"responses\": [...]}} a line")
    return samples


class Store:
    """The labels database at `path` (created if absent). labels_per_comparison: how many labelers answer each
    comparison; None keeps the value stored in the file (1 for a new file)."""

    def __init__(self, path: str | Path, labels_per_comparison: int | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise LabelingError(f"--db {self.path} is a directory; name a file such as labels.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # one connection per thread: sqlite3 connections are not shared
        with self._connect() as db:
            # WAL is a property of the file: set once, every later connection gets it
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        if labels_per_comparison is not None:
            if isinstance(labels_per_comparison, bool) or not isinstance(labels_per_comparison, int) \
                    or labels_per_comparison < 1:  # fmt: skip
                raise LabelingError(f"labels per comparison must be an integer >= 1, got {labels_per_comparison!r}")
            with self._write() as db:
                db.execute("INSERT OR REPLACE INTO settings VALUES ('labels_per_comparison', ?)",
                           (str(labels_per_comparison),))  # fmt: skip

    @property
    def labels_per_comparison(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'labels_per_comparison'").fetchone()
        return int(row[0]) if row else 1

    # ------------------------------------------------------------------------------------------ connections

    @contextmanager
    def _connect(self):
        """This thread's connection, opened on first use and kept: closing the last connection to a WAL file
        checkpoints and deletes the WAL, which costs more than the query (5 ms against 0.1 ms here)."""
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: we issue BEGIN ourselves, so each transaction is exactly what the code shows
            db = self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA foreign_keys = ON")
            # FULL: a label the page reported as saved survives a power cut, not only a crash of the server
            db.execute("PRAGMA synchronous = FULL")
        yield db

    @contextmanager
    def _write(self):
        """One write transaction; IMMEDIATE takes the write lock before the first read, so checks and writes
        inside it see no other writer in between."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self):
        """One read transaction: every query inside sees the same snapshot."""
        with self._connect() as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ writes

    def add(self, samples) -> tuple[int, int]:
        """Queue (prompt, responses, metadata) triples in one transaction: all or none. Returns (added,
        already_queued); a comparison with the same prompt and responses is queued once."""
        checked = [check_sample({"prompt": p, "responses": r, **m}, f"sample {i + 1}")
                   for i, (p, r, m) in enumerate(samples)]  # fmt: skip
        added = 0
        now = time.time()
        with self._write() as db:
            for prompt, responses, metadata in checked:
                key = hashlib.sha256(json.dumps([prompt, responses]).encode()).hexdigest()
                cursor = db.execute("INSERT OR IGNORE INTO comparisons (prompt, responses, metadata, content_key, "
                                    "added_at) VALUES (?, ?, ?, ?, ?)",
                                    (prompt, json.dumps(responses), json.dumps(metadata), key, now))  # fmt: skip
                added += cursor.rowcount
        return added, len(checked) - added

    def next_for(self, labeler: str) -> dict | None:
        """The comparison `labeler` should answer next, reserved for them; None when nothing is left for them.

        Their own unexpired reservation comes first (a reloaded page shows the same comparison); otherwise the
        oldest open comparison. Everyone works from the oldest up, so comparisons others started get finished
        first, and the scan stops at the first open row instead of counting labels for the whole queue.
        """
        labeler = check_labeler(labeler)
        n, now = self.labels_per_comparison, time.time()
        with self._write() as db:
            db.execute("DELETE FROM assignments WHERE expires_at < ?", (now,))
            row = db.execute(
                "SELECT a.comparison_id FROM assignments a WHERE a.labeler = ? AND NOT EXISTS "
                "(SELECT 1 FROM labels l WHERE l.comparison_id = a.comparison_id AND l.labeler = a.labeler) "
                "AND (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = a.comparison_id AND l.kind != 'skip') < ? "
                "ORDER BY a.comparison_id LIMIT 1", (labeler, n)).fetchone()  # fmt: skip
            if row is not None:
                return self._comparison(db, row[0])  # already reserved: no write, so no fsync
            # open: not answered by this labeler, and answers plus others' reservations leave room for one more
            row = db.execute(
                """SELECT c.id FROM comparisons c
                   WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id AND l.labeler = ?)
                     AND (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = c.id AND l.kind != 'skip')
                       + (SELECT COUNT(*) FROM assignments a WHERE a.comparison_id = c.id AND a.labeler != ?
                            AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id
                                            AND l.labeler = a.labeler)) < ?
                   ORDER BY c.id LIMIT 1""",
                (labeler, labeler, n)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?)", (row[0], labeler, now + RESERVE_SECONDS))
            return self._comparison(db, row[0])

    def label(self, comparison_id, labeler: str, choice) -> int:
        """Store one answer in one transaction; returns the label's id.

        choice: the index of the best response, "tie" or "skip". Raises UnknownComparison for an id not in the
        store, StaleComparison when this labeler already answered it or it already holds enough answers (a skip is
        always accepted once: it only takes the comparison out of this labeler's queue), LabelingError otherwise.
        """
        labeler = check_labeler(labeler)
        if isinstance(comparison_id, bool) or not isinstance(comparison_id, int):
            raise LabelingError(f"comparison_id must be an integer, got {comparison_id!r:.40}")
        n = self.labels_per_comparison
        with self._write() as db:
            row = db.execute("SELECT responses FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
            if row is None:
                raise UnknownComparison(f"comparison {comparison_id} does not exist; reload the page")
            k = len(json.loads(row[0]))
            if choice in ("tie", "skip"):
                kind, best = choice, None
            elif isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < k:
                kind, best = "best", choice
            else:
                raise LabelingError(f"choice {choice!r:.40} must be a response index 0..{k - 1}, 'tie' or 'skip'")
            if db.execute("SELECT 1 FROM labels WHERE comparison_id = ? AND labeler = ?",
                          (comparison_id, labeler)).fetchone():  # fmt: skip
                raise StaleComparison(f"{labeler} already labelled comparison {comparison_id}; undo it first to change it")
            done = db.execute("SELECT COUNT(*) FROM labels WHERE comparison_id = ? AND kind != 'skip'",
                              (comparison_id,)).fetchone()[0]  # fmt: skip
            if kind != "skip" and done >= n:
                raise StaleComparison(f"comparison {comparison_id} already has its {n} label(s); load the next one")
            cursor = db.execute("INSERT INTO labels (comparison_id, labeler, kind, best, created_at) "
                                "VALUES (?, ?, ?, ?, ?)", (comparison_id, labeler, kind, best, time.time()))  # fmt: skip
            db.execute("DELETE FROM assignments WHERE comparison_id = ? AND labeler = ?", (comparison_id, labeler))
            return cursor.lastrowid

    def undo(self, labeler: str) -> dict | None:
        """Delete `labeler`'s latest label and reserve that comparison for them again; returns it (None if they
        have no label). Repeated calls walk further back."""
        labeler = check_labeler(labeler)
        with self._write() as db:
            row = db.execute("SELECT id, comparison_id FROM labels WHERE labeler = ? ORDER BY id DESC LIMIT 1",
                             (labeler,)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
            db.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?)",
                       (row[1], labeler, time.time() + RESERVE_SECONDS))  # fmt: skip
            return self._comparison(db, row[1])

    # ------------------------------------------------------------------------------------------ reads

    @staticmethod
    def _comparison(db, comparison_id: int) -> dict:
        prompt, responses = db.execute("SELECT prompt, responses FROM comparisons WHERE id = ?",
                                       (comparison_id,)).fetchone()  # fmt: skip
        return {"id": comparison_id, "prompt": prompt, "responses": json.loads(responses)}

    def labels(self) -> list[dict]:
        """Every stored label, oldest first, as dicts (id, comparison_id, labeler, kind, best)."""
        with self._connect() as db:
            rows = db.execute("SELECT id, comparison_id, labeler, kind, best FROM labels ORDER BY id").fetchall()
        return [dict(zip(("id", "comparison_id", "labeler", "kind", "best"), r)) for r in rows]

    def stats(self, labeler: str | None = None) -> dict:
        """Progress and agreement.

        comparisons: queued in total; done: those with labels_per_comparison answers; queued: the rest; labels:
        answers (picks and ties), skips apart. agreement: over every two labelers who answered the same comparison,
        the share who gave the same answer (a tie agrees only with a tie); None before any such pair
        (agreement_pairs = 0). With `labeler`: mine (their answers and skips) and left_for_me (comparisons they
        could still be shown, counting others' reservations as taken).
        """
        n = self.labels_per_comparison
        labeler = None if labeler is None else check_labeler(labeler)
        with self._read() as db:
            total = db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
            answers = db.execute("SELECT comparison_id, kind, best FROM labels WHERE kind != 'skip' "
                                 "ORDER BY comparison_id").fetchall()  # fmt: skip
            skips = db.execute("SELECT COUNT(*) FROM labels WHERE kind = 'skip'").fetchone()[0]
            mine = left = None
            if labeler is not None:
                mine = db.execute("SELECT COUNT(*) FROM labels WHERE labeler = ?", (labeler,)).fetchone()[0]
                left = db.execute(
                    """SELECT COUNT(*) FROM comparisons c
                       WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id AND l.labeler = ?)
                         AND (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = c.id AND l.kind != 'skip')
                           + (SELECT COUNT(*) FROM assignments a WHERE a.comparison_id = c.id AND a.labeler != ?
                                AND a.expires_at >= ? AND NOT EXISTS (SELECT 1 FROM labels l
                                WHERE l.comparison_id = c.id AND l.labeler = a.labeler)) < ?""",
                    (labeler, labeler, time.time(), n)).fetchone()[0]  # fmt: skip
        done = agree = pairs = 0
        for _, group in itertools.groupby(answers, key=lambda r: r[0]):
            given = [(kind, best) for _, kind, best in group]
            done += len(given) >= n
            for a, b in itertools.combinations(given, 2):
                pairs += 1
                agree += a == b
        out = {"comparisons": total, "done": done, "queued": total - done, "labels": len(answers), "skips": skips,
               "labels_per_comparison": n, "agreement": agree / pairs if pairs else None, "agreement_pairs": pairs}
        if labeler is not None:
            out.update(mine=mine, left_for_me=left)
        return out

    def export(self, out: str | Path) -> int:
        """Write every answer (picks and ties; skips are not labels) as a comparisons JSONL, one line per label,
        in the format `wprlhf.data.load_comparisons` reads. A tie has best 0 and tie true (best is arbitrary
        there). Atomic: written beside `out`, then moved into place. Returns the number of lines."""
        with self._connect() as db:
            rows = db.execute("SELECT c.prompt, c.responses, c.metadata, l.labeler, l.kind, l.best FROM labels l "
                              "JOIN comparisons c ON c.id = l.comparison_id WHERE l.kind != 'skip' "
                              "ORDER BY l.id").fetchall()  # fmt: skip
        lines = []
        for prompt, responses, metadata, labeler, kind, best in rows:
            prompt_id = json.loads(metadata).get("prompt_id", "")
            lines.append(json.dumps({"prompt": prompt, "responses": json.loads(responses),
                                     "best": best if kind == "best" else 0, "labeler": labeler, "tie": kind == "tie",
                                     "prompt_id": "" if prompt_id is None else str(prompt_id)},
                                    ensure_ascii=False))  # fmt: skip
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the labels are meant to be shared
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(lines)
