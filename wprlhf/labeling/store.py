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

A page answer is taken only for the comparison leased to that page, and only once it has been on screen for
`min_read_seconds` (MIN_READ_SECONDS, 2 s): a key held down cannot label items nobody read. A labeler's pages
together hold at most MAX_LEASES_PER_LABELER leases and MAX_SESSIONS_PER_LABELER live sessions, and a session with
no request but heartbeats for SESSION_IDLE_SECONDS expires. Names are compared in one form (NFKC, case-folded).

People get their own invite links (`invite`, `revoke`): the link's secret names them, so their undo follows them
from page to page, and a lead's link opens the lead's view (`lead_report`, `adjudicate`). Label and adjudication
ids are AUTOINCREMENT: an undone label's id is never given again, so an export's ids always mean one answer.
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
import unicodedata
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from .agreement import agreement_report, fleiss_kappa

MAX_RESPONSES = 4  # the page has keys 1-4
MAX_NAME = 64
MAX_ID = 2**63 - 1  # SQLite's largest integer: a bigger id raises OverflowError inside sqlite3 instead of not matching
LEASE_SECONDS = 60  # a page renews its lease every 20 s while visible; a closed or hidden page frees it within this
SESSION_CHARS = frozenset(string.ascii_letters + string.digits + "-_")  # what secrets.token_urlsafe makes
MIN_READ_SECONDS = 2.0  # an answer is taken once its comparison has been on that page's screen this long
MAX_LEASES_PER_LABELER = 3  # a person's tabs and devices together; a 4th lease drops their oldest
MAX_SESSIONS_PER_LABELER = 20  # live sessions per person; opening a 21st expires their least recently used
SESSION_IDLE_SECONDS = 30 * 60  # no next/label/undo for this long (heartbeats don't count): the session expires
# ZWNJ and ZWJ are part of how Persian, Hindi and other scripts spell names; every other invisible format
# character (bidi overrides among them) could make two names that look alike, and is refused.
NAME_JOINERS = frozenset("\u200c\u200d")
ROLES = ("labeler", "lead")

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,          -- JSON list of 2..4 strings (an empty string is a legal response)
    metadata TEXT NOT NULL,           -- JSON object: the input line's other fields
    content_key TEXT NOT NULL UNIQUE, -- hash of prompt + responses: adding a file twice queues nothing twice
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels ({labels});
CREATE TABLE IF NOT EXISTS assignments (  -- leases: comparison_id is on `session`'s screen until expires_at
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL,
    expires_at REAL NOT NULL,
    session TEXT,
    shown_at REAL,                    -- when this session's lease began: the answer's reading time counts from it
    PRIMARY KEY (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, labeler TEXT NOT NULL, created_at REAL NOT NULL,
    last_seen REAL,                   -- the last next/label/undo; NULL in older files (created_at counts)
    invited INTEGER NOT NULL DEFAULT 0  -- opened with an invite link: the name is the person's, not typed
);
CREATE TABLE IF NOT EXISTS invites (
    name TEXT PRIMARY KEY,            -- the canonical name (check_labeler): one link per person
    secret_hash TEXT NOT NULL UNIQUE, -- sha256 of the link's secret: a copy of this file opens no page
    role TEXT NOT NULL CHECK (role IN ('labeler', 'lead')),
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS adjudications (  -- the lead's answer to a disagreement, kept beside the labels
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    comparison_id INTEGER NOT NULL UNIQUE REFERENCES comparisons(id),
    lead TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('best', 'tie')),
    best INTEGER,
    label_ids TEXT NOT NULL,          -- JSON list: the labels it settles
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# AUTOINCREMENT: an undone label's id is never given to a later one (plain INTEGER PRIMARY KEY reuses the largest).
LABELS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('best', 'tie', 'skip')),
    best INTEGER,                     -- the index picked when kind = 'best', else NULL
    created_at REAL NOT NULL,
    session TEXT,                     -- the page session that gave it; NULL from scripts and older files
    shown_at REAL,                    -- when that page was shown the comparison; NULL from scripts and older files
    UNIQUE (comparison_id, labeler)
"""
SCHEMA = SCHEMA.replace("{labels}", LABELS)
LABEL_COLUMNS = "id, comparison_id, labeler, kind, best, created_at, session, shown_at"

# Columns added since the first release: a file written before them gets them when it is opened.
MIGRATIONS = [("labels", "session", "TEXT"), ("labels", "shown_at", "REAL"), ("assignments", "session", "TEXT"),
              ("assignments", "shown_at", "REAL"), ("sessions", "last_seen", "REAL"),
              ("sessions", "invited", "INTEGER NOT NULL DEFAULT 0")]  # fmt: skip
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
    """The comparison may not take this label any more: this labeler answered it, it has enough labels, or it is
    not (or no longer) on the screen of the page that sent the answer."""

    status = 409


class TooSoon(LabelingError):
    """An answer for a comparison that has not been on screen for `min_read_seconds`."""

    status = 425


class NameTaken(LabelingError):
    """A typed name that belongs to an invite: only that invite's link may label under it."""

    status = 403


def check_labeler(name) -> str:
    """A labeler's name in the one form names are compared in: NFKC-normalised and case-folded (so "Ann", "ANN"
    and the full-width "Ａｎｎ" are one labeler), runs of spaces made one; 1..MAX_NAME characters, none of them a
    control or invisible character except ZWNJ and ZWJ (NAME_JOINERS), which some scripts spell names with."""
    if not isinstance(name, str) or not name.strip():
        raise LabelingError("labeler name is missing; enter your name once on the page")
    # NFKC twice around casefold: folding can leave a string that is not NFKC-normal (Unicode's identifier caseless
    # match, UAX #31)
    name = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", " ".join(name.split())).casefold())
    invisible = [c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp")
                 or (unicodedata.category(c) == "Cf" and c not in NAME_JOINERS)]  # fmt: skip
    if len(name) > MAX_NAME or invisible:
        raise LabelingError(f"labeler name must be at most {MAX_NAME} printable characters (no control or "
                            "invisible characters but ZWNJ and ZWJ)")  # fmt: skip
    return name


def content_key(prompt: str, responses: list[str]) -> str:
    """The identity of a comparison: its prompt and the set of its responses. Order does not count, so a blind pair
    queued again in the other order (eval --blind-db shuffles each time) is the same comparison."""
    return hashlib.sha256(json.dumps([prompt, sorted(responses)]).encode()).hexdigest()


def secret_hash(secret: str) -> str:
    """The stored form of an invite's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


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


def _iso(seconds: float | None) -> str | None:
    """A time as ISO 8601 in UTC, to the millisecond: '2026-12-07T23:38:52.123Z'."""
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


def _answer(kind: str, best: int | None) -> str | int:
    """A stored answer as the API spells a choice: the index picked, or 'tie' / 'skip'."""
    return best if kind == "best" else kind


class Store:
    """The labels database at `path` (created if absent, brought up to date if older). labels_per_comparison: how
    many labelers answer each comparison; None keeps the value stored in the file (1 for a new file).
    min_read_seconds: how long a comparison must have been on a page's screen before that page's answer is taken.

    Methods that act for a labeler take (labeler, session): the session a page opened, or None for code that
    labels without a page (no lease or reading time is asked of it).
    """

    def __init__(self, path: str | Path, labels_per_comparison: int | None = None,
                 min_read_seconds: float = MIN_READ_SECONDS):  # fmt: skip
        self.path = Path(path)
        if self.path.is_dir():
            raise LabelingError(f"--db {self.path} is a directory; name a file such as labels.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_file()
        self.min_read_seconds = min_read_seconds
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

    def _check_file(self) -> None:
        """LabelingError, before anything is written, for a file that is not ours to open: not a regular file, not
        SQLite, another program's SQLite database (its tables would gain ours, and it would switch to WAL), or one
        this process may not write (every page load writes a session)."""
        if self.path.exists() and not self.path.is_file():
            raise LabelingError(f"--db {self.path} is not a regular file; name a file such as labels.db")
        if not self.path.exists() or self.path.stat().st_size == 0:
            if not os.access(self.path.parent, os.W_OK):
                raise LabelingError(f"--db {self.path}: its folder is not writable; choose a folder you can write")
            return
        try:
            with sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True) as db:
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as err:
            raise LabelingError(f"--db {self.path} is not a labels database ({err}); name another file, or restore "
                                "it from a backup") from None  # fmt: skip
        if tables and "comparisons" not in tables:
            raise LabelingError(f"--db {self.path} is another program's SQLite database (tables: "
                                f"{', '.join(sorted(tables))}); it was left as it is. Name another file")  # fmt: skip
        if not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)):
            raise LabelingError(f"--db {self.path} is read-only (the file or its folder, where SQLite keeps its "
                                "-wal file); make both writable, or copy the file somewhere you can write")  # fmt: skip

    @staticmethod
    def _migrate(db) -> None:
        """Bring a file from an older version up to date: add the columns it lacks, rebuild `labels` with
        AUTOINCREMENT (ids kept), and key comparisons by their response set. Inside the write lock, so two processes
        opening the same old file cannot both migrate it."""
        for table, column, kind in MIGRATIONS:
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        labels_sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'labels'").fetchone()[0]
        if "AUTOINCREMENT" not in labels_sql.upper():  # SQLite cannot add it to a table: copy into a new one
            db.execute(f"CREATE TABLE labels_autoincrement ({LABELS})")
            db.execute(f"INSERT INTO labels_autoincrement ({LABEL_COLUMNS}) SELECT {LABEL_COLUMNS} FROM labels")
            db.execute("DROP TABLE labels")
            db.execute("ALTER TABLE labels_autoincrement RENAME TO labels")
        if db.execute("SELECT 1 FROM settings WHERE key = 'content_key'").fetchone() is None:
            rows = db.execute("SELECT id, prompt, responses FROM comparisons ORDER BY id").fetchall()
            db.execute("UPDATE comparisons SET content_key = 'migrating:' || id")  # frees every key for the new ones
            seen = set()
            for cid, prompt, responses in rows:
                key = content_key(prompt, json.loads(responses))
                # an older file may hold one pair in both orders (the fault this key fixes): both stay, apart
                db.execute("UPDATE comparisons SET content_key = ? WHERE id = ?",
                           (key if key not in seen else f"{key}:{cid}", cid))  # fmt: skip
                seen.add(key)
            db.execute("INSERT INTO settings VALUES ('content_key', 'response set')")
        if db.execute("SELECT 1 FROM settings WHERE key = 'names'").fetchone() is None:
            Store._migrate_names(db)
        for statement in filter(str.strip, INDEXES.split(";")):
            db.execute(statement)

    @staticmethod
    def _migrate_names(db) -> None:
        """Spell the names of an older file as `check_labeler` does now, so "Ann" there is the "ann" who opens the
        page today. A label that would clash (one person labelled a comparison under two spellings) keeps its old
        spelling: both labels stay. Leases are a minute long and simply dropped."""
        names = {name for (name,) in db.execute("SELECT labeler FROM labels UNION SELECT labeler FROM sessions")}
        for name in names:
            try:
                canonical = check_labeler(name)
            except LabelingError:
                continue  # a name today's rule refuses: its labels keep it, and nobody can open a page under it
            if canonical != name:
                db.execute("UPDATE OR IGNORE labels SET labeler = ? WHERE labeler = ?", (canonical, name))
                db.execute("UPDATE sessions SET labeler = ? WHERE labeler = ?", (canonical, name))
        db.execute("DELETE FROM assignments")
        db.execute("INSERT INTO settings VALUES ('names', 'NFKC, case-folded')")

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

    # ------------------------------------------------------------------------------------------ invites

    def invite(self, name: str, role: str = "labeler") -> str:
        """A new secret for `name`'s link (a labeler's, or with role='lead' the lead's view); returns it. Inviting
        a name again replaces its secret, so the old link stops working. Only the secret's hash is stored."""
        name = check_labeler(name)
        if role not in ROLES:
            raise LabelingError(f"role {role!r} must be one of {ROLES}")
        secret = secrets.token_urlsafe(24)
        with self._write() as db:
            held = db.execute("SELECT role FROM invites WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
            if held is not None and held[0] != role:  # one name, one role: a lead's link replacing a labeler's
                raise LabelingError(f"{name!r} holds a {held[0]} link; a {role} link would silently replace it. "
                                    f"Invite the {role} under another name, or revoke the {held[0]} link first")
            db.execute("INSERT OR REPLACE INTO invites (name, secret_hash, role, created_at) VALUES (?, ?, ?, ?)",
                       (name, secret_hash(secret), role, time.time()))  # fmt: skip
        return secret

    def revoke(self, name: str) -> bool:
        """Stop `name`'s link: its requests are refused from now on, its sessions expire and its leases go back to
        the queue; its labels stay. False when it had no live link."""
        name = check_labeler(name)
        with self._write() as db:
            found = db.execute("UPDATE invites SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                               (time.time(), name)).rowcount  # fmt: skip
            db.execute("UPDATE sessions SET last_seen = 0 WHERE labeler = ? AND invited = 1", (name,))
            db.execute("DELETE FROM assignments WHERE labeler = ?", (name,))
        return bool(found)

    def identity(self, secret: str) -> tuple[str, str] | None:
        """(role, name) of a live invite's secret, else None."""
        with self._connect() as db:
            row = db.execute("SELECT role, name FROM invites WHERE secret_hash = ? AND revoked_at IS NULL",
                             (secret_hash(secret),)).fetchone()  # fmt: skip
        return None if row is None else (row[0], row[1])

    def has_invites(self) -> bool:
        """Whether any live invite exists: then every request needs a credential, even on loopback."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM invites WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None

    def invites(self) -> list[dict]:
        """Every invite, live or revoked: name, role, created_at, revoked_at (never the secret)."""
        with self._connect() as db:
            rows = db.execute("SELECT name, role, created_at, revoked_at FROM invites ORDER BY name").fetchall()
        return [dict(zip(("name", "role", "created_at", "revoked_at"), row)) for row in rows]

    # ------------------------------------------------------------------------------------------ sessions

    def open_session(self, labeler: str, invited: bool = False) -> str:
        """A new session for `labeler` (one per page; the page keeps it across reloads); its id is a secret the
        page sends with every call. invited: opened through `labeler`'s invite link. A typed name that belongs to
        an invite, live or revoked, is refused (NameTaken). Past MAX_SESSIONS_PER_LABELER live sessions the least recently used
        expires."""
        labeler = check_labeler(labeler)
        session = secrets.token_urlsafe(18)
        now = time.time()
        with self._write() as db:
            # A revoked name stays reserved: typing it would add labels to the revoked person's record.
            if not invited and db.execute("SELECT 1 FROM invites WHERE name = ?", (labeler,)).fetchone():
                raise NameTaken(f"{labeler!r} labels (or labelled) through their own invite link; open that link, "
                                "or pick another name")  # fmt: skip
            db.execute("INSERT INTO sessions (id, labeler, created_at, last_seen, invited) VALUES (?, ?, ?, ?, ?)",
                       (session, labeler, now, now, int(invited)))  # fmt: skip
            old = db.execute("SELECT id FROM sessions WHERE labeler = ? AND COALESCE(last_seen, created_at) >= ? "
                             "ORDER BY COALESCE(last_seen, created_at) DESC, rowid DESC LIMIT -1 OFFSET ?",
                             (labeler, now - SESSION_IDLE_SECONDS, MAX_SESSIONS_PER_LABELER)).fetchall()  # fmt: skip
            for (expired,) in old:
                db.execute("UPDATE sessions SET last_seen = 0 WHERE id = ?", (expired,))
                db.execute("DELETE FROM assignments WHERE session = ?", (expired,))
        return session

    def session_labeler(self, session) -> str:
        """The labeler who opened `session`; UnknownSession if this file never issued it or it expired."""
        session = check_session(session)
        with self._connect() as db:
            row = db.execute("SELECT labeler, COALESCE(last_seen, created_at) FROM sessions WHERE id = ?",
                             (session,)).fetchone()  # fmt: skip
        if row is None:
            raise UnknownSession("this page's session is not known to the server (was the labels file replaced?); "
                                 "reload the page")  # fmt: skip
        if time.time() - row[1] > SESSION_IDLE_SECONDS:
            raise UnknownSession(f"this page's session expired ({SESSION_IDLE_SECONDS // 60} minutes without "
                                 "labeling, or a newer page of yours replaced it); reload the page")  # fmt: skip
        return row[0]

    @staticmethod
    def _seen(db, session: str | None, now: float) -> None:
        """Note that `session` acted (next, label, undo): a heartbeat alone does not keep a session alive."""
        if session is not None:
            db.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (now, session))

    # ------------------------------------------------------------------------------------------ leases

    @staticmethod
    def _lease(db, comparison_id: int, labeler: str, session: str | None, now: float) -> None:
        """Lease comparison_id to (labeler, session) for LEASE_SECONDS, dropping the session's other leases (one
        page shows one comparison) and the labeler's oldest past MAX_LEASES_PER_LABELER. shown_at stays while the
        same session renews: the reading time counts from when the page first showed it."""
        db.execute("DELETE FROM assignments WHERE labeler = ? AND session IS ? AND comparison_id != ?",
                   (labeler, session, comparison_id))  # fmt: skip
        db.execute("""INSERT INTO assignments (comparison_id, labeler, expires_at, session, shown_at)
                      VALUES (?, ?, ?, ?, ?) ON CONFLICT (comparison_id, labeler) DO UPDATE SET
                      shown_at = CASE WHEN session IS excluded.session THEN shown_at ELSE excluded.shown_at END,
                      expires_at = excluded.expires_at, session = excluded.session""",
                   (comparison_id, labeler, now + LEASE_SECONDS, session, now))  # fmt: skip
        db.execute("DELETE FROM assignments WHERE labeler = ? AND rowid NOT IN (SELECT rowid FROM assignments "
                   "WHERE labeler = ? ORDER BY expires_at DESC, rowid DESC LIMIT ?)",
                   (labeler, labeler, MAX_LEASES_PER_LABELER))  # fmt: skip

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
            self._seen(db, session, now)
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
        already_queued); a comparison with the same prompt and the same responses, in any order, is queued once."""
        checked = [check_sample({"prompt": p, "responses": r, **m}, f"sample {i + 1}")
                   for i, (p, r, m) in enumerate(samples)]  # fmt: skip
        added = 0
        now = time.time()
        with self._write() as db:
            for prompt, responses, metadata in checked:
                cursor = db.execute("INSERT OR IGNORE INTO comparisons (prompt, responses, metadata, content_key, "
                                    "added_at) VALUES (?, ?, ?, ?, ?)", (prompt, json.dumps(responses),
                                    json.dumps(metadata), content_key(prompt, responses), now))  # fmt: skip
                added += cursor.rowcount
        return added, len(checked) - added

    @staticmethod
    def _choice(db, comparison_id: int, choice) -> tuple[str, int | None]:
        """(kind, best) of a choice for comparison_id: the index of the best response, "tie" or "skip"."""
        row = db.execute("SELECT responses FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
        if row is None:
            raise UnknownComparison(f"comparison {comparison_id} does not exist; reload the page")
        k = len(json.loads(row[0]))
        if choice in ("tie", "skip"):
            return choice, None
        if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < k:
            return "best", choice
        raise LabelingError(f"choice {choice!r:.40} must be a response index 0..{k - 1}, 'tie' or 'skip'")

    def _shown_at(self, db, comparison_id: int, labeler: str, session: str, now: float) -> float:
        """When the page of `session` was shown comparison_id; refuses an answer from a page that does not hold
        its lease (StaleComparison) or has shown it for less than min_read_seconds (TooSoon)."""
        lease = db.execute("SELECT shown_at, expires_at FROM assignments WHERE comparison_id = ? AND labeler = ? "
                           "AND session = ?", (comparison_id, labeler, session)).fetchone()  # fmt: skip
        if lease is None or lease[1] < now:
            raise StaleComparison(f"comparison {comparison_id} is not on this page's screen (another page holds it, "
                                  "or it went back to the queue); load the next one")  # fmt: skip
        shown_at = lease[0] if lease[0] is not None else now
        if now - shown_at < self.min_read_seconds:
            raise TooSoon(f"comparison {comparison_id} has been on screen for {now - shown_at:.1f} s; answers are "
                          f"taken after {self.min_read_seconds:g} s, so read the stories first")  # fmt: skip
        return shown_at

    def label(self, comparison_id, labeler: str, choice, session: str | None = None) -> int:
        """Store one answer in one transaction; returns the label's id (never one an undone label had).

        choice: the index of the best response, "tie" or "skip". Raises UnknownComparison for an id not in the
        store, StaleComparison when this labeler already answered it, it already holds enough answers (a skip is
        always accepted once: it only takes the comparison out of this labeler's queue), or, for a page session,
        the page does not hold its lease; TooSoon when that page has shown it for less than min_read_seconds;
        LabelingError otherwise.
        """
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        comparison_id = check_id(comparison_id)
        n = self.labels_per_comparison
        now = time.time()
        with self._write() as db:
            kind, best = self._choice(db, comparison_id, choice)
            if db.execute("SELECT 1 FROM labels WHERE comparison_id = ? AND labeler = ?",
                          (comparison_id, labeler)).fetchone():  # fmt: skip
                raise StaleComparison(f"{labeler} already labelled comparison {comparison_id}; "
                                      "undo it first to change it")  # fmt: skip
            done = db.execute("SELECT COUNT(*) FROM labels WHERE comparison_id = ? AND kind != 'skip'",
                              (comparison_id,)).fetchone()[0]  # fmt: skip
            if kind != "skip" and done >= n:
                raise StaleComparison(f"comparison {comparison_id} already has its {n} label(s); load the next one")
            shown_at = None if session is None else self._shown_at(db, comparison_id, labeler, session, now)
            self._seen(db, session, now)
            cursor = db.execute("INSERT INTO labels (comparison_id, labeler, kind, best, created_at, session, "
                                "shown_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (comparison_id, labeler, kind, best, now, session, shown_at))  # fmt: skip
            db.execute("DELETE FROM assignments WHERE comparison_id = ? AND labeler = ?", (comparison_id, labeler))
            return cursor.lastrowid

    def undo(self, labeler: str, session: str | None = None) -> dict | None:
        """Delete the latest label given by (labeler, session) and lease that comparison to them again; returns it
        (None if they have no label). A session opened through an invite undoes the person's latest label from any
        of their pages (a reload, another device); any other session only its own, never another page's under the
        same typed name. Repeated calls walk further back."""
        labeler = check_labeler(labeler)
        session = None if session is None else check_session(session)
        now = time.time()
        with self._write() as db:
            invited = session is not None and db.execute("SELECT invited FROM sessions WHERE id = ?",
                                                         (session,)).fetchone() == (1,)  # fmt: skip
            mine = "labeler = ?" if invited else "labeler = ? AND session IS ?"
            row = db.execute(f"SELECT id, comparison_id FROM labels WHERE {mine} ORDER BY id DESC LIMIT 1",
                             (labeler,) if invited else (labeler, session)).fetchone()  # fmt: skip
            self._seen(db, session, now)
            if row is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
            # A lead's decision between answers stands only while those answers do: once one is taken back, the
            # comparison is open again (and back in the review queue if the answers still disagree).
            db.execute("DELETE FROM adjudications WHERE comparison_id = ?", (row[1],))
            self._lease(db, row[1], labeler, session, now)
            return self._comparison(db, row[1])

    def adjudicate(self, comparison_id, lead: str, choice) -> int:
        """The lead's answer to a comparison its labelers disagree on, stored beside their labels (which stay);
        returns its id. Deciding again replaces the lead's earlier answer. choice: a response index or "tie"."""
        lead = check_labeler(lead)
        comparison_id = check_id(comparison_id)
        if choice == "skip":
            raise LabelingError("an adjudication is a response index or 'tie'; leave the comparison to skip it")
        with self._write() as db:
            kind, best = self._choice(db, comparison_id, choice)
            given = db.execute("SELECT id, kind, best FROM labels WHERE comparison_id = ? AND kind != 'skip' "
                               "ORDER BY id", (comparison_id,)).fetchall()  # fmt: skip
            if len({(k, b) for _, k, b in given}) < 2:
                raise StaleComparison(f"comparison {comparison_id}'s labelers do not disagree (an undo may have "
                                      "changed it); reload the review queue")  # fmt: skip
            cursor = db.execute("""INSERT INTO adjudications (comparison_id, lead, kind, best, label_ids, created_at)
                                   VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (comparison_id) DO UPDATE SET
                                   lead = excluded.lead, kind = excluded.kind, best = excluded.best,
                                   label_ids = excluded.label_ids, created_at = excluded.created_at RETURNING id""",
                                (comparison_id, lead, kind, best, json.dumps([i for i, _, _ in given]),
                                 time.time()))  # fmt: skip
            return cursor.fetchone()[0]

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
        """Every stored label, oldest first, as dicts (id, comparison_id, labeler, kind, best, session,
        created_at, shown_at)."""
        columns = ("id", "comparison_id", "labeler", "kind", "best", "session", "created_at", "shown_at")
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(columns)} FROM labels ORDER BY id").fetchall()
        return [dict(zip(columns, r)) for r in rows]

    def adjudications(self) -> list[dict]:
        """Every adjudication: id, comparison_id, lead, kind, best, label_ids (the labels it settles), created_at."""
        columns = ("id", "comparison_id", "lead", "kind", "best", "label_ids", "created_at")
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(columns)} FROM adjudications ORDER BY id").fetchall()
        return [{**dict(zip(columns, r)), "label_ids": json.loads(r[5])} for r in rows]

    def stats(self, labeler: str | None = None, session: str | None = None) -> dict:
        """Progress and agreement.

        comparisons: queued in total; done: those with labels_per_comparison answers; queued: the rest; labels:
        answers (picks and ties), skips apart. agreement: over every two labelers who answered the same comparison,
        the share who gave the same answer (a tie agrees only with a tie); None before any such pair
        (agreement_pairs = 0). With `labeler`: mine (their answers; skips are not answers), my_skips, left_for_me
        (comparisons open to them now) and held_by_others (ones they could answer that others' pages hold: the
        page shows "waiting" rather than "done" while there are any). The web app shows labelers no agreement.
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
        by_item = [[_answer(kind, best) for _, kind, best in group]
                   for _, group in itertools.groupby(answers, key=lambda r: r[0])]  # fmt: skip
        done = sum(len(given) >= n for given in by_item)
        overall = fleiss_kappa(by_item)  # its raw agreement: the share of equal answers over every two of an item
        out = {"comparisons": total, "done": done, "queued": total - done, "labels": len(answers), "skips": skips,
               "labels_per_comparison": n, "agreement": overall["raw"], "agreement_pairs": overall["pairs"]}
        if labeler is not None:
            out.update(mine=mine, my_skips=my_skips, left_for_me=left, held_by_others=candidates - left)
        return out

    def lead_report(self) -> dict:
        """What the lead's view shows: `stats()`; per labeler their answers, skips, sessions, median seconds on
        screen per answer and answers per hour of work; agreement per labeler pair and overall (`agreement_report`);
        the comparisons leased now, skipped, and stuck (not done, and too few labelers left who have not answered
        or skipped it); and the review queue: every comparison whose answers disagree, with its adjudication."""
        now = time.time()
        with self._read() as db:
            labels = db.execute("SELECT id, comparison_id, labeler, kind, best, created_at, shown_at, session "
                                "FROM labels ORDER BY id").fetchall()  # fmt: skip
            leased = db.execute("SELECT comparison_id, labeler, expires_at FROM assignments WHERE expires_at >= ? "
                                "ORDER BY comparison_id", (now,)).fetchall()  # fmt: skip
            people = {name for (name,) in db.execute("SELECT labeler FROM sessions UNION SELECT name FROM invites "
                                                     "WHERE role = 'labeler' AND revoked_at IS NULL")}  # fmt: skip
            settled = {row[1]: row for row in db.execute("SELECT id, comparison_id, lead, kind, best, created_at "
                                                         "FROM adjudications")}  # fmt: skip
            texts = {cid: (prompt, json.loads(responses))
                     for cid, prompt, responses in db.execute("SELECT id, prompt, responses FROM comparisons")}
        people |= {row[2] for row in labels}
        n = self.labels_per_comparison
        by_item: dict[int, dict[str, str | int]] = {}
        touched: dict[int, set] = {}
        for _, cid, name, kind, best, *_ in labels:
            touched.setdefault(cid, set()).add(name)
            if kind != "skip":
                by_item.setdefault(cid, {})[name] = _answer(kind, best)
        review = []
        for cid, answers in sorted(by_item.items()):
            if len(set(answers.values())) > 1:
                adjudication = settled.get(cid)
                review.append({"comparison_id": cid, "prompt": texts[cid][0], "responses": texts[cid][1],
                               "answers": answers,
                               "adjudication": None if adjudication is None else {
                                   "id": adjudication[0], "lead": adjudication[2],
                                   "choice": _answer(adjudication[3], adjudication[4])}})  # fmt: skip
        stuck = [cid for cid in sorted(texts) if len(by_item.get(cid, {})) < n
                 and n - len(by_item.get(cid, {})) > len(people - touched.get(cid, set()))]  # fmt: skip
        skipped = Counter(cid for _, cid, _, kind, *_ in labels if kind == "skip")
        return {"stats": self.stats(), "labelers": _labeler_rows(labels, people),
                "agreement": agreement_report(by_item),
                "leased": [{"comparison_id": c, "labeler": who, "seconds_left": round(t - now)} for c, who, t in leased],
                "skipped": [{"comparison_id": c, "skips": k} for c, k in sorted(skipped.items())],
                "stuck": stuck, "review": review}  # fmt: skip

    def export(self, out: str | Path) -> int:
        """Write every answer (picks and ties; skips are not labels) and every adjudication as a comparisons JSONL,
        one line each, in the format `wprlhf.data.load_comparisons` reads. A tie has best 0 and tie true (best is
        arbitrary there). Each line carries its lineage: comparison_id, label_id, labeler, session, shown_at and
        created_at (ISO 8601, UTC); an adjudication's line has adjudicated true, label_id null, adjudication_id and
        settles (the label ids it decides between). Empty responses are written as they are (""). Atomic: written
        beside `out`, then moved into place. Returns the number of lines."""
        with self._connect() as db:
            rows = db.execute("SELECT c.id, c.prompt, c.responses, c.metadata, l.id, l.labeler, l.kind, l.best, "
                              "l.session, l.shown_at, l.created_at FROM labels l JOIN comparisons c "
                              "ON c.id = l.comparison_id WHERE l.kind != 'skip' ORDER BY l.id").fetchall()  # fmt: skip
            settled = db.execute("SELECT c.id, c.prompt, c.responses, c.metadata, a.id, a.lead, a.kind, a.best, "
                                 "a.label_ids, a.created_at FROM adjudications a JOIN comparisons c "
                                 "ON c.id = a.comparison_id ORDER BY a.id").fetchall()  # fmt: skip
        if not rows:  # an empty file would only fail later, in rm train, far from its cause
            raise LabelingError(f"{self.path} holds no labels yet (skips are not labels); label some on the page "
                                "(`wprlhf label serve`) before exporting")  # fmt: skip
        lines = []
        for cid, prompt, responses, metadata, label_id, labeler, kind, best, session, shown_at, created in rows:
            lines.append(_export_line(cid, prompt, responses, metadata, labeler, kind, best, created,
                                      label_id=label_id, session=session, shown_at=_iso(shown_at)))  # fmt: skip
        for cid, prompt, responses, metadata, adjudication_id, lead, kind, best, label_ids, created in settled:
            lines.append(_export_line(cid, prompt, responses, metadata, lead, kind, best, created, label_id=None,
                                      adjudicated=True, adjudication_id=adjudication_id,
                                      settles=json.loads(label_ids)))  # fmt: skip
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


def _export_line(cid, prompt, responses, metadata, labeler, kind, best, created, **lineage) -> str:
    """One line of `Store.export`: the comparison as load_comparisons reads it, then where the answer came from."""
    prompt_id = json.loads(metadata).get("prompt_id", "")
    return json.dumps({"prompt": prompt, "responses": json.loads(responses), "best": best if kind == "best" else 0,
                       "labeler": labeler, "tie": kind == "tie", "prompt_id": "" if prompt_id is None else str(prompt_id),
                       "comparison_id": cid, **lineage, "created_at": _iso(created)}, ensure_ascii=False)  # fmt: skip


def _labeler_rows(labels: list[tuple], people: set[str]) -> list[dict]:
    """Per labeler: answers, skips, sessions, median seconds on screen per answer (from shown_at, pages only) and
    answers per hour of work (gaps over 10 minutes between labels are breaks, not work)."""
    rows = []
    for name in sorted(people):
        mine = [row for row in labels if row[2] == name]
        answers = sum(row[3] != "skip" for row in mine)
        on_screen = sorted(row[5] - row[6] for row in mine if row[6] is not None)
        times = [row[5] for row in mine]
        worked = sum(min(b - a, 600.0) for a, b in itertools.pairwise(sorted(times)))
        rows.append({"labeler": name, "answers": answers, "skips": len(mine) - answers,
                     "sessions": len({row[7] for row in mine if row[7]}),
                     "median_seconds": on_screen[len(on_screen) // 2] if on_screen else None,
                     "per_hour": round(3600 * (len(mine) - 1) / worked, 1) if worked > 0 else None})  # fmt: skip
    return rows
