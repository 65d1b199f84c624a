"""Open a report in Debian's headless Chromium (driven by Playwright, never downloading a browser).

``inspect_page(index, screenshot)`` returns what a reviewer's browser saw: console messages and page
errors, every request, images that failed to load, section ids, the visible text and any dialog.
"""

import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root Chromium needs --no-sandbox; the rest keeps it off the (closed) network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


def require_chromium():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install '.[test]')")


def inspect_page(index, screenshot):
    from playwright.sync_api import sync_playwright

    seen = {"console": [], "requests": [], "failed": [], "dialogs": []}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["console"].append(("pageerror", str(e))))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.on("requestfailed", lambda r: seen["failed"].append(r.url))
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.goto(Path(index).resolve().as_uri())
            page.wait_for_load_state("load")
            seen["images"] = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0}))")
            seen["sections"] = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            seen["text"] = page.inner_text("body")
            seen["scripts"] = page.evaluate("document.scripts.length")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            ctx.close()
    return seen
