"""The labeling page in a real browser: Playwright drives Debian's Chromium (Playwright's own browser download is
not reachable from CI), labels with the keyboard, undoes, and the database shows exactly what was pressed."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup installs it)")

from playwright.sync_api import expect, sync_playwright

from wprlhf.labeling.app import BackgroundServer, create_app
from wprlhf.labeling.store import Store

BROWSERS = ("chromium", "chromium-browser")
TOKEN = "browser-test-token"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
LONG_STORY = "\n\n".join(
    f"Paragraph {i}. The dragon measured flour by the moonlight, because the recipe insisted the bread remember "
    f"where it came from. Nobody in the village had asked for a bakery, but by the third week there was a queue."
    for i in range(1, 16)
)


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


def test_label_with_the_keyboard_undo_and_check_the_database(tmp_path, chromium):
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
    app = create_app(db, token=TOKEN)
    with BackgroundServer(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/?token={TOKEN}")
            expect(page.locator("#name-form")).to_be_visible()
            page.fill("#name-input", "alice")
            page.press("#name-input", "Enter")
            prompt = page.locator("#prompt")
            expect(prompt).to_have_text("A dragon opens a bakery. Write its first review.")
            expect(page.locator("#name-form")).to_be_hidden()
            expect(page.locator("#actions")).to_be_in_viewport()  # tie / skip / undo in view without scrolling
            assert "token" not in page.url  # taken out of the address bar and history
            expect(page.locator(".response")).to_have_count(3)
            expect(page.locator("#progress")).to_contain_text("done 0 / queued 4")
            # each long story scrolls inside its own column, and the page wraps it
            scrolls = page.locator(".response .text").first.evaluate("e => e.scrollHeight > e.clientHeight")
            assert scrolls
            page.screenshot(path=str(tmp_path / "labeling.png"))

            page.keyboard.press("2")  # story 2 of the dragon prompt
            expect(prompt).to_have_text(XSS)
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
            page.keyboard.press("5")  # no fifth story: nothing happens
            page.keyboard.press("s")  # skip the moon
            expect(prompt).to_have_text("A cat inherits a castle.")
            expect(page.locator(".response")).to_have_count(4)
            page.keyboard.press("4")
            expect(page.locator("#empty")).to_be_visible()
            expect(page.locator("#progress")).to_contain_text("done 3 / queued 1")
            page.screenshot(path=str(tmp_path / "labeling-done.png"))
            assert page.evaluate("window.__pwned") is None
        finally:
            browser.close()

    got = [(x["comparison_id"], x["labeler"], x["kind"], x["best"]) for x in store.labels()]
    assert got == [(1, "alice", "best", 1), (2, "alice", "tie", None), (3, "alice", "skip", None),
                   (4, "alice", "best", 3)]  # fmt: skip
    assert (tmp_path / "labeling.png").stat().st_size > 10_000
