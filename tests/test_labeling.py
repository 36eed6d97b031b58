"""Human labeling: the SQLite store (sessions, leases, migration of old files), the `wprlhf label` commands, the
web API's answers to bad and hostile requests (ids out of range, foreign Host and Origin, non-JSON state changes),
token auth, escaping, a load test of 20 concurrent labelers on loopback, and what a labeling team hit (issue 39):
reading time, leases, caps, framing and timeouts, tokens, names, invites, the lead's view, kappa and export
lineage. The browser tests are in test_labeling_browser.py."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
import pytest

from wprlhf.cli import main
from wprlhf.data import load_comparisons
from wprlhf.labeling import app as labeling_app
from wprlhf.labeling import store as store_module
from wprlhf.labeling.agreement import cohen_kappa, fleiss_kappa
from wprlhf.labeling.app import (
    TOKEN_ENV,
    BackgroundServer,
    allowed_hosts,
    check_token,
    create_app,
    host_name,
    is_loopback,
    read_instructions,  # fmt: skip
    read_token,
    resolve_token,
)
from wprlhf.labeling.store import (
    LEASE_SECONDS,
    LabelingError,
    StaleComparison,
    Store,
    UnknownComparison,
    UnknownSession,  # fmt: skip
    check_labeler,
    read_samples,
)

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
TOO_BIG = 2**63  # one past SQLite's largest integer: sqlite3 raised OverflowError (a plain 500) before ids were checked
BAD_IDS = [TOO_BIG, 2**64, -1, 0, 1.5, "1", None, True, [1]]

# The schema of the first release: a file it wrote must still open (test_an_old_database_opens_and_is_migrated).
OLD_SCHEMA = """
CREATE TABLE comparisons (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    metadata TEXT NOT NULL, content_key TEXT NOT NULL UNIQUE, added_at REAL NOT NULL);
CREATE TABLE labels (id INTEGER PRIMARY KEY, comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeler TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('best', 'tie', 'skip')), best INTEGER,
    created_at REAL NOT NULL, UNIQUE (comparison_id, labeler));
CREATE TABLE assignments (comparison_id INTEGER NOT NULL REFERENCES comparisons(id), labeler TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (comparison_id, labeler));
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def samples(n: int, k: int = 2) -> list[tuple[str, list[str], dict]]:
    return [(f"Prompt {i}: a dragon opens a bakery.", [f"Story {i}.{j}" for j in range(k)], {"policy": "tiny"})
            for i in range(n)]  # fmt: skip


class Clock:
    """Stands in for the `time` module inside store.py: leases lapse when a test moves `now`, not after a wait."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(store_module, "time", fake)
    return fake


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "labels.db", min_read_seconds=0)  # reading time has its own tests
    s.add(samples(3))
    return s


@pytest.fixture()
def serve(tmp_path):
    """serve(**create_app kwargs) -> (base url, Store on the same file); the server stops after the test."""
    servers = []

    def start(**kwargs):
        kwargs.setdefault("min_read_seconds", 0)  # reading time has its own tests; these answer at once
        app = create_app(tmp_path / "labels.db", **kwargs)
        server = BackgroundServer(app)
        url = server.__enter__()
        servers.append(server)
        return url, Store(tmp_path / "labels.db")

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def open_session(client: httpx.Client, labeler: str) -> str:
    answer = client.post("/api/session", json={"labeler": labeler})
    assert answer.status_code == 200, answer.text
    return answer.json()["session"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leases(store: Store) -> list[tuple]:
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT comparison_id, labeler, session FROM assignments ORDER BY comparison_id").fetchall()


# ---------------------------------------------------------------------------------------------- store


def test_store_is_wal_and_labels_are_unique_per_labeler(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        schema = db.execute("SELECT sql FROM sqlite_master WHERE name = 'labels'").fetchone()[0]
    assert "UNIQUE (comparison_id, labeler)" in schema
    first = store.next_for("ann")
    store.label(first["id"], "ann", 1)
    with pytest.raises(StaleComparison, match="already labelled"):
        store.label(first["id"], "ann", 0)
    assert [(x["labeler"], x["best"]) for x in store.labels()] == [("ann", 1)]


def test_store_refuses_unknown_ids_bad_choices_and_full_comparisons(store):
    with pytest.raises(UnknownComparison, match="comparison 999 does not exist"):
        store.label(999, "ann", 0)
    with pytest.raises(LabelingError, match=r"must be a response index 0\.\.1, 'tie' or 'skip'"):
        store.label(1, "ann", 2)
    with pytest.raises(LabelingError, match="must be an integer"):
        store.label("1", "ann", 0)
    for bad in (TOO_BIG, 0, -1):  # range-checked before SQLite sees them: an OverflowError would be a 500
        with pytest.raises(LabelingError, match="out of range"):
            store.label(bad, "ann", 0)
        with pytest.raises(LabelingError, match="out of range"):
            store.renew("ann", None, bad)
    with pytest.raises(LabelingError, match="name is missing"):
        store.label(1, "  ", 0)
    store.label(1, "ann", 0)
    with pytest.raises(StaleComparison, match="already has its 1 label"):
        store.label(1, "bob", 1)
    store.label(1, "bob", "skip")  # a skip only takes it out of bob's queue
    assert store.stats()["labels"] == 1 and store.stats()["skips"] == 1


def test_reservations_give_two_labelers_different_comparisons_and_undo_walks_back(store):
    a, b = store.next_for("ann"), store.next_for("bob")
    assert a["id"] != b["id"]
    assert store.next_for("ann") == a  # a reload shows the same one
    store.label(a["id"], "ann", 0)
    c = store.next_for("ann")
    assert c["id"] not in (a["id"], b["id"])
    store.label(c["id"], "ann", "tie")
    assert store.undo("ann") == c
    assert store.undo("ann") == a
    assert store.undo("ann") is None
    assert store.labels() == []


def test_made_up_names_hold_the_queue_for_one_lease_only(tmp_path, clock):
    """Five made-up names take every open comparison; the real labeler is told they are held (not that the queue
    is done) and gets one as soon as the leases lapse, LEASE_SECONDS later, not ten minutes."""
    store = Store(tmp_path / "labels.db")
    store.add(samples(5))
    squatters = [(f"fake-{i}", store.open_session(f"fake-{i}")) for i in range(5)]
    for name, session in squatters:
        for _ in range(3):  # asking again and again still holds one: a session's cap is one lease
            store.next_for(name, session)
    assert len(leases(store)) == 5
    me = store.open_session("real")
    assert store.next_for("real", me) is None
    stats = store.stats("real", me)
    assert (stats["left_for_me"], stats["held_by_others"]) == (0, 5)
    assert LEASE_SECONDS <= 60
    clock.now += LEASE_SECONDS + 1
    assert store.next_for("real", me)["id"] == 1
    assert store.stats("real", me)["held_by_others"] == 0


def test_renew_keeps_a_lease_release_frees_it_and_a_lapsed_one_comes_back_if_still_free(tmp_path, clock):
    store = Store(tmp_path / "labels.db")
    store.add(samples(2))
    ann, bob = store.open_session("ann"), store.open_session("bob")
    first = store.next_for("ann", ann)["id"]
    for _ in range(3):  # the page's heartbeat keeps it for as long as it is visible
        clock.now += LEASE_SECONDS - 5
        assert store.renew("ann", ann, first) is True
        assert store.next_for("bob", bob)["id"] != first
    assert store.release("ann", ann) == 1  # the page was hidden: someone else may have it now
    cy = store.open_session("cy")
    assert store.next_for("cy", cy)["id"] == first
    assert store.renew("ann", ann, first) is False  # taken while ann was away: her page loads another
    clock.now += LEASE_SECONDS + 1  # cy walked away
    assert store.renew("ann", ann, first) is True  # lapsed and free again: ann's page keeps showing it
    with pytest.raises(UnknownComparison):
        store.renew("ann", ann, 99)


def test_undo_touches_only_the_sessions_own_label(store):
    """Anyone could undo anyone's label by sending their name; now a label belongs to the page session that gave
    it, and another session, even under the same name, cannot take it back."""
    ann_page, ann_other_tab, bob_page = store.open_session("ann"), store.open_session("ann"), store.open_session("bob")
    given = store.next_for("ann", ann_page)
    store.label(given["id"], "ann", 1, session=ann_page)
    assert store.undo("ann", ann_other_tab) is None
    assert store.undo("bob", bob_page) is None
    assert store.undo("ann") is None  # nor a script using her name
    assert [(x["labeler"], x["session"]) for x in store.labels()] == [("ann", ann_page)]
    assert store.undo("ann", ann_page) == given
    assert store.labels() == []
    assert [(c, s) for c, _, s in leases(store)] == [(given["id"], ann_page)]  # hers to answer again
    assert store.session_labeler(ann_page) == "ann"
    with pytest.raises(UnknownSession, match="reload the page"):
        store.session_labeler("not-a-session-we-issued")
    with pytest.raises(LabelingError, match="malformed"):
        store.session_labeler("../../etc/passwd")


def test_skips_do_not_count_as_answered(store):
    store.label(1, "ann", 0)
    store.label(2, "ann", "skip")
    stats = store.stats("ann")
    assert (stats["mine"], stats["my_skips"], stats["left_for_me"]) == (1, 1, 1)


def test_agreement_counts_pairs_of_labels_on_one_comparison(tmp_path):
    store = Store(tmp_path / "labels.db", labels_per_comparison=3)
    store.add(samples(2))
    for name, choice in (("ann", 0), ("bob", 0), ("cy", 1)):  # comparison 1: 1 of 3 pairs agree
        store.label(1, name, choice)
    for name, choice in (("ann", "tie"), ("bob", "tie")):  # comparison 2: a tie agrees with a tie
        store.label(2, name, choice)
    stats = store.stats("ann")
    assert stats["agreement_pairs"] == 4 and stats["agreement"] == pytest.approx(2 / 4)
    assert (stats["done"], stats["queued"], stats["labels"], stats["mine"], stats["left_for_me"]) == (1, 1, 5, 2, 0)
    assert Store(tmp_path / "labels.db").labels_per_comparison == 3  # the setting lives in the file


def test_an_old_database_opens_and_is_migrated(tmp_path):
    """A file written before sessions existed: its labels survive, it gains the session columns, its labels table
    becomes AUTOINCREMENT (ids kept), its comparisons are keyed by response set (one pair held in both orders, as
    the old blind queueing could leave it, stays as two), its names are spelled as today ("Ann" -> "ann"), and both
    old and new code paths work on it."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO comparisons VALUES (1, 'P', '[\"a\", \"b\"]', '{}', 'k1', 0)")
        db.execute("INSERT INTO comparisons VALUES (2, 'Q', '[\"c\", \"d\"]', '{}', 'k2', 0)")
        db.execute("INSERT INTO comparisons VALUES (3, 'Q', '[\"d\", \"c\"]', '{}', 'k3', 0)")
        db.execute("INSERT INTO labels VALUES (1, 1, 'Ann', 'best', 1, 0)")  # spelled as typed then: now "ann"
        db.execute("INSERT INTO assignments VALUES (2, 'bob', 0)")  # a stale reservation of the old kind
    store = Store(path, min_read_seconds=0)
    Store(path)  # opening twice migrates once
    with sqlite3.connect(path) as db:
        for table in ("labels", "assignments"):
            assert "session" in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'labels'").fetchone()[0]
    assert store.labels() == [{"id": 1, "comparison_id": 1, "labeler": "ann", "kind": "best", "best": 1,
                               "session": None, "created_at": 0, "shown_at": None}]  # fmt: skip
    assert store.add([("P", ["b", "a"], {}), ("Q", ["c", "d"], {})]) == (0, 2)  # already there, in any order
    assert [c["id"] for c in store.comparisons()] == [1, 2, 3]
    bob = store.open_session("bob")
    assert store.next_for("bob", bob)["id"] == 2
    store.label(2, "bob", "tie", session=bob)
    assert store.undo("bob", bob)["id"] == 2
    assert store.undo("ann")["id"] == 1  # a label from before sessions belongs to the name alone
    with pytest.raises(LabelingError, match="holds no labels yet"):  # nothing left to export: an error, no file
        store.export(tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists()
    assert store.label(1, "ann", 0) == 3  # ids 1 and 2 were given and undone: never again


def test_export_is_read_by_load_comparisons(tmp_path, store):
    store.add([("Prompt with id", ["First story", "Second story", "Third story"], {"prompt_id": 7})])
    store.label(1, "ann", 1)
    store.label(2, "ann", "tie")
    store.label(3, "ann", "skip")
    store.label(4, "bob", 2)
    out = tmp_path / "out" / "comparisons.jsonl"
    assert store.export(out) == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"prompt": "Prompt 0: a dragon opens a bakery.", "responses": ["Story 0.0", "Story 0.1"],
                        "best": 1, "labeler": "ann", "tie": False, "prompt_id": "", "comparison_id": 1,
                        "label_id": 1, "session": None, "shown_at": None,
                        "created_at": lines[0]["created_at"]}  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["created_at"])
    loaded = load_comparisons(out)
    assert [(c.best, c.labeler, c.tie, c.prompt_id, len(c.responses)) for c in loaded] == [
        (1, "ann", False, "", 2), (0, "ann", True, "", 2), (2, "bob", False, "7", 3)]  # fmt: skip


def test_empty_responses_are_queued_shown_and_exported(tmp_path):
    """A policy whose first token is end-of-turn writes "": such a response is a legal one to compare."""
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "Say something.", "responses": ["", "Hello."]}) + "\n")
    store = Store(tmp_path / "labels.db")
    assert store.add(read_samples(path)) == (1, 0)
    shown = store.next_for("ann")
    assert shown["responses"] == ["", "Hello."]
    store.label(shown["id"], "ann", 1)
    assert store.export(tmp_path / "c.jsonl") == 1
    line = json.loads((tmp_path / "c.jsonl").read_text())
    assert (line["responses"], line["best"]) == (["", "Hello."], 1)
    assert [(c.responses, c.best) for c in load_comparisons(tmp_path / "c.jsonl")] == [(["", "Hello."], 1)]


def test_add_keeps_metadata_and_queues_a_comparison_once(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "P", "responses": ["a", "b"], "policy": "runs/a", "step": 3}) + "\n\n")
    store = Store(tmp_path / "labels.db")
    assert store.add(read_samples(path)) == (1, 0)
    assert store.add(read_samples(path)) == (0, 1)
    with sqlite3.connect(store.path) as db:
        assert json.loads(db.execute("SELECT metadata FROM comparisons").fetchone()[0]) == {"policy": "runs/a", "step": 3}


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_label_add_status_export(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "responses": r}) + "\n" for p, r, _ in samples(3)))
    db = tmp_path / "labels.db"
    code, _, err = run_cli(capsys, "label", "add", "--db", db, path)
    assert code == 0 and "queued 3 comparisons" in err
    store = Store(db, labels_per_comparison=2)
    for name in ("ann", "bob"):
        store.label(1, name, 0)
    code, out, _ = run_cli(capsys, "label", "status", "--db", db)
    assert code == 0
    assert "done 1, queued 2" in out and "labels 2" in out and "agreement 1.000 over 1 pairs" in out
    code, out, _ = run_cli(capsys, "label", "status", "--db", db, "--json")
    assert json.loads(out)["done"] == 1
    code, _, err = run_cli(capsys, "label", "export", "--db", db, "--out", tmp_path / "c.jsonl")
    assert code == 0 and "wrote 2 labelled comparisons" in err
    assert [c.labeler for c in load_comparisons(tmp_path / "c.jsonl")] == ["ann", "bob"]


def test_cli_label_add_takes_empty_responses(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "P", "responses": ["", "b"]}) + "\n" +
                    json.dumps({"prompt": "Q", "responses": ["", ""]}) + "\n")  # fmt: skip
    code, _, err = run_cli(capsys, "label", "add", "--db", tmp_path / "labels.db", path)
    assert code == 0 and "queued 2 comparisons" in err


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"prompt": "P", "responses": ["a", "b"]}\n{"prompt": "P", "responses": ["a", \n', "line 2 is not valid JSON"),
    ('{"prompt": "P", "responses": ["only one"]}\n', "line 1: 'responses' must be a list of 2 to 4 texts, got 1"),
    ('{"prompt": "  ", "responses": ["a", "b"]}\n', "line 1: 'prompt' is missing or empty"),
    ('{"prompt": "P", "responses": ["a", "b", "c", "d", "e"]}\n', "got 5 responses"),
    ('{"prompt": "P", "responses": ["a", 3]}\n', "response 1 is not text"),
    ('{"prompt": "P", "responses": ["a", null]}\n', "response 1 is not text"),
    ('["P", "a", "b"]\n', "line 1 is a JSON list, not an object"),
    ("\n", "holds no samples"),
])  # fmt: skip
def test_cli_label_add_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "samples.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = run_cli(capsys, "label", "add", "--db", tmp_path / "labels.db", path)
    assert code == 2
    assert message in err and str(path) in err
    if (tmp_path / "labels.db").exists():
        assert Store(tmp_path / "labels.db").stats()["comparisons"] == 0  # all or nothing


def test_cli_label_export_and_status_need_an_existing_db(tmp_path, capsys):
    for action in (["export", "--out", tmp_path / "c.jsonl"], ["status"]):
        code, _, err = run_cli(capsys, "label", action[0], "--db", tmp_path / "nope.db", *action[1:])
        assert code == 2 and "nope.db does not exist" in err
        assert not (tmp_path / "nope.db").exists()


def test_cli_label_serve_answers_on_loopback(tmp_path):
    """`wprlhf label serve` in a subprocess: prints the page URL, answers, and stops when terminated."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from wprlhf.cli import main; sys.exit(main())", "label", "serve",
               "--db", str(tmp_path / "labels.db"), "--port", str(port), "--labels-per-comparison", "2"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()  # blocks until the server prints, or exits
        assert f"open http://127.0.0.1:{port}/" in line and "token" not in line, line
        deadline = time.monotonic() + 60
        while True:
            try:
                stats = httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read()
                time.sleep(0.1)
        assert stats["labels_per_comparison"] == 2 and stats["comparisons"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_label_serve_flags_reach_the_app(tmp_path, monkeypatch, capsys):
    """--allowed-host and --instructions: the app handed to uvicorn answers to the proxy's name (with a token,
    since a proxy exposes it) and serves the guidelines; a missing guidelines file stops serve before it starts."""
    ran = {}
    monkeypatch.setattr(labeling_app.uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    guide = tmp_path / "guide.md"
    guide.write_text("# How to judge\n- Pick the story you would rather read\n<b>not bold</b>\n")
    code, out, _ = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db", "--allowed-host",
                           "labels.example.org", "--allowed-host", "other.example", "--instructions", guide)
    assert code == 0 and "?token=" in out and "clear text" in out
    token = out.split("?token=")[1].split()[0]
    auth = {"Authorization": "Bearer " + token}
    with BackgroundServer(ran["app"]) as url, httpx.Client(base_url=url, timeout=10, headers=auth) as client:
        for host in ("labels.example.org", "other.example:443", "127.0.0.1"):
            assert client.get("/api/stats", headers={"Host": host}).status_code == 200, host
        assert client.get("/api/stats", headers={"Host": "attacker.example"}).status_code == 400
        assert client.get("/api/instructions").json() == {"instructions": guide.read_text()}

    ran.clear()
    code, _, err = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db", "--instructions",
                           tmp_path / "nope.md")  # fmt: skip
    assert code != 0 and "--instructions" in err and "nope.md does not exist" in err and not ran


def test_instructions_files_are_checked(tmp_path):
    assert read_instructions(None) is None
    for content, words in (("", "is empty"), ("x" * 100_001, "over 100000"), (b"\xff\xfe bad", "not UTF-8")):
        path = tmp_path / "guide.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(LabelingError, match=words):
            read_instructions(path)
    with pytest.raises(LabelingError, match="does not exist"):
        read_instructions(tmp_path / "missing.md")


# ---------------------------------------------------------------------------------------------- web API


def test_api_round_trip_and_stats(serve):
    url, store = serve(labels_per_comparison=2)
    store.add(samples(2, k=3))
    with httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        session = open_session(client, "  ann ")
        first = client.post("/api/next", json={"session": session}).json()
        assert first["comparison"]["responses"] == ["Story 0.0", "Story 0.1", "Story 0.2"]
        cid = first["comparison"]["id"]
        assert client.post("/api/renew", json={"session": session, "comparison_id": cid}).json() == {"held": True}
        answer = client.post("/api/label", json={"session": session, "comparison_id": cid, "choice": 2})
        assert answer.status_code == 200 and answer.json()["stats"]["mine"] == 1
        assert [(x["labeler"], x["session"]) for x in store.labels()] == [("ann", session)]
        undone = client.post("/api/undo", json={"session": session}).json()
        assert undone["comparison"]["id"] == cid and undone["stats"]["mine"] == 0
        assert client.post("/api/release", json={"session": session}).json() == {"released": 1}
        stats = client.get("/api/stats").json()
        assert (stats["done"], stats["queued"]) == (0, 2) and "agreement" not in stats  # the lead's, not theirs
        mine = client.get("/api/stats", params={"session": session}).json()
        assert (mine["mine"], mine["left_for_me"], mine["held_by_others"]) == (0, 2, 0)
        assert client.get("/api/instructions").json() == {"instructions": None}


def test_undo_over_the_api_needs_the_session_not_the_name(serve):
    url, store = serve()
    store.add(samples(1))
    with httpx.Client(base_url=url, timeout=10) as client:
        ann, mallory = open_session(client, "ann"), open_session(client, "ann")  # mallory types ann's name
        client.post("/api/next", json={"session": ann}).raise_for_status()
        client.post("/api/label", json={"session": ann, "comparison_id": 1, "choice": 0}).raise_for_status()
        assert client.post("/api/undo", json={"session": mallory}).json()["comparison"] is None
        answer = client.post("/api/undo", json={"labeler": "ann"})
        assert answer.status_code == 400 and "unknown field" in answer.json()["error"]
        assert client.post("/api/undo", json={"session": "forged-session-id"}).status_code == 403
    assert len(store.labels()) == 1


def test_model_text_is_served_as_json_and_the_page_never_uses_innerhtml(serve):
    url, store = serve()
    store.add([(XSS, [XSS, "</div><b>bold</b>"], {})])
    with httpx.Client(base_url=url, timeout=10) as client:
        answer = client.post("/api/next", json={"session": open_session(client, XSS[:60])})
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["comparison"]["prompt"] == XSS  # the text arrives unchanged, as data
        script = client.get("/static/app.js").text
        assert "textContent" in script
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in script.replace("never innerHTML", "")
    # The browser test checks that the page shows such text as text (test_labeling_browser.py).


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])  # fmt: skip
def test_loopback_needs_no_token_anything_else_gets_one(host, loopback):
    assert is_loopback(host) is loopback
    token = resolve_token(host, None)
    assert (token is None) if loopback else len(token) >= 24
    assert resolve_token(host, "my-own-long-token") == "my-own-long-token"
    assert len(resolve_token(host, None, proxied=True)) >= 24  # behind a proxy's public name: always a token


def test_serve_beyond_loopback_prints_a_url_per_address_and_requires_the_token(tmp_path, monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr(labeling_app.uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(labeling_app, "machine_addresses",
                        lambda: ["10.0.0.7", "192.168.1.5", "127.0.0.1", "fe80::1", "2001:db8::5", "::1"])
    labeling_app.serve(tmp_path / "labels.db", host="0.0.0.0", port=9999)
    printed = capsys.readouterr().out
    token = printed.split("?token=")[1].split()[0]
    assert ran["host"] == "0.0.0.0" and len(token) >= 24
    urls = [line.strip() for line in printed.splitlines() if line.startswith("  http://")]  # one a line, indented
    assert urls == [f"http://{a}:9999/?token={token}" for a in ("10.0.0.7", "192.168.1.5", "127.0.0.1")]
    assert "clear text" in printed and "TLS reverse proxy" in printed and "caddy reverse-proxy" in printed
    # the app handed to uvicorn refuses requests without that token (served here on loopback only)
    with BackgroundServer(ran["app"]) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/api/stats").status_code == 401
        assert client.get("/api/stats", headers={"Authorization": "Bearer " + token}).status_code == 200
    with pytest.raises(LabelingError, match="at least 16"):
        resolve_token("0.0.0.0", "short")


def test_token_auth(serve, monkeypatch):
    monkeypatch.setattr(labeling_app, "FREE_GUESSES", 100)  # which requests are refused; the back-off has its test
    url, store = serve(token="s3cret-token-123")
    store.add(samples(1))
    auth = {"Authorization": "Bearer s3cret-token-123"}
    with httpx.Client(base_url=url, timeout=10) as client, httpx.Client(base_url=url, timeout=10, headers=auth) as ok:
        assert client.get("/").status_code == 200  # the page holds no data
        session = open_session(ok, "ann")
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "s3cret-token-123"}):
            for path, body in (("/api/session", {"labeler": "ann"}), ("/api/next", {"session": session}),
                               ("/api/label", {"session": session, "comparison_id": 1, "choice": 0})):  # fmt: skip
                answer = client.post(path, json=body, headers=headers)
                assert answer.status_code == 401 and "access token" in answer.json()["error"]
            assert client.get("/api/instructions", headers=headers).status_code == 401
        assert store.labels() == []
        assert client.post("/api/next", json={"session": session}, headers=auth).status_code == 200
        assert client.post("/api/label", json={"session": session, "comparison_id": 1, "choice": 0},
                           headers=auth).status_code == 200  # fmt: skip


def test_bad_requests_get_4xx_with_a_clear_message(serve):
    url, store = serve()
    store.add(samples(2))
    store.label(2, "bob", 0)  # comparison 2 is full (1 label per comparison)
    with httpx.Client(base_url=url, timeout=10) as client:
        ann, bob = open_session(client, "ann"), open_session(client, "bob")
        assert client.post("/api/next", json={"session": bob}).json()["comparison"]["id"] == 1
        client.post("/api/label", json={"session": bob, "comparison_id": 1, "choice": "skip"}).raise_for_status()
        cases = [  # (method, path, body: dict | bytes | None, status, words in the error)
            ("POST", "/api/label", {"session": ann, "comparison_id": 999, "choice": 0}, 404, "999 does not exist"),
            ("POST", "/api/next", {"session": 5}, 400, "session is malformed"),
            ("POST", "/api/label", {"session": ann, "comparison_id": 2, "choice": 0}, 409, "already has its 1 label"),
            ("POST", "/api/label", {"session": bob, "comparison_id": 1, "choice": 1}, 409, "bob already labelled"),
            ("POST", "/api/label", {"session": ann, "comparison_id": 1, "choice": 5}, 400, "must be a response index"),
            ("POST", "/api/label", {"session": ann, "comparison_id": 1, "choice": "best"}, 400, "'tie' or 'skip'"),
            ("POST", "/api/label", {"session": ann, "comparison_id": 1, "choice": True}, 400, "response index"),
            ("POST", "/api/label", {"session": ann, "comparison_id": "1", "choice": 0}, 400, "must be an integer"),
            ("POST", "/api/label", {"comparison_id": 1, "choice": 0}, 400, "missing field(s) ['session']"),
            ("POST", "/api/label", {"session": ann}, 400, "missing field(s) ['choice', 'comparison_id']"),
            ("POST", "/api/label", {"session": ann, "comparison_id": 1, "choice": 0, "x": 1}, 400, "unknown field"),
            ("POST", "/api/label", {"session": None, "comparison_id": 1, "choice": 0}, 400, "session is missing"),
            ("POST", "/api/label", {"session": "x" * 65, "comparison_id": 1, "choice": 0}, 400, "malformed"),
            ("POST", "/api/label", {"session": "nope", "comparison_id": 1, "choice": 0}, 403, "reload the page"),
            ("POST", "/api/label", b'{"comparison_id": 1, "session": ', 400, "not valid JSON"),
            ("POST", "/api/label", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
            ("POST", "/api/label", b"[" * 50_000, 400, "not valid JSON"),
            ("POST", "/api/label", b'{"comparison_id": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
            ("POST", "/api/label", b"[1, 2]", 400, "must be a JSON object"),
            ("POST", "/api/label", b"x" * 70_000, 413, "over the limit"),
            ("POST", "/api/session", {"labeler": "x" * 65}, 400, "at most 64"),
            ("POST", "/api/session", {"labeler": " "}, 400, "labeler name is missing"),
            ("POST", "/api/undo", {}, 400, "missing field(s) ['session']"),
            ("POST", "/api/next", {}, 400, "missing field(s) ['session']"),
            ("GET", "/api/stats?session=nope", None, 403, "reload the page"),
            ("GET", "/api/nope", None, 404, "no such page or endpoint"),
            ("GET", "/api/label", None, 405, "GET is not allowed"),
            ("GET", "/api/next?session=" + ann, None, 405, "GET is not allowed"),
        ]
        for method, path, body, status, words in cases:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            answer = client.request(method, path, content=content, headers={"Content-Type": "application/json"})
            assert answer.status_code == status, (path, body if not isinstance(body, bytes) else body[:40], answer.text)
            assert words in answer.json()["error"], (words, answer.json())
    assert [(x["comparison_id"], x["labeler"]) for x in store.labels()] == [(2, "bob"), (1, "bob")]  # nothing else


@pytest.mark.parametrize("path", ["/api/label", "/api/renew"])
def test_ids_are_range_checked_everywhere(serve, path):
    """comparison_id 2**63 reached SQLite and overflowed there: a plain-text 500. Every id is checked first."""
    url, store = serve()
    store.add(samples(1))
    with httpx.Client(base_url=url, timeout=10) as client:
        session = open_session(client, "ann")
        for bad in BAD_IDS:
            body = {"session": session, "comparison_id": bad} | ({"choice": 0} if path == "/api/label" else {})
            answer = client.post(path, json=body)
            assert answer.status_code == 400, (bad, answer.text)
            assert "comparison_id" in answer.json()["error"], (bad, answer.json())
    assert store.labels() == []


def test_host_must_be_a_name_the_server_answers_to(serve):
    """DNS rebinding: a page on attacker.example, its name now pointing at 127.0.0.1, could read the queue; its
    requests carry Host: attacker.example and are refused."""
    url, store = serve()
    store.add(samples(1))
    port = urlparse(url).port
    with httpx.Client(base_url=url, timeout=10) as client:
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}", "localhost"):
            assert client.get("/api/stats", headers={"Host": host}).status_code == 200, host
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}", ""):
            for method, path in (("GET", "/api/stats"), ("GET", "/"), ("POST", "/api/session")):
                answer = client.request(method, path, headers={"Host": host}, json={"labeler": "eve"})
                assert answer.status_code == 400 and "--allowed-host" in answer.json()["error"], (host, path)
    assert store.stats()["comparisons"] == 1


def test_beyond_loopback_the_machine_names_and_allowed_hosts_are_answered(monkeypatch):
    monkeypatch.setattr(labeling_app, "machine_addresses", lambda: ["127.0.0.1", "192.168.1.5", "::1", "2001:db8::5"])
    names = allowed_hosts("0.0.0.0", ["Labels.Example.org", "10.1.2.3:8443", "::2"])
    hostname = socket.gethostname().lower()
    assert {"localhost", "127.0.0.1", "[::1]", "192.168.1.5", "[2001:db8::5]", hostname, "labels.example.org",
            "10.1.2.3", "[::2]"} <= names  # fmt: skip
    assert "attacker.example" not in names
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert "127.0.0.2" in allowed_hosts("127.0.0.2")
    assert host_name("[::1]:8765") == "[::1]" and host_name("Example.ORG:80") == "example.org"
    for bad in ("https://labels.example.org/", " ", "two words"):
        with pytest.raises(LabelingError, match="--allowed-host"):
            allowed_hosts("0.0.0.0", [bad])


def test_origin_when_sent_must_be_the_pages_own(serve):
    url, store = serve()
    store.add(samples(1))
    with httpx.Client(base_url=url, timeout=10) as client:
        session = open_session(client, "ann")
        client.post("/api/next", json={"session": session}).raise_for_status()
        label = {"session": session, "comparison_id": 1, "choice": 0}
        for origin in ("http://evil.example", f"http://127.0.0.1:{urlparse(url).port + 1}", "null",
                       f"http://localhost:{urlparse(url).port}"):  # localhost is not the origin of a 127.0.0.1 page
            answer = client.post("/api/label", json=label, headers={"Origin": origin})
            assert answer.status_code == 403 and "refused" in answer.json()["error"], origin
        assert store.labels() == []
        assert client.post("/api/label", json=label, headers={"Origin": url}).status_code == 200


def test_state_changes_only_by_post_with_json(serve):
    """A page on another site can POST text/plain or a form without the browser asking us first; JSON it cannot.
    So a state change must be a POST of application/json (415 otherwise), and GET changes nothing."""
    url, store = serve()
    store.add(samples(1))
    with httpx.Client(base_url=url, timeout=10) as client:
        session = open_session(client, "ann")
        body = json.dumps({"session": session, "comparison_id": 1, "choice": 0})
        for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", None, "application/json-patch+json"):  # fmt: skip
            headers = {"Content-Type": content_type} if content_type else {}
            answer = client.post("/api/label", content=body, headers=headers)
            assert answer.status_code == 415 and "application/json" in answer.json()["error"], content_type
        assert store.labels() == []
        assert client.get("/api/next", params={"session": session}).status_code == 405
        assert leases(store) == []  # reserving is a state change: a GET reserves nothing
        client.post("/api/next", json={"session": session}).raise_for_status()
        ok = client.post("/api/label", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


def test_a_server_failure_is_still_a_json_error(serve, monkeypatch):
    url, _ = serve()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "stats", broken)
    with httpx.Client(base_url=url, timeout=10) as client:
        answer = client.get("/api/stats")
    assert answer.status_code == 500 and "RuntimeError" in answer.json()["error"]


def test_body_without_content_length_is_refused(serve):
    url, _ = serve()
    host, port = urlparse(url).hostname, urlparse(url).port
    request = (f"POST /api/label HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
               "Content-Type: application/json\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request.encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply


# ---------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("labels_per_comparison", [1, 20])
def test_load_20_concurrent_labelers_50_labels_each(serve, labels_per_comparison):
    """1,000 labels from 20 threads: exactly 1,000 rows, no (comparison, labeler) twice, every comparison with
    exactly its labels_per_comparison labels, every request answered 200. With 1 label each the 20 labelers share
    1,000 comparisons (leases keep them apart); with 20, all of them label the same 50."""
    n_clients, per_client = 20, 50
    url, store = serve(labels_per_comparison=labels_per_comparison)
    n_comparisons = n_clients * per_client // labels_per_comparison
    store.add(samples(n_comparisons, k=4))
    errors, counts = [], Counter()
    deadline = time.monotonic() + 120  # the test stops by itself even if the server hangs

    def labeler(i: int):
        name = f"labeler-{i:02d}"
        with httpx.Client(base_url=url, timeout=30) as client:
            session = open_session(client, name)
            while counts[name] < per_client and time.monotonic() < deadline:
                got = client.post("/api/next", json={"session": session})
                if got.status_code != 200 or got.json()["comparison"] is None:
                    errors.append((name, "next", got.status_code, got.text[:200]))
                    return
                comparison = got.json()["comparison"]
                sent = client.post("/api/label", json={"session": session, "comparison_id": comparison["id"],
                                                       "choice": (i + comparison["id"]) % 4})  # fmt: skip
                if sent.status_code != 200:
                    errors.append((name, "label", sent.status_code, sent.text[:200]))
                    return
                counts[name] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=labeler, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), f"labelers still running after {elapsed:.0f} s"
    assert errors == []
    labels = store.labels()
    assert len(labels) == n_clients * per_client == sum(counts.values())
    assert len({(x["comparison_id"], x["labeler"]) for x in labels}) == len(labels)
    assert set(Counter(x["comparison_id"] for x in labels).values()) == {labels_per_comparison}
    stats = store.stats()
    pairs = n_comparisons * labels_per_comparison * (labels_per_comparison - 1) // 2
    assert (stats["done"], stats["queued"], stats["labels"], stats["agreement_pairs"]) == (n_comparisons, 0, 1000, pairs)
    print(f"1000 labels from {n_clients} concurrent clients in {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------- a team (issue 39)
# Each test below shows one fault a three-person labeling job hit at b8e457e, and fails on that code.


def lease_next(client: httpx.Client, session: str) -> int:
    """The id of the comparison /api/next leases to `session`."""
    answer = client.post("/api/next", json={"session": session})
    assert answer.status_code == 200, answer.text
    return answer.json()["comparison"]["id"]


def raw_request(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Send bytes on a fresh connection; what came back before the server closed it or `wait` seconds passed."""
    parts = urlparse(url)
    reply = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):  # reset: closed before it read the request
            pass
    return reply


def test_an_answer_needs_the_item_on_screen_for_min_read_seconds(serve, clock):
    """A key held down labelled 6 items in 2.2 s. The server takes an answer only once its comparison has been on
    that page's screen for MIN_READ_SECONDS (2 s), counted from the lease, which renewing does not restart."""
    assert store_module.MIN_READ_SECONDS == 2.0
    url, store = serve(min_read_seconds=store_module.MIN_READ_SECONDS)
    store.add(samples(2))
    with httpx.Client(base_url=url, timeout=10) as client:
        session = open_session(client, "ann")
        cid = lease_next(client, session)
        label = {"session": session, "comparison_id": cid, "choice": 0}
        early = client.post("/api/label", json=label)
        assert early.status_code == 425 and "read the stories first" in early.json()["error"]
        clock.now += 1.5
        assert client.post("/api/renew", json={"session": session, "comparison_id": cid}).json() == {"held": True}
        assert lease_next(client, session) == cid  # a reload shows the same item; its clock keeps running
        assert client.post("/api/label", json=label).status_code == 425
        clock.now += 0.6
        assert client.post("/api/label", json=label).status_code == 200
    (given,) = store.labels()
    assert given["created_at"] - given["shown_at"] == pytest.approx(2.1)


def test_labelers_never_see_agreement(serve):
    """The agreement shown after every label told the second labeler whether they matched the first. No answer a
    labeler can ask for carries it, and the page does not print it; the lead's report does."""
    url, store = serve(labels_per_comparison=2)
    store.add(samples(1))
    seen = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for name, choice in (("ann", 0), ("bob", 1)):
            session = open_session(client, name)
            cid = lease_next(client, session)
            for method, path, body in (("POST", "/api/label", {"session": session, "comparison_id": cid,
                                                                 "choice": choice}),
                                       ("POST", "/api/next", {"session": session}),
                                       ("POST", "/api/undo", {"session": session}),
                                       ("GET", f"/api/stats?session={session}", None), ("GET", "/api/stats", None)):
                seen.append(client.request(method, path, json=body).text)
            client.post("/api/next", json={"session": session})
            client.post("/api/label", json={"session": session, "comparison_id": cid, "choice": choice})
        script = client.get("/static/app.js").text
        assert "stats.agreement" not in script and "agreement_pairs" not in script
    assert len(seen) == 10 and not [text for text in seen if "agreement" in text]
    assert store.lead_report()["agreement"]["overall"] == {"items": 1, "pairs": 1, "agree": 0, "raw": 0.0,
                                                           "kappa": pytest.approx(-1.0)}  # fmt: skip


def test_a_body_framed_twice_is_refused_before_it_is_read(serve):
    """Content-Length: 10 with Transfer-Encoding: chunked made the server read a 100 MiB chunked body: the length
    checked was not the framing used. Now such a request is answered 400 at once, without waiting for a body."""
    url, _ = serve()
    host = urlparse(url).netloc
    reply = raw_request(url, (f"POST /api/session HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                              "Content-Length: 10\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in reply


def test_the_guard_counts_body_bytes_whatever_the_framing(tmp_path):
    """Behind the header checks, the bytes are counted as they arrive: a body that streams past max_body (as a
    chunked one would) is refused after max_body bytes, not read to its end."""
    app = create_app(tmp_path / "labels.db", max_body=1000)
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 600, "more_body": True}  # never ends

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/session", "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"10")]}
    import asyncio

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and len(pulled) == 2
    assert b"over the limit of 1000" in sent[1]["body"]


def test_slow_or_idle_connections_are_cut_off_and_capped(serve, monkeypatch):
    """1,100 idle connections used up the open files and locked every labeler out. Connections past
    MAX_CONNECTIONS are closed at once, headers must arrive within HEADER_TIMEOUT and a body within BODY_TIMEOUT,
    and a wrong token is answered before any body is read."""
    monkeypatch.setattr(labeling_app, "MAX_CONNECTIONS", 6)
    monkeypatch.setattr(labeling_app, "HEADER_TIMEOUT", 0.6)
    monkeypatch.setattr(labeling_app, "BODY_TIMEOUT", 0.6)
    url, _ = serve(token="s3cret-token-123")
    parts = urlparse(url)
    idle = [socket.create_connection((parts.hostname, parts.port), timeout=5) for _ in range(6)]
    try:
        time.sleep(0.1)
        assert raw_request(url, b"GET", wait=2) == b""  # the 7th: closed at once, no answer
        start = time.monotonic()
        assert [sock.recv(10) for sock in idle] == [b""] * 6  # each closed by the header deadline
        assert time.monotonic() - start < 3
    finally:
        for sock in idle:
            sock.close()
    head = (f"POST /api/session HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\nConnection: close\r\n")  # fmt: skip
    start = time.monotonic()
    assert raw_request(url, (head + "Authorization: Bearer wrong-token-abcdef\r\n\r\n").encode()).startswith(
        b"HTTP/1.1 401")  # fmt: skip
    assert time.monotonic() - start < 0.5  # answered without waiting for the 100 bytes
    slow = raw_request(url, (head + "Authorization: Bearer s3cret-token-123\r\n\r\n{").encode())
    assert slow.startswith(b"HTTP/1.1 408") and b"did not arrive within" in slow
    assert httpx.get(url + "/api/stats", headers={"Authorization": "Bearer s3cret-token-123"}).status_code == 200


def test_hogging_is_capped_per_person_and_idle_sessions_expire(serve, clock):
    """28 scripted sessions held every item and renewing kept them forever. A person's pages together hold at most
    MAX_LEASES_PER_LABELER leases and MAX_SESSIONS_PER_LABELER live sessions, and a session that only renews
    expires after SESSION_IDLE_SECONDS (its lease then lapses). Many people behind one address are not capped."""
    url, store = serve()
    store.add(samples(30))
    with httpx.Client(base_url=url, timeout=10) as client:
        hog = [open_session(client, "hog") for _ in range(store_module.MAX_SESSIONS_PER_LABELER + 1)]
        for session in hog[1:]:
            lease_next(client, session)
        assert len([row for row in leases(store) if row[1] == "hog"]) == store_module.MAX_LEASES_PER_LABELER == 3
        expired = client.post("/api/next", json={"session": hog[0]})  # the 21st session pushed the 1st out
        assert expired.status_code == 403 and "expired" in expired.json()["error"]
        team = [open_session(client, f"labeler-{i}") for i in range(12)]  # one proxy address, 12 people
        assert len({lease_next(client, session) for session in team}) == 12
        last = hog[-1]
        held = [row[0] for row in leases(store) if row[2] == last][0]
        for _ in range(4):  # heartbeats only, 10 minutes apart (each takes the lapsed lease again)
            clock.now += 600
            answer = client.post("/api/renew", json={"session": last, "comparison_id": held})
            if answer.status_code != 200:
                break
        assert answer.status_code == 403 and "expired" in answer.json()["error"]
        clock.now += LEASE_SECONDS + 1
        assert "hog" not in {row[1] for row in (store.next_for("z") and leases(store))}


def test_leases_are_enforced(serve, clock):
    """Another page could label the item shown on someone else's screen. An answer is taken only from the page
    holding that comparison's lease: not another labeler's page, not another tab of the same person."""
    url, store = serve()
    store.add(samples(2))
    with httpx.Client(base_url=url, timeout=10) as client:
        ann, ann_tab, bob = open_session(client, "ann"), open_session(client, "ann"), open_session(client, "bob")
        shown = lease_next(client, ann)
        for session in (bob, ann_tab):
            answer = client.post("/api/label", json={"session": session, "comparison_id": shown, "choice": 0})
            assert answer.status_code == 409 and "not on this page's screen" in answer.json()["error"]
        clock.now += LEASE_SECONDS + 1  # ann's lease lapsed: bob still has to be shown it first
        assert client.post("/api/label", json={"session": bob, "comparison_id": shown, "choice": 0}).status_code == 409
        assert lease_next(client, bob) == shown
        assert client.post("/api/label", json={"session": bob, "comparison_id": shown, "choice": 0}).status_code == 200
    assert [(x["labeler"], x["session"]) for x in store.labels()] == [("bob", bob)]


def test_names_are_one_labeler_in_any_case_or_width_and_zwnj_is_accepted():
    """Names with a ZWNJ were refused, while 'Ann' and 'ann' were two labelers."""
    assert check_labeler("Ann") == check_labeler(" ANN ") == check_labeler("Ａｎｎ") == check_labeler("ann") == "ann"
    assert check_labeler("Straße") == check_labeler("STRASSE")
    persian = "نیم\u200cفاصله"  # a Persian name written with a zero-width non-joiner
    assert check_labeler(persian) == persian
    for spoof in ("ann\u202e", "a\u200bnn", "ann\x00"):  # a bidi override, a zero-width space, a NUL
        with pytest.raises(LabelingError, match="invisible"):
            check_labeler(spoof)


def test_name_variants_label_as_one_person(store):
    store.label(1, "Ann", 0)
    with pytest.raises(StaleComparison, match="ann already labelled"):
        store.label(1, "ＡＮＮ", 1)
    assert [x["labeler"] for x in store.labels()] == ["ann"]


def test_tokens_must_be_strong_and_can_come_from_a_file_or_the_environment(tmp_path):
    """'password' was accepted as --token, and --token shows in `ps`. The rule: at least 16 printable characters
    without spaces, at least 10 of them different."""
    for weak in ("password", "passwordpassword", "aaaaaaaaaaaaaaaaaaaa", "sixteen chars ok"):
        with pytest.raises(LabelingError, match="at least"):
            check_token(weak)
    assert check_token("s3cret-token-123") == "s3cret-token-123"
    path = tmp_path / "token"
    path.write_text("from-a-file-token-42\n")
    assert read_token(token_file=path, environ={}) == "from-a-file-token-42"
    assert read_token(environ={TOKEN_ENV: "from-the-environment-7"}) == "from-the-environment-7"
    assert read_token(environ={}) is None
    with pytest.raises(LabelingError, match="not both"):
        read_token("s3cret-token-123", path)
    path.write_text("password\n")
    with pytest.raises(LabelingError, match=r"--token-file .*token must be|at least 16"):
        read_token(token_file=path, environ={})


def test_cli_serve_takes_the_token_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr(labeling_app.uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    path = tmp_path / "token"
    path.write_text("from-a-file-token-42\n")
    code, out, _ = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db", "--token-file", path)
    assert code == 0 and "?token=from-a-file-token-42" in out
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-7")
    code, out, _ = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db")
    assert code == 0 and "?token=from-the-environment-7" in out
    with BackgroundServer(ran["app"]) as url:
        assert httpx.get(url + "/api/stats").status_code == 401
        assert httpx.get(url + "/api/stats", headers={"Authorization": "Bearer from-the-environment-7"}).is_success
    code, _, err = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db", "--token", "password")
    assert code == 2 and "at least 16" in err


def test_wrong_guesses_back_off(serve, monkeypatch):
    """Wrong tokens were answered 164 times a second. After FREE_GUESSES wrong ones from an address, its requests
    are answered 429 with Retry-After, unchecked (so even the right token waits), for a time that doubles."""
    monkeypatch.setattr(labeling_app, "MAX_BACKOFF", 0.4)  # the wait's cap, short for the test (60 s in use)
    url, _ = serve(token="s3cret-token-123")
    with httpx.Client(base_url=url, timeout=10) as client:
        # Each guess names another client address: X-Forwarded-For is not believed (it dodged the back-off).
        codes = [client.get("/api/stats", headers={"Authorization": f"Bearer guess-{i}",
                                                   "X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(labeling_app.FREE_GUESSES + 2)]  # fmt: skip
        assert codes == [401] * (labeling_app.FREE_GUESSES + 1) + [429]
        refused = client.get("/api/stats", headers={"Authorization": "Bearer s3cret-token-123"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "too many wrong access codes" in refused.json()["error"]
        time.sleep(0.45)
        assert client.get("/api/stats", headers={"Authorization": "Bearer s3cret-token-123"}).status_code == 200
        assert client.get("/api/stats", headers={"Authorization": "Bearer guess-again"}).status_code == 401  # reset


def test_blind_pairs_queued_twice_are_queued_once(tmp_path):
    """The same `eval --blind-db` run twice added 18 duplicates out of 36: the sides are shuffled again each time,
    and the key counted the order. A comparison is now its prompt and its set of responses."""
    from wprlhf.evals.side_by_side import queue_blind

    prompts = [f"Prompt {i}" for i in range(36)]
    a, b = ("policy-a", [f"A story {i}" for i in range(36)]), ("policy-b", [f"B story {i}" for i in range(36)])
    db = tmp_path / "blind.db"
    assert queue_blind(db, prompts, a, b) == 36
    orders = {tuple(c["metadata"]["blind_sides"]) for c in Store(db).comparisons()}
    assert queue_blind(db, prompts, a, b) == 0 and queue_blind(db, prompts, b, a) == 0
    assert len(Store(db).comparisons()) == 36 and len(orders) == 2  # both orders occurred, and still one each


def invite_client(url: str, secret: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10, headers={"Authorization": "Bearer " + secret})


def test_invites_name_the_labeler_and_undo_follows_the_person(serve):
    """Undo after a reload said "Nothing to undo": undo belonged to the tab. With an invite the name comes from
    the link, and undo (to fix an earlier answer) reaches the person's labels from any page of theirs. A typed
    name that an invite owns is refused, and a revoked link stops working."""
    url, store = serve(token="shared-token-for-one")
    store.add(samples(3))
    ann_secret = store.invite("Ann")
    with invite_client(url, ann_secret) as ann, invite_client(url, "shared-token-for-one") as shared:
        assert ann.get("/api/me").json() == {"role": "labeler", "labeler": "ann", "min_read_seconds": 0}
        first = ann.post("/api/session", json={}).json()
        assert first["labeler"] == "ann"
        for _ in range(2):
            cid = lease_next(ann, first["session"])
            ann.post("/api/label", json={"session": first["session"], "comparison_id": cid, "choice": 1})
        reloaded = ann.post("/api/session", json={}).json()["session"]  # another page: a reload, a phone
        assert ann.post("/api/undo", json={"session": reloaded}).json()["comparison"]["id"] == 2
        assert ann.post("/api/undo", json={"session": reloaded}).json()["comparison"]["id"] == 1
        assert lease_next(ann, reloaded) == 1  # the undone one is this page's to answer again
        assert ann.post("/api/session", json={"labeler": "bob"}).status_code == 403  # the link's name only
        typed = shared.post("/api/session", json={"labeler": "ANN"})
        assert typed.status_code == 403 and "invite link" in typed.json()["error"]
        other = open_session(shared, "cy")
        assert ann.post("/api/next", json={"session": other}).status_code == 403  # cy's session, ann's link
        assert store.revoke("ann") is True
        assert ann.post("/api/next", json={"session": reloaded}).status_code == 401
    assert store.labels() == []


def test_the_lead_view_needs_the_leads_link_and_records_adjudications(serve):
    url, store = serve(labels_per_comparison=2)
    store.add(samples(2))
    secrets_ = {name: store.invite(name) for name in ("ann", "bob")}
    lead_secret = store.invite("Lee", role="lead")
    for name, choice in (("ann", 0), ("bob", 1)):
        with invite_client(url, secrets_[name]) as client:
            session = client.post("/api/session", json={}).json()["session"]
            for _ in range(2):
                cid = lease_next(client, session)
                client.post("/api/label", json={"session": session, "comparison_id": cid,
                                                "choice": choice if cid == 1 else 0}).raise_for_status()  # fmt: skip
            assert client.get("/api/lead/report").status_code == 403  # a labeler's link
    with httpx.Client(base_url=url, timeout=10) as nobody:
        assert nobody.get("/api/lead/report").status_code == 401
    with invite_client(url, lead_secret) as lead:
        assert lead.get("/lead").status_code == 200 and "lead.js" in lead.get("/lead").text
        assert lead.post("/api/next", json={"session": "x"}).status_code == 403  # the lead's link does not label
        report = lead.get("/api/lead/report").json()
        assert [r["comparison_id"] for r in report["review"]] == [1]
        assert report["review"][0]["answers"] == {"ann": 0, "bob": 1}
        pair = report["agreement"]["pairs"][0]
        assert (pair["a"], pair["b"], pair["items"], pair["agree"], pair["raw"]) == ("ann", "bob", 2, 1, 0.5)
        assert [(r["labeler"], r["answers"], r["sessions"]) for r in report["labelers"]] == [("ann", 2, 1),
                                                                                             ("bob", 2, 1)]  # fmt: skip
        calm = lead.post("/api/lead/adjudicate", json={"comparison_id": 2, "choice": 0})
        assert calm.status_code == 409 and "do not disagree" in calm.json()["error"]
        settled = lead.post("/api/lead/adjudicate", json={"comparison_id": 1, "choice": 1})
        assert settled.status_code == 200
        assert lead.get("/api/lead/report").json()["review"][0]["adjudication"] == {
            "id": settled.json()["adjudication_id"], "lead": "lee", "choice": 1}  # fmt: skip
    assert len(store.labels()) == 4  # the originals stay beside it


def test_agreement_maths_by_hand():
    # Cohen: p_o = 3/4; a says 0 half the time, b a quarter: p_e = .5 * .25 + .5 * .75 = .5; kappa = .25 / .5
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == {"items": 4, "agree": 3, "raw": 0.75, "kappa": 0.5}
    assert cohen_kappa(["tie", "tie"], ["tie", "tie"])["kappa"] is None  # p_e = 1: undefined, not 0 / 0
    # Fleiss: P_i = 1, 1/3, 1 -> P = 7/9; answers 0 and 1 four times each -> P_e = 1/2; kappa = (7/9 - 1/2) / (1/2)
    overall = fleiss_kappa([[0, 0, 0], [0, 1, 1], [1, 1], ["skip-less single"]])
    assert (overall["items"], overall["pairs"], overall["agree"]) == (3, 7, 5)
    assert overall["raw"] == pytest.approx(5 / 7) and overall["kappa"] == pytest.approx(5 / 9)


def test_export_lineage_and_ids_never_reused(tmp_path):
    """The export had no comparison id, label id, session or time, and an undone label's id was given again."""
    store = Store(tmp_path / "labels.db", labels_per_comparison=2, min_read_seconds=0)
    store.add(samples(2) + [("Prompt with id", ["x", "y"], {"prompt_id": 7})])
    ann, bob = store.open_session("ann"), store.open_session("bob")
    ids = []
    for name, session, choice in (("ann", ann, 0), ("bob", bob, 1), ("ann", ann, "tie")):
        ids.append(store.label(store.next_for(name, session)["id"], name, choice, session))
    assert store.undo("ann", ann)["id"] == 2
    ids.append(store.label(store.next_for("ann", ann)["id"], "ann", 0, ann))
    store.label(store.next_for("bob", bob)["id"], "bob", "skip", bob)
    store.adjudicate(1, "lee", 1)
    assert ids == [1, 2, 3, 4]  # the undone id 3 was not given to the next label
    out = tmp_path / "c.jsonl"
    assert store.export(out) == 4
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["comparison_id"], x["label_id"], x["labeler"], x["session"]) for x in lines[:3]] == [
        (1, 1, "ann", ann), (1, 2, "bob", bob), (2, 4, "ann", ann)]  # fmt: skip
    assert all(x["created_at"].endswith("Z") and x["shown_at"].endswith("Z") for x in lines[:3])
    assert {k: lines[3][k] for k in ("comparison_id", "label_id", "labeler", "adjudicated", "settles", "best")} == {
        "comparison_id": 1, "label_id": None, "labeler": "lee", "adjudicated": True, "settles": [1, 2], "best": 1}
    assert [(c.best, c.labeler) for c in load_comparisons(out)] == [(0, "ann"), (1, "bob"), (0, "ann"), (1, "lee")]


def test_an_undone_answer_takes_the_leads_decision_with_it(tmp_path):
    """A lead's decision between two answers outlived an undo of one of them: the export then wrote it beside the
    other answer (counting it twice) with `settles` naming a label that no longer existed."""
    store = Store(tmp_path / "labels.db", labels_per_comparison=2, min_read_seconds=0)
    store.add(samples(1))
    sessions = {name: store.open_session(name) for name in ("ann", "bob")}
    for name, choice in (("ann", 0), ("bob", 1)):
        store.label(store.next_for(name, sessions[name])["id"], name, choice, sessions[name])
    store.adjudicate(1, "lee", 1)
    assert len(store.adjudications()) == 1
    assert store.undo("ann", sessions["ann"])["id"] == 1
    assert store.adjudications() == [] and store.lead_report()["review"] == []
    assert [json.loads(line)["labeler"] for line in (lambda p: (store.export(p), p.read_text())[1])(
        tmp_path / "c.jsonl").splitlines()] == ["bob"]  # fmt: skip


def test_cli_label_invite_revoke_and_status(tmp_path, capsys):
    db = tmp_path / "labels.db"
    code, out, err = run_cli(capsys, "label", "invite", "--db", db, "Ann", "--url", "https://labels.example.org/")
    assert code == 0 and out.startswith("https://labels.example.org/?token=") and "revoke" in err
    secret = out.strip().split("?token=")[1]
    assert Store(db).identity(secret) == ("labeler", "ann")
    code, out, _ = run_cli(capsys, "label", "invite", "--db", db, "Lee", "--lead")
    assert code == 0 and out.startswith("http://127.0.0.1:8765/lead?token=")
    store = Store(db, labels_per_comparison=2)
    store.add([(XSS, ["a", "b"], {})])
    store.label(1, "ann", 0)
    store.label(1, "bob", 1)
    code, out, err = run_cli(capsys, "label", "status", "--db", db, "--html", tmp_path / "lead.html")
    assert "invites: ann (labeler), lee (lead)" in out and "ann & bob: raw 0.000 (0 of 1)" in out
    page = (tmp_path / "lead.html").read_text()
    data = page.split('id="report-data">')[1].split("</script>")[0]  # the story's own </script> did not end it
    assert json.loads(data)["review"][0]["prompt"] == XSS and "function render" in page
    assert run_cli(capsys, "label", "revoke", "--db", db, "ANN")[0] == 0
    assert Store(db).identity(secret) is None
    code, _, err = run_cli(capsys, "label", "revoke", "--db", db, "ann")
    assert code == 2 and "no live invite" in err


def test_no_function_in_the_app_exceeds_60_lines():
    """create_app was 91 lines; it is now a list of the parts it puts together, each a function of its own."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(labeling_app))
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}  # fmt: skip
    assert lengths["create_app"] <= 60 and max(lengths.values()) <= 60, sorted(lengths.items(), key=lambda x: -x[1])[:3]


def test_label_commands_refuse_files_that_are_not_theirs_and_outputs_that_would_destroy_the_labels(tmp_path, capsys):
    """`label export --out DB` and `label status --html DB` overwrote the labels database and exited 0; a corrupt
    or foreign --db gave a traceback, and another program's SQLite file gained our tables before failing."""
    db = tmp_path / "labels.db"
    store = Store(db, min_read_seconds=0)
    store.add(samples(1))
    store.label(store.next_for("ann")["id"], "ann", 0)
    before = db.read_bytes()
    for argv, flag in ((["export", "--out", db], "--out"), (["status", "--html", db], "--html"),
                       (["export", "--out", tmp_path], "--out"), (["export", "--out", f"{db}-wal"], "--out")):
        code, _, err = run_cli(capsys, "label", argv[0], "--db", db, *argv[1:])
        assert code == 2 and flag in err, (argv, err)
    assert db.read_bytes() == before and len(Store(db).labels()) == 1
    garbage, foreign = tmp_path / "garbage.db", tmp_path / "other.db"
    garbage.write_bytes(b"\x00not sqlite\xff" * 100)
    with sqlite3.connect(foreign) as other:
        other.execute("CREATE TABLE labels (x TEXT)")
    foreign_bytes = foreign.read_bytes()
    for path, says in ((garbage, "not a labels database"), (foreign, "another program's SQLite database")):
        for command in ("status", "export", "invite"):
            extra = {"export": ["--out", tmp_path / "c.jsonl"], "invite": ["ann"]}.get(command, [])
            code, _, err = run_cli(capsys, "label", command, "--db", path, *extra)
            assert code == 2 and says in err and "Traceback" not in err, (command, err)
    assert foreign.read_bytes() == foreign_bytes  # left as it was: no tables added, no WAL


def test_a_lead_link_never_silently_replaces_a_labelers_and_revoked_names_stay_reserved(tmp_path):
    """Inviting a labeler as lead replaced their labeling link without a word; once revoked, anyone with the
    shared token could type the name and add labels to that person's record."""
    store = Store(tmp_path / "labels.db")
    store.invite("ann")
    with pytest.raises(LabelingError, match="labeler link"):
        store.invite("ann", role="lead")
    assert store.identity(store.invite("ann")) == ("labeler", "ann")  # the same role again: a fresh link
    store.revoke("ann")
    with pytest.raises(store_module.NameTaken):
        store.open_session("Ann")
    assert store.identity(store.invite("ann", role="lead")) == ("lead", "ann")  # after a revoke, a new role is fine


def test_token_files_that_are_not_text_give_their_reason(tmp_path):
    bom, binary = tmp_path / "bom.txt", tmp_path / "bin.txt"
    bom.write_text("\ufeffa-long-and-random-token-9f3k2", encoding="utf-8")
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert labeling_app.read_token(token_file=bom) == "a-long-and-random-token-9f3k2"
    with pytest.raises(LabelingError, match="cannot be read as UTF-8"):
        labeling_app.read_token(token_file=binary)
    with pytest.raises(LabelingError, match="not a file"):
        labeling_app.read_token(token_file=tmp_path)


def test_serve_refuses_a_port_that_is_not_one(tmp_path, capsys):
    code, _, err = run_cli(capsys, "label", "serve", "--db", tmp_path / "labels.db", "--port", "99999")
    assert code == 2 and "--port 99999" in err and "Traceback" not in err
