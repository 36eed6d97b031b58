"""Human labeling: the SQLite store, the `wprlhf label` commands, the web API's answers to bad requests, token
auth, escaping, and a load test of 20 concurrent labelers on loopback. The browser test is in
test_labeling_browser.py."""

from __future__ import annotations

import json
import socket
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
from wprlhf.labeling.app import BackgroundServer, create_app, is_loopback, resolve_token
from wprlhf.labeling.store import LabelingError, StaleComparison, Store, UnknownComparison, read_samples

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def samples(n: int, k: int = 2) -> list[tuple[str, list[str], dict]]:
    return [(f"Prompt {i}: a dragon opens a bakery.", [f"Story {i}.{j}" for j in range(k)], {"policy": "tiny"})
            for i in range(n)]  # fmt: skip


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "labels.db")
    s.add(samples(3))
    return s


@pytest.fixture()
def serve(tmp_path):
    """serve(**create_app kwargs) -> (base url, Store on the same file); the server stops after the test."""
    servers = []

    def start(**kwargs):
        app = create_app(tmp_path / "labels.db", **kwargs)
        server = BackgroundServer(app)
        url = server.__enter__()
        servers.append(server)
        return url, Store(tmp_path / "labels.db")

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- store


def test_store_is_wal_and_labels_are_unique_per_labeler(store):
    import sqlite3

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
                        "best": 1, "labeler": "ann", "tie": False, "prompt_id": ""}  # fmt: skip
    loaded = load_comparisons(out)
    assert [(c.best, c.labeler, c.tie, c.prompt_id, len(c.responses)) for c in loaded] == [
        (1, "ann", False, "", 2), (0, "ann", True, "", 2), (2, "bob", False, "7", 3)]  # fmt: skip


def test_add_keeps_metadata_and_queues_a_comparison_once(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "P", "responses": ["a", "b"], "policy": "runs/a", "step": 3}) + "\n\n")
    store = Store(tmp_path / "labels.db")
    assert store.add(read_samples(path)) == (1, 0)
    assert store.add(read_samples(path)) == (0, 1)
    import sqlite3

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


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"prompt": "P", "responses": ["a", "b"]}\n{"prompt": "P", "responses": ["a", \n', "line 2 is not valid JSON"),
    ('{"prompt": "P", "responses": ["only one"]}\n', "line 1: 'responses' must be a list of 2 to 4 texts, got 1"),
    ('{"prompt": "  ", "responses": ["a", "b"]}\n', "line 1: 'prompt' is missing or empty"),
    ('{"prompt": "P", "responses": ["a", "b", "c", "d", "e"]}\n', "got 5 responses"),
    ('{"prompt": "P", "responses": ["a", ""]}\n', "response 1 is empty"),
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


# ---------------------------------------------------------------------------------------------- web API


def test_api_round_trip_and_stats(serve):
    url, store = serve(labels_per_comparison=2)
    store.add(samples(2, k=3))
    with httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        first = client.get("/api/next", params={"labeler": "ann"}).json()
        assert first["comparison"]["responses"] == ["Story 0.0", "Story 0.1", "Story 0.2"]
        answer = client.post("/api/label", json={"comparison_id": first["comparison"]["id"], "labeler": "ann",
                                                 "choice": 2})  # fmt: skip
        assert answer.status_code == 200 and answer.json()["stats"]["mine"] == 1
        undone = client.post("/api/undo", json={"labeler": "ann"}).json()
        assert undone["comparison"]["id"] == first["comparison"]["id"] and undone["stats"]["mine"] == 0
        stats = client.get("/api/stats").json()
        assert (stats["done"], stats["queued"], stats["agreement"]) == (0, 2, None)


def test_model_text_is_served_as_json_and_the_page_never_uses_innerhtml(serve):
    url, store = serve()
    store.add([(XSS, [XSS, "</div><b>bold</b>"], {})])
    with httpx.Client(base_url=url, timeout=10) as client:
        answer = client.get("/api/next", params={"labeler": "ann"})
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
    assert resolve_token(host, "my-own-token") == "my-own-token"


def test_serve_beyond_loopback_requires_the_printed_token(tmp_path, monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr(labeling_app.uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    labeling_app.serve(tmp_path / "labels.db", host="0.0.0.0", port=9999)
    printed = capsys.readouterr().out
    token = printed.split("?token=")[1].split()[0]
    assert ran["host"] == "0.0.0.0" and len(token) >= 24
    # the app handed to uvicorn refuses requests without that token (served here on loopback only)
    with BackgroundServer(ran["app"]) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/api/stats").status_code == 401
        assert client.get("/api/stats", headers={"Authorization": "Bearer " + token}).status_code == 200
    with pytest.raises(LabelingError, match="at least 8"):
        resolve_token("0.0.0.0", "short")


def test_token_auth(serve):
    url, store = serve(token="s3cret-token-123")
    store.add(samples(1))
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/").status_code == 200  # the page holds no data
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "s3cret-token-123"}):
            answer = client.get("/api/next", params={"labeler": "ann"}, headers=headers)
            assert answer.status_code == 401 and "access token" in answer.json()["error"]
            answer = client.post("/api/label", json={"comparison_id": 1, "labeler": "ann", "choice": 0}, headers=headers)
            assert answer.status_code == 401
        assert store.labels() == []
        auth = {"Authorization": "Bearer s3cret-token-123"}
        assert client.get("/api/next", params={"labeler": "ann"}, headers=auth).status_code == 200
        assert client.post("/api/label", json={"comparison_id": 1, "labeler": "ann", "choice": 0},
                           headers=auth).status_code == 200  # fmt: skip


def test_bad_requests_get_4xx_with_a_clear_message(serve):
    url, store = serve()
    store.add(samples(2))
    store.label(2, "bob", 0)  # comparison 2 is full (1 label per comparison)
    cases = [  # (method, path, body: dict | bytes, status, words in the error)
        ("POST", "/api/label", {"comparison_id": 999, "labeler": "ann", "choice": 0}, 404, "999 does not exist"),
        ("POST", "/api/label", {"comparison_id": 2, "labeler": "ann", "choice": 0}, 409, "already has its 1 label"),
        ("POST", "/api/label", {"comparison_id": 2, "labeler": "bob", "choice": 1}, 409, "bob already labelled"),
        ("POST", "/api/label", {"comparison_id": 1, "labeler": "ann", "choice": 5}, 400, "must be a response index"),
        ("POST", "/api/label", {"comparison_id": 1, "labeler": "ann", "choice": "best"}, 400, "'tie' or 'skip'"),
        ("POST", "/api/label", {"comparison_id": 1, "labeler": "ann", "choice": True}, 400, "response index"),
        ("POST", "/api/label", {"comparison_id": "1", "labeler": "ann", "choice": 0}, 400, "must be an integer"),
        ("POST", "/api/label", {"comparison_id": 1, "choice": 0}, 400, "labeler name is missing"),
        ("POST", "/api/label", {"comparison_id": 1, "labeler": "x" * 65, "choice": 0}, 400, "at most 64"),
        ("POST", "/api/label", {"labeler": "ann"}, 400, "send comparison_id, labeler and choice"),
        ("POST", "/api/label", {"comparison_id": 1, "labeler": "ann", "choice": 0, "x": 1}, 400, "unknown field"),
        ("POST", "/api/label", b'{"comparison_id": 1, "labeler": ', 400, "not valid JSON"),
        ("POST", "/api/label", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        ("POST", "/api/label", b"[" * 50_000, 400, "not valid JSON"),
        ("POST", "/api/label", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/api/label", b"x" * 70_000, 413, "over the limit"),
        ("POST", "/api/undo", {}, 400, "labeler name is missing"),
        ("GET", "/api/next", None, 400, "labeler name is missing"),
        ("GET", "/api/nope", None, 404, "no such page or endpoint"),
        ("GET", "/api/label", None, 405, "GET is not allowed"),
    ]
    with httpx.Client(base_url=url, timeout=10) as client:
        for method, path, body, status, words in cases:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            answer = client.request(method, path, content=content)
            assert answer.status_code == status, (path, body if not isinstance(body, bytes) else body[:40], answer.text)
            assert words in answer.json()["error"], (words, answer.json())
    assert [(x["comparison_id"], x["labeler"]) for x in store.labels()] == [(2, "bob")]  # nothing bad got in


def test_body_without_content_length_is_refused(serve):
    url, _ = serve()
    host, port = urlparse(url).hostname, urlparse(url).port
    request = (b"POST /api/label HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply


# ---------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("labels_per_comparison", [1, 20])
def test_load_20_concurrent_labelers_50_labels_each(serve, labels_per_comparison):
    """1,000 labels from 20 threads: exactly 1,000 rows, no (comparison, labeler) twice, every comparison with
    exactly its labels_per_comparison labels, every request answered 200. With 1 label each the 20 labelers share
    1,000 comparisons (reservations keep them apart); with 20, all of them label the same 50."""
    n_clients, per_client = 20, 50
    url, store = serve(labels_per_comparison=labels_per_comparison)
    n_comparisons = n_clients * per_client // labels_per_comparison
    store.add(samples(n_comparisons, k=4))
    errors, counts = [], Counter()
    deadline = time.monotonic() + 120  # the test stops by itself even if the server hangs

    def labeler(i: int):
        name = f"labeler-{i:02d}"
        with httpx.Client(base_url=url, timeout=30) as client:
            while counts[name] < per_client and time.monotonic() < deadline:
                got = client.get("/api/next", params={"labeler": name})
                if got.status_code != 200 or got.json()["comparison"] is None:
                    errors.append((name, "next", got.status_code, got.text[:200]))
                    return
                comparison = got.json()["comparison"]
                sent = client.post("/api/label", json={"comparison_id": comparison["id"], "labeler": name,
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
