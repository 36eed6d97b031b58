"""The labeling page in a real browser: Playwright drives Debian's Chromium (Playwright's own browser download is
not reachable from CI). A desktop labeler who lost the token, reads the guidelines, labels with the keyboard and
undoes; a phone labeler with right-to-left text, an empty response, a queue held by someone else and a hidden tab;
and hostile pages: one on another local port posting text/plain without CORS, one reached by DNS rebinding. The
database shows exactly what was pressed, and nothing the hostile pages sent. Then a team (issue 39): the layout at
1366x768 and 200 % zoom, right-to-left guidelines, and three invited labelers with a lead, through to the export."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup installs it)")

from playwright.sync_api import expect, sync_playwright

from wprlhf.cli import main
from wprlhf.data import load_comparisons
from wprlhf.labeling.app import BackgroundServer, create_app, lead_html
from wprlhf.labeling.store import Store

BROWSERS = ("chromium", "chromium-browser")
TOKEN = "browser-test-token"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
LONG_STORY = "\n\n".join(
    f"Paragraph {i}. The dragon measured flour by the moonlight, because the recipe insisted the bread remember "
    f"where it came from. Nobody in the village had asked for a bakery, but by the third week there was a queue."
    for i in range(1, 16)
)
HEBREW_PROMPT = "דרקון פותח מאפייה. כתבו את הביקורת הראשונה שלו."
ARABIC_STORY = "\n\n".join(f"الفقرة {i}. فتح التنين مخبزاً في القرية، وكان الخبز يتذكر من أين جاء."
                           for i in range(1, 30))  # fmt: skip
GUIDELINES = "# How to judge\n\nPick the story you would **rather read**.\n\n- Ignore typos\n- <b>not bold</b>\n"
# Records every response card that gets the "chosen" class: the highlight lasts a moment, too short to poll for.
WATCH_CHOSEN = """() => {
  window.__chosen = [];
  new MutationObserver((records) => records.forEach((r) => {
    if (r.target.classList.contains("chosen")) window.__chosen.push(r.target.dataset.index);
  })).observe(document.getElementById("responses"), { attributes: true, subtree: true, attributeFilter: ["class"] });
}"""

# Headless tabs are never hidden: this makes the page believe it was (switched away from, or the phone locked).
SET_VISIBILITY = """(state) => {
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


def wait_until(page, condition, timeout_s: float = 5.0) -> None:
    """Poll a condition outside the page (the database, the server's log) while the page goes on working."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        page.wait_for_timeout(50)
    assert condition()


def _find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when running as root (as CI does), else the test skips."""
    path = _find_chromium()
    if path:
        return path
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium binary found and not root to apt-get it: install Debian's `chromium` package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(command, check=True, capture_output=True, timeout=900, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        output = getattr(err, "stderr", b"") or b""
        pytest.skip(f"could not install chromium with apt-get ({err}): {output.decode(errors='replace')[-300:]}")
    path = _find_chromium()
    if not path:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    """One browser for the module (each test gets its own context). attacker.example resolves to this machine,
    as it would for a page that rebinds its DNS name to 127.0.0.1."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--host-resolver-rules=MAP attacker.example 127.0.0.1"])  # fmt: skip
        yield browser
        browser.close()


class Recorder:
    """ASGI wrapper noting (method, path, status) of every request: proves a hostile request reached the server
    and was refused there, rather than never being sent."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                self.seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record)


def test_desktop_token_guidelines_keyboard_and_undo(tmp_path, browser):
    db = tmp_path / "labels.db"
    store = Store(db)
    store.add([
        ("A dragon opens a bakery. Write its first review.", [LONG_STORY, "Short and sweet: the croissants bit back.",
                                                             "Four stars. Would be eaten again."], {}),
        (XSS, [XSS, "</div></article><h1>not a heading</h1>"], {}),
        ("The moon files a complaint.", ["Dear Sun, you are too bright.", "To whom it may concern: the tides."], {}),
        ("A cat inherits a castle.", ["It naps in every room.", "It fires the dog.", "It sells the moat.",
                                      "It learns the lute."], {}),
    ])  # fmt: skip
    app = create_app(db, token=TOKEN, instructions=GUIDELINES, min_read_seconds=0)  # timing: its own test
    with BackgroundServer(app) as url:
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        # a labeler who lost the ?token= part of the link gets a plain question, not an API error
        page.goto(f"{url}/")
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#token-form")).to_contain_text("access code")
        for developer_words in ("Bearer", "Authorization", "401", "token"):
            assert developer_words not in page.locator("main").inner_text()
        page.fill("#token-input", "wrong-code")
        page.press("#token-input", "Enter")
        expect(page.locator("#message")).to_contain_text("not accepted")
        page.fill("#token-input", f"{url}/?token={TOKEN}")  # the whole link works as well as the code
        page.press("#token-input", "Enter")

        expect(page.locator("#name-form")).to_be_visible()
        page.fill("#name-input", "alice")
        page.press("#name-input", "Enter")
        # the guidelines come before the first item, rendered as text with a little Markdown
        expect(page.locator("#guidelines")).to_be_visible()
        expect(page.locator("#guidelines-text h3")).to_have_text("How to judge")
        expect(page.locator("#guidelines-text strong")).to_have_text("rather read")
        expect(page.locator("#guidelines-text li")).to_have_text(["Ignore typos", "<b>not bold</b>"])
        assert page.locator("#guidelines-text b").count() == 0
        page.keyboard.press("1")  # keys don't label while the guidelines are open
        page.click("#guidelines-close")

        prompt = page.locator("#prompt")
        expect(prompt).to_have_text("A dragon opens a bakery. Write its first review.")
        expect(page.locator("#actions")).to_be_in_viewport()  # tie / skip / undo in view without scrolling
        assert "token" not in page.url  # taken out of the address bar and history
        expect(page.locator(".response")).to_have_count(3)
        expect(page.locator("#progress")).to_contain_text("done 0 / queued 4")
        # each long story scrolls inside its own column, and the page wraps it
        assert page.locator(".response .text").first.evaluate("e => e.scrollHeight > e.clientHeight")
        page.screenshot(path=str(tmp_path / "labeling.png"))

        page.evaluate(WATCH_CHOSEN)
        page.keyboard.press("2")  # story 2 of the dragon prompt
        expect(prompt).to_have_text(XSS)
        assert page.evaluate("window.__chosen") == ["1"]  # story 2 was highlighted before the next item came
        # model text shows as text: no element was made from it and no script ran
        assert page.locator("#prompt-box script, #responses script, #responses img, #responses h1").count() == 0
        expect(page.locator(".response .text").first).to_have_text(XSS)
        assert page.evaluate("window.__pwned") is None
        page.keyboard.press("1")
        expect(prompt).to_have_text("The moon files a complaint.")
        page.keyboard.press("u")  # undo the XSS comparison's label: it comes back
        expect(prompt).to_have_text(XSS)
        expect(page.locator("#message")).to_have_text("Undone: choose again.")
        page.keyboard.press("t")  # now a tie
        expect(prompt).to_have_text("The moon files a complaint.")
        page.click("#show-guidelines")  # the guidelines again, on demand, and back to the same item
        expect(page.locator("#guidelines-close")).to_have_text("Back to labelling")
        page.click("#guidelines-close")
        expect(prompt).to_have_text("The moon files a complaint.")
        page.keyboard.press("5")  # no fifth story: nothing happens
        page.keyboard.press("s")  # skip the moon
        expect(prompt).to_have_text("A cat inherits a castle.")
        expect(page.locator(".response")).to_have_count(4)
        page.keyboard.press("4")
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#empty-text")).to_contain_text("Nothing is left")
        expect(page.locator("#progress")).to_contain_text("done 3 / queued 1")
        expect(page.locator("#progress")).to_contain_text("you: 3 answered, 1 skipped")
        page.screenshot(path=str(tmp_path / "labeling-done.png"))
        assert page.evaluate("window.__pwned") is None
        page.context.close()

    got = [(x["comparison_id"], x["labeler"], x["kind"], x["best"]) for x in store.labels()]
    assert got == [(1, "alice", "best", 1), (2, "alice", "tie", None), (3, "alice", "skip", None),
                   (4, "alice", "best", 3)]  # fmt: skip
    assert len({x["session"] for x in store.labels()}) == 1 and store.labels()[0]["session"]  # one page, one session
    assert (tmp_path / "labeling.png").stat().st_size > 10_000


def test_phone_rtl_empty_response_waiting_queue_and_hidden_tab(tmp_path, browser):
    db = tmp_path / "labels.db"
    store = Store(db)
    store.add([
        (HEBREW_PROMPT, [ARABIC_STORY, "A short English answer."], {}),
        ("Say something, dragon.", ["", LONG_STORY], {}),
        ("The moon files a complaint.", ["Dear Sun, you are too bright.", "To whom it may concern: the tides."], {}),
    ])  # fmt: skip
    with BackgroundServer(create_app(db, min_read_seconds=0)) as url:
        context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = context.new_page()
        page.clock.install()  # the page's 10 s poll runs when the test moves time on, not after a wait
        page.goto(f"{url}/")
        page.fill("#name-input", "noa")
        page.locator("#name-form button").tap()
        prompt = page.locator("#prompt")
        expect(prompt).to_have_text(HEBREW_PROMPT)
        # dir=auto: Hebrew and Arabic run right to left, English left to right, in one page
        texts = page.locator(".response .text")
        assert prompt.get_attribute("dir") == "auto" and texts.first.get_attribute("dir") == "auto"
        direction = "e => getComputedStyle(e).direction"
        assert (prompt.evaluate(direction), texts.nth(0).evaluate(direction), texts.nth(1).evaluate(direction)) == (
            "rtl", "rtl", "ltr")  # fmt: skip

        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        texts.first.evaluate("e => { e.scrollTop = e.scrollHeight; }")
        page.locator(".response .pick").nth(1).tap()  # the second story's button, far down the page
        expect(prompt).to_have_text("Say something, dragon.")
        # the next item opens at its top: the page and each story scrolled back up
        assert page.evaluate("window.scrollY") == 0
        assert texts.evaluate_all("boxes => boxes.map((b) => b.scrollTop)") == [0, 0]
        expect(prompt).to_be_in_viewport()
        # an empty response is shown as such, in a muted style, and can be picked
        expect(texts.first).to_have_text("(empty response)")
        expect(texts.first).to_have_class("text empty")
        page.screenshot(path=str(tmp_path / "phone.png"))

        squatter = store.open_session("squatter")
        assert store.next_for("squatter", squatter)["id"] == 3  # someone else's page holds the last one
        page.locator("[data-choice=skip]").tap()
        expect(page.locator("#empty-text")).to_contain_text("Waiting: 1 comparison is open on other labelers' screens")
        expect(page.locator("#progress")).to_contain_text("you: 1 answered, 1 skipped")  # a skip is no answer
        store.release("squatter", squatter)  # the squatter closed their tab
        page.clock.fast_forward(10_000)
        expect(prompt).to_have_text("The moon files a complaint.")

        def lease_holders():
            with sqlite3.connect(db) as con:
                return [row[0] for row in con.execute("SELECT labeler FROM assignments")]

        # a hidden tab gives its comparison back; visible again, it takes the same one back
        assert lease_holders() == ["noa"]
        page.evaluate(SET_VISIBILITY, "hidden")
        wait_until(page, lambda: lease_holders() == [])
        page.evaluate(SET_VISIBILITY, "visible")
        wait_until(page, lambda: lease_holders() == ["noa"])
        expect(prompt).to_have_text("The moon files a complaint.")
        context.close()

    got = [(x["comparison_id"], x["labeler"], x["kind"], x["best"]) for x in store.labels()]
    assert got == [(1, "noa", "best", 1), (2, "noa", "skip", None)]


def test_pages_from_other_origins_or_host_names_cannot_label(tmp_path, browser):
    """A page on another local port posts text/plain with mode no-cors (no preflight, so the browser sends it),
    and sendBeacon does the same; a page reached as attacker.example (DNS rebinding) is refused outright."""
    db = tmp_path / "labels.db"
    store = Store(db)
    store.add([("The moon files a complaint.", ["Dear Sun.", "To whom it may concern."], {})])
    session = store.open_session("alice")  # the worst case: the hostile page even knows a live session id

    class Hostile(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>cute cats</title><p>nothing to see here</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    hostile = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    recorder = Recorder(create_app(db))
    try:
        with BackgroundServer(recorder) as url:
            page = browser.new_context().new_page()
            page.goto(f"http://127.0.0.1:{hostile.server_address[1]}/")
            page.evaluate("""async ({ target, session }) => {
                const body = JSON.stringify({ session, comparison_id: 1, choice: 0 });
                await fetch(target + "/api/label", { method: "POST", mode: "no-cors",
                                                     headers: { "Content-Type": "text/plain" }, body });
                const next = JSON.stringify({ session });
                await fetch(target + "/api/next", { method: "POST", mode: "no-cors", body: next });
                navigator.sendBeacon(target + "/api/label", body);
            }""", {"target": url, "session": session})  # fmt: skip
            wait_until(page, lambda: len(recorder.seen) >= 3)  # the beacon goes out in the background
            assert recorder.seen == [("POST", "/api/label", 403), ("POST", "/api/next", 403),
                                     ("POST", "/api/label", 403)]  # fmt: skip

            rebound = page.goto(f"http://attacker.example:{urlparse(url).port}/")
            assert rebound.status == 400 and "--allowed-host" in page.content()
            page.context.close()
    finally:
        hostile.shutdown()
        hostile.server_close()
    assert store.labels() == []
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------- a team (issue 39)

HEBREW_GUIDELINES = "# איך לשפוט\n\nבחרו את הסיפור שהייתם מעדיפים לקרוא.\n\n- התעלמו משגיאות כתיב\n"
MIN_READ = 0.5  # seconds: the server's minimum time on screen, short here (2 s in use) to keep the test quick


def inside_viewport(page, selector: str) -> bool:
    box, size = page.locator(selector).bounding_box(), page.viewport_size
    return (box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= size["width"] + 0.5
            and box["y"] + box["height"] <= size["height"] + 0.5)  # fmt: skip


def test_actions_and_errors_stay_in_view_at_1366x768_and_200_percent_and_rtl_guidelines(tmp_path, browser):
    """At 1366x768 "Failed to fetch" appeared below the fold and the action row was cut off; at 200 % zoom the
    page was hard to use; Hebrew guidelines ran left to right. 200 % zoom of a 1366x768 screen is a 683x384 CSS
    pixel viewport drawn at scale 2."""
    db = tmp_path / "labels.db"
    Store(db).add([(f"A dragon opens bakery {i}. " * 12, [LONG_STORY, LONG_STORY[::-1], LONG_STORY], {})
                   for i in range(2)])  # one for each screen: the first page's lease holds its own
    with BackgroundServer(create_app(db, instructions=HEBREW_GUIDELINES, min_read_seconds=0)) as url:
        for width, height, scale in ((1366, 768, 1), (683, 384, 2)):
            context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=scale)
            page = context.new_page()
            page.goto(f"{url}/")
            page.fill("#name-input", "dana")
            page.press("#name-input", "Enter")
            paragraphs = page.locator("#guidelines-text p, #guidelines-text li, #guidelines-text h3")
            expect(paragraphs).to_have_count(3)
            assert paragraphs.evaluate_all("ps => ps.map((p) => getComputedStyle(p).direction)") == ["rtl"] * 3
            page.click("#guidelines-close")
            expect(page.locator(".response")).to_have_count(3)
            page.route("**/api/label", lambda route: route.abort())  # the network fails as the answer is sent
            page.keyboard.press("2")
            expect(page.locator("#message")).to_contain_text("Failed to fetch")
            for selector in ("#actions", "#message", "[data-choice=tie]", "[data-choice=skip]", "#undo"):
                assert inside_viewport(page, selector), (width, selector, page.locator(selector).bounding_box())
            page.screenshot(path=str(tmp_path / f"layout-{width}x{height}.png"))
            context.close()


def answer(page, key: str) -> None:
    """Wait out the minimum time on screen, press `key`, and wait for the next item (or the empty queue)."""
    before = page.locator("#prompt").inner_text()
    page.wait_for_timeout(MIN_READ * 1000 + 100)
    page.keyboard.press(key)
    page.wait_for_function("(before) => document.getElementById('task').hidden || "
                           "document.getElementById('prompt').textContent !== before", arg=before)  # fmt: skip


def test_three_labelers_with_invites_a_held_key_an_undo_after_reload_and_the_leads_view(tmp_path, browser):
    """A labeling job as a team runs it: three invited labelers on a desktop, a phone and a dark 1920x1080
    screen, two answers per comparison. A key held down labels once; an undo after a reload works; labelers see
    no agreement; the lead sees kappa and settles a disagreement. The export then holds every answer exactly once
    with its lineage, and the data loader of `rm train` and `dpo` reads it."""
    db = tmp_path / "labels.db"
    store = Store(db, labels_per_comparison=2)
    store.add([(f"Prompt {i}: the moon opens a bakery.", [f"Story {i}, told first.", f"Story {i}, told second."],
                {"prompt_id": i}) for i in range(4)])  # fmt: skip
    links = {name: store.invite(name) for name in ("Ann", "bob", "cy")}
    lead_link = store.invite("Lee", role="lead")
    screens = {"bob": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True},
               "cy": {"viewport": {"width": 1920, "height": 1080}, "color_scheme": "dark"},
               "ann": {"viewport": {"width": 1366, "height": 768}}}  # fmt: skip
    keys = {"ann": "1", "bob": "2", "cy": "1"}
    with BackgroundServer(create_app(db, min_read_seconds=MIN_READ)) as url:
        pages = {}
        for name, options in screens.items():
            pages[name] = browser.new_context(**options).new_page()
            pages[name].goto(f"{url}/?token={links[name.capitalize() if name == 'ann' else name]}")
            expect(pages[name].locator("#labeler-name")).to_have_text(name)  # from the invite, not a text box
            expect(pages[name].locator("#change-name")).to_be_hidden()
            expect(pages[name].locator("#prompt")).to_contain_text("Prompt")
        ann = pages["ann"]  # opened last: her item is on screen for less than MIN_READ
        ann.keyboard.press("1")  # at once: nobody read it yet
        expect(ann.locator("#message")).to_contain_text("Read the stories first")
        ann.wait_for_timeout(MIN_READ * 1000 + 100)
        first = ann.locator("#prompt").inner_text()
        for _ in range(6):  # held down: one keydown, then auto-repeats
            ann.keyboard.down("1")
        ann.keyboard.up("1")
        expect(ann.locator("#prompt")).not_to_have_text(first)
        assert [x["labeler"] for x in store.labels()] == ["ann"]  # one label, not six

        cy = pages["cy"]
        answer(cy, "1")
        undone = [x for x in store.labels() if x["labeler"] == "cy"][0]
        cy.reload()
        expect(cy.locator("#prompt")).to_contain_text("Prompt")
        cy.keyboard.press("u")
        expect(cy.locator("#message")).to_have_text("Undone: choose again.")
        expect(cy.locator("#prompt")).to_have_text(store.comparisons()[undone["comparison_id"] - 1]["prompt"])
        assert "cy" not in [x["labeler"] for x in store.labels()]

        while any(page.locator("#task").is_visible() for page in pages.values()):
            for name, page in pages.items():
                if page.locator("#task").is_visible():
                    answer(page, keys[name])
        for page in pages.values():
            assert "agreement" not in page.locator("body").inner_text().lower()
            page.context.close()
        assert store.stats()["done"] == 4

        lead = browser.new_context().new_page()
        lead.goto(f"{url}/lead?token={lead_link}")
        expect(lead.locator("#overall")).to_contain_text("Fleiss' kappa")
        expect(lead.locator("#pairs tbody tr")).not_to_have_count(0)
        assert "Cohen's kappa" in lead.locator("#pairs").inner_text()
        card = lead.locator(".review").first
        card.locator("button[data-choice='0']").click()
        expect(card.locator(".decided")).to_contain_text("Adjudicated by lee: story 1")
        (tmp_path / "lead.html").write_text(lead_html(store.lead_report()))  # `label status --html`: one file
        lead.goto((tmp_path / "lead.html").as_uri())
        expect(lead.locator("#overall")).to_contain_text("Fleiss' kappa")
        expect(lead.locator(".review .decided").first).to_contain_text("Adjudicated by lee")
        assert lead.locator(".review button").count() == 0  # read-only: adjudicate on the server
        lead.context.close()

    labels = store.labels()
    assert len(labels) == 8 and len({x["id"] for x in labels}) == 8 and undone["id"] not in {x["id"] for x in labels}
    out = tmp_path / "comparisons.jsonl"
    (settled,) = store.adjudications()
    assert store.export(out) == 9
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["label_id"] for x in lines[:8]) == sorted(x["id"] for x in labels)  # each answer exactly once
    for line in lines[:8]:
        assert line["labeler"] in keys and line["session"] and line["created_at"] and line["shown_at"]
    assert lines[8]["adjudicated"] is True and lines[8]["adjudication_id"] == settled["id"]
    loaded = load_comparisons(out)
    assert len(loaded) == 9 and {c.labeler for c in loaded} == {"ann", "bob", "cy", "lee"}
    # The two commands that learn from labels read the export as it is (tiny random models: seconds).
    assert main(["rm", "train", "--model", "tiny", "--data", str(out), "--val-fraction", "0", "--batch-size", "4",
                 "--out", str(tmp_path / "rm")]) == 0  # fmt: skip
    assert main(["dpo", "--policy", "tiny", "--data", str(out), "--val-fraction", "0", "--batch-size", "4",
                 "--epochs", "1", "--out", str(tmp_path / "dpo")]) == 0  # fmt: skip
    assert (tmp_path / "rm" / "config.json").exists() and (tmp_path / "dpo" / "policy" / "config.json").exists()
