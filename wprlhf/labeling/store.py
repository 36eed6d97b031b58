"""The SQLite store of human labels: queued comparisons, who labelled what, and who is shown what next.

One file in WAL mode, so readers never wait for the writer. Every write is one `BEGIN IMMEDIATE` transaction
(the write lock is taken before anything is read, so two labelers cannot both see a slot as free and both fill
it), and `labels` has UNIQUE(comparison_id, labeler): a label can be neither lost nor stored twice, even under
many concurrent labelers. Each thread has its own connection, so one Store is safe to share between threads.

A comparison is done when it holds `labels_per_comparison` answers (a pick or a tie; skips don't count). Each
page load opens a session (`open_session`); labels, leases and undo belong to it, so nobody can undo another
page's label by typing its name. While a page shows a comparison it holds a short lease on it (`assignments`,
LEASE_SECONDS, one per session): the page renews it while visible and releases it when hidden, so a labeler who
walks away, or a script that opens many sessions, blocks the queue for a minute at most. Code that labels without
a page (tests, scripts) passes no session and is known by name alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import sqlite3
import string
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

MAX_RESPONSES = 4  # the page has keys 1-4
MAX_NAME = 64
MAX_ID = 2**63 - 1  # SQLite's largest integer: a bigger id raises OverflowError inside sqlite3 instead of not matching
LEASE_SECONDS = 60  # a page renews its lease every 20 s while visible; a closed or hidden page frees it within this
SESSION_CHARS = frozenset(string.ascii_letters + string.digits + "-_")  # what secrets.token_urlsafe makes

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,          -- JSON list of 2..4 strings (an empty string is a legal response)
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
    session TEXT,                     -- the page session that gave it; NULL from scripts and older files
    UNIQUE (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS assignments (  -- leases: comparison_id is on `session`'s screen until expires_at
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL,
    expires_at REAL NOT NULL,
    session TEXT,
    PRIMARY KEY (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, labeler TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Columns added since the first release: a file written before them gets them when it is opened.
MIGRATIONS = [("labels", "session", "TEXT"), ("assignments", "session", "TEXT")]
INDEXES = """
CREATE INDEX IF NOT EXISTS labels_by_session ON labels (session, id);
CREATE INDEX IF NOT EXISTS assignments_by_session ON assignments (session);
"""

# Comparison c is open for (:labeler, :session) at :now: they have not answered it, no other page of theirs holds
# it, and its answers plus other labelers' live leases leave room for one more. Named parameters, so next_for,
# renew and stats share one definition.
CANDIDATE = """NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id AND l.labeler = :labeler)
    AND (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = c.id AND l.kind != 'skip') < :n"""
OPEN = CANDIDATE + """
    AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.comparison_id = c.id AND a.labeler = :labeler
                    AND a.session IS NOT :session AND a.expires_at >= :now)
    AND (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = c.id AND l.kind != 'skip')
      + (SELECT COUNT(*) FROM assignments a WHERE a.comparison_id = c.id AND a.labeler != :labeler
           AND a.expires_at >= :now
           AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id AND l.labeler = a.labeler)) < :n"""


class LabelingError(Exception):
    """Bad input to the labeling tools (a file, a request). The message says what is wrong and how to fix it."""

    status = 400  # the HTTP status the web app answers with


class UnknownComparison(LabelingError):
    status = 404


class UnknownSession(LabelingError):
    status = 403


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


def check_id(value, what: str = "comparison_id") -> int:
    """A row id from a request: an integer SQLite can hold. Checked here because a larger one would not simply
    miss: sqlite3 raises OverflowError while binding it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelingError(f"{what} must be an integer, got {value!r:.40}")
    if not 1 <= value <= MAX_ID:
        raise LabelingError(f"{what} is out of range: ids run from 1 to {MAX_ID}")
    return value


def check_session(value) -> str:
    """A session id as `open_session` makes them (URL-safe base64, at most 64 characters)."""
    if value is None or value == "":
        raise LabelingError("session is missing; open one with POST /api/session {\"labeler\": NAME} and send it "
                            "with every call (the page does this itself)")  # fmt: skip
    if not isinstance(value, str) or len(value) > 64 or not set(value) <= SESSION_CHARS:
        raise LabelingError("session is malformed; reload the page to get a new one")
    return value


def check_sample(row, where: str) -> tuple[str, list[str], dict]:
    """(prompt, responses, metadata) of one `wprlhf sample` line; `where` names it in errors ("f.jsonl line 3").

    An empty response is legal: a policy whose first token is end-of-turn writes one, and people should see it.
    """
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
        if not isinstance(text, str):
            raise LabelingError(f"{where}: response {i} is not text (a JSON {type(text).__name__}); "
                                f"write it as a string, \"\" for an empty response")  # fmt: skip
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
    """The labels database at `path` (created if absent, brought up to date if older). labels_per_comparison: how
    many labelers answer each comparison; None keeps the value stored in the file (1 for a new file).

    Methods that act for a labeler take (labeler, session): the session a page opened, or None for code that
    labels without a page.
    """

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
        with self._write() as db:
            self._migrate(db)
        if labels_per_comparison is not None:
            if isinstance(labels_per_comparison, bool) or not isinstance(labels_per_comparison, int) \
                    or labels_per_comparison < 1:  # fmt: skip
                raise LabelingError(f"labels per comparison must be an integer >= 1, got {labels_per_comparison!r}")
            with self._write() as db:
                db.execute("INSERT OR REPLACE INTO settings VALUES ('labels_per_comparison', ?)",
                           (str(labels_per_comparison),))  # fmt: skip

    @staticmethod
    def _migrate(db) -> None:
        """Add the columns a file from an older version lacks. Inside the write lock, so two processes opening the
        same old file cannot both add a column (the second ALTER would fail)."""
        for table, column, kind in MIGRATIONS:
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for statement in filter(str.strip, INDEXES.split(";")):
            db.execute(statement)

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

    # ------------------------------------------------------------------------------------------ sessions

    def open_session(self, labeler: str) -> str:
        """A new session for `labeler` (one per page load); its id is a secret the page sends with every call."""
        labeler = check_labeler(labeler)
        session = secrets.token_urlsafe(18)
        with self._write() as db:
            db.execute("INSERT INTO sessions (id, labeler, created_at) VALUES (?, ?, ?)",
                       (session, labeler, time.time()))  # fmt: skip
        return session

    def session_labeler(self, session) -> str:
        """The labeler who opened `session`; UnknownSession if this file never issued it."""
        session = check_session(session)
        with self._connect() as db:
            row = db.execute("SELECT labeler FROM sessions WHERE id = ?", (session,)).fetchone()
        if row is None:
            raise UnknownSession("this page's session is not known to the server (was the labels file replaced?); "
                                 "reload the page")  # fmt: skip
        return row[0]

    # ------------------------------------------------------------------------------------------ leases

    @staticmethod
    def _lease(db, comparison_id: int, labeler: str, session: str | None, now: float) -> None:
        """Lease comparison_id to (labeler, session) for LEASE_SECONDS, dropping the session's other leases: one
        page shows one comparison, so a session holds at most one and can't hoard the queue."""
        db.execute("DELETE FROM assignments WHERE labeler = ? AND session IS ? AND comparison_id != ?",
                   (labeler, session, comparison_id))  # fmt: skip
        db.execute("INSERT OR REPLACE INTO assignments (comparison_id, labeler, expires_at, session) "
                   "VALUES (?, ?, ?, ?)", (comparison_id, labeler, now + LEASE_SECONDS, session))  # fmt: skip

    def _params(self, labeler: str, session: str | None, now: float) -> dict:
        return {"labeler": labeler, "session": session, "now": now, "n": self.labels_per_comparison}

    def next_for(self, labeler: str, session: str | None = None) -> dict | None:
        """The comparison (labeler, session) should answer next, leased to them; None when nothing is open to them.

        Their own live lease comes first (a reloaded page shows the same comparison); otherwise the oldest open
        comparison. Everyone works from the oldest up, so comparisons others started get finished first, and the
        scan stops at the first open row instead of counting labels for the whole queue.
        """
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        now = time.time()
        params = self._params(labeler, session, now)
        with self._write() as db:
            db.execute("DELETE FROM assignments WHERE expires_at < ?", (now,))
            row = db.execute(f"""SELECT c.id FROM assignments mine JOIN comparisons c ON c.id = mine.comparison_id
                                 WHERE mine.labeler = :labeler AND mine.session IS :session AND {OPEN}
                                 ORDER BY c.id LIMIT 1""", params).fetchone()  # fmt: skip
            if row is None:
                row = db.execute(f"SELECT c.id FROM comparisons c WHERE {OPEN} ORDER BY c.id LIMIT 1",
                                 params).fetchone()  # fmt: skip
            if row is None:
                db.execute("DELETE FROM assignments WHERE labeler = ? AND session IS ?", (labeler, session))
                return None
            self._lease(db, row[0], labeler, session, now)
            return self._comparison(db, row[0])

    def renew(self, labeler: str, session: str | None, comparison_id) -> bool:
        """Extend the lease on comparison_id, or take it again if it lapsed and is still open to this labeler (a
        page hidden for a while comes back to the same item). False when it is no longer theirs to answer."""
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        comparison_id = check_id(comparison_id)
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM comparisons WHERE id = ?", (comparison_id,)).fetchone() is None:
                raise UnknownComparison(f"comparison {comparison_id} does not exist; reload the page")
            params = {**self._params(labeler, session, now), "id": comparison_id}
            if db.execute(f"SELECT 1 FROM comparisons c WHERE c.id = :id AND {OPEN}", params).fetchone() is None:
                return False
            self._lease(db, comparison_id, labeler, session, now)
            return True

    def release(self, labeler: str, session: str | None = None) -> int:
        """Drop the leases of (labeler, session): their page was hidden or closed. Returns how many."""
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        with self._write() as db:
            return db.execute("DELETE FROM assignments WHERE labeler = ? AND session IS ?", (labeler, session)).rowcount

    # ------------------------------------------------------------------------------------------ labels

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

    def label(self, comparison_id, labeler: str, choice, session: str | None = None) -> int:
        """Store one answer in one transaction; returns the label's id.

        choice: the index of the best response, "tie" or "skip". Raises UnknownComparison for an id not in the
        store, StaleComparison when this labeler already answered it or it already holds enough answers (a skip is
        always accepted once: it only takes the comparison out of this labeler's queue), LabelingError otherwise.
        """
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        comparison_id = check_id(comparison_id)
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
                raise StaleComparison(f"{labeler} already labelled comparison {comparison_id}; "
                                      "undo it first to change it")  # fmt: skip
            done = db.execute("SELECT COUNT(*) FROM labels WHERE comparison_id = ? AND kind != 'skip'",
                              (comparison_id,)).fetchone()[0]  # fmt: skip
            if kind != "skip" and done >= n:
                raise StaleComparison(f"comparison {comparison_id} already has its {n} label(s); load the next one")
            cursor = db.execute("INSERT INTO labels (comparison_id, labeler, kind, best, created_at, session) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (comparison_id, labeler, kind, best, time.time(), session))  # fmt: skip
            db.execute("DELETE FROM assignments WHERE comparison_id = ? AND labeler = ?", (comparison_id, labeler))
            return cursor.lastrowid

    def undo(self, labeler: str, session: str | None = None) -> dict | None:
        """Delete the latest label given by (labeler, session), never another session's, and lease that comparison
        to them again; returns it (None if they have no label). Repeated calls walk further back."""
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        with self._write() as db:
            row = db.execute("SELECT id, comparison_id FROM labels WHERE labeler = ? AND session IS ? "
                             "ORDER BY id DESC LIMIT 1", (labeler, session)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
            self._lease(db, row[1], labeler, session, time.time())
            return self._comparison(db, row[1])

    # ------------------------------------------------------------------------------------------ reads

    @staticmethod
    def _comparison(db, comparison_id: int) -> dict:
        prompt, responses = db.execute("SELECT prompt, responses FROM comparisons WHERE id = ?",
                                       (comparison_id,)).fetchone()  # fmt: skip
        return {"id": comparison_id, "prompt": prompt, "responses": json.loads(responses)}

    def comparisons(self) -> list[dict]:
        """Every queued comparison, oldest first: id, prompt, responses and metadata (the queued line's other
        fields, which the page is never sent: blind evaluations keep which policy wrote which response there)."""
        with self._connect() as db:
            rows = db.execute("SELECT id, prompt, responses, metadata FROM comparisons ORDER BY id").fetchall()
        return [{"id": i, "prompt": p, "responses": json.loads(r), "metadata": json.loads(m)} for i, p, r, m in rows]

    def labels(self) -> list[dict]:
        """Every stored label, oldest first, as dicts (id, comparison_id, labeler, kind, best, session)."""
        columns = ("id", "comparison_id", "labeler", "kind", "best", "session")
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(columns)} FROM labels ORDER BY id").fetchall()
        return [dict(zip(columns, r)) for r in rows]

    def stats(self, labeler: str | None = None, session: str | None = None) -> dict:
        """Progress and agreement.

        comparisons: queued in total; done: those with labels_per_comparison answers; queued: the rest; labels:
        answers (picks and ties), skips apart. agreement: over every two labelers who answered the same comparison,
        the share who gave the same answer (a tie agrees only with a tie); None before any such pair
        (agreement_pairs = 0). With `labeler`: mine (their answers; skips are not answers), my_skips, left_for_me
        (comparisons open to them now) and held_by_others (ones they could answer that others' pages hold: the
        page shows "waiting" rather than "done" while there are any).
        """
        n = self.labels_per_comparison
        labeler = None if labeler is None else check_labeler(labeler)
        with self._read() as db:
            total = db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
            answers = db.execute("SELECT comparison_id, kind, best FROM labels WHERE kind != 'skip' "
                                 "ORDER BY comparison_id").fetchall()  # fmt: skip
            skips = db.execute("SELECT COUNT(*) FROM labels WHERE kind = 'skip'").fetchone()[0]
            if labeler is not None:
                mine, my_skips = db.execute("SELECT COALESCE(SUM(kind != 'skip'), 0), COALESCE(SUM(kind = 'skip'), 0) "
                                            "FROM labels WHERE labeler = ?", (labeler,)).fetchone()  # fmt: skip
                # one scan: every comparison this labeler could still answer, and how many of those are open now
                params = self._params(labeler, session, time.time())
                candidates, left = db.execute(f"SELECT COUNT(*), COALESCE(SUM({OPEN}), 0) FROM comparisons c "
                                              f"WHERE {CANDIDATE}", params).fetchone()  # fmt: skip
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
            out.update(mine=mine, my_skips=my_skips, left_for_me=left, held_by_others=candidates - left)
        return out

    def export(self, out: str | Path) -> int:
        """Write every answer (picks and ties; skips are not labels) as a comparisons JSONL, one line per label,
        in the format `wprlhf.data.load_comparisons` reads. A tie has best 0 and tie true (best is arbitrary
        there). Empty responses are written as they are (""). Atomic: written beside `out`, then moved into
        place. Returns the number of lines."""
        with self._connect() as db:
            rows = db.execute("SELECT c.prompt, c.responses, c.metadata, l.labeler, l.kind, l.best FROM labels l "
                              "JOIN comparisons c ON c.id = l.comparison_id WHERE l.kind != 'skip' "
                              "ORDER BY l.id").fetchall()  # fmt: skip
        if not rows:  # an empty file would only fail later, in rm train, far from its cause
            raise LabelingError(f"{self.path} holds no labels yet (skips are not labels); label some on the page "
                                "(`wprlhf label serve`) before exporting")  # fmt: skip
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
