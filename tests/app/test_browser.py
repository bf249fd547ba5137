"""The page in a real browser: ``histodetect serve --token`` in a subprocess, Debian's Chromium driven by Playwright,
logged in as a user is: by opening the address the command prints (``/?token=...``).

Nothing is downloaded: Playwright launches the system's Chromium (``apt-get install chromium``; ``.ci/run``
installs it), and the test skips, saying so, only where none is found. The screenshot goes to the test's temporary
folder, and also to ``$HISTODETECT_SCREENSHOT`` when set (the docs' own ``docs/webapp.png`` is made by
``docs/make_pictures.py``, from a trained run).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from histodetect.infer.engine import Predictor

CHROMIUM = next(
    (path for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if path),
    None,
)
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or not Path(CHROMIUM).exists(), reason="no Chromium found (apt-get install chromium)"
    ),
    pytest.mark.slow,  # a browser and a server process of their own
]


@pytest.fixture(scope="module")
def served_url(served_run: Path, free_port: Callable[[], int]) -> Iterator[str]:
    """``histodetect serve RUN`` with a token (from ``HISTODETECT_TOKEN``) as a user starts it, on a free loopback
    port; yields the address it prints to open; stopped after the module."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HISTODETECT_TOKEN": "browser-test-token"}
    command = [sys.executable, "-m", "histodetect", "serve", str(served_run), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert process.stdout is not None
        printed = next((line for line in process.stdout if "?token=" in line), "")  # "" once the process ended
        address = re.search(r"http://\S+\?token=\S+", printed)
        assert address is not None and address.group() == f"{url}/?token=browser-test-token", printed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield address.group()
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_page_scores_a_patch_as_predict_does_and_shows_a_bad_files_error(
    served_url: str, reference: Predictor, patch_files: list[Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    patches = patch_files[:3]
    expected = reference.predict(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in patches]))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            stranger = browser.new_page()  # no cookie: told how to get in, nothing more
            refused = stranger.goto(served_url.split("?")[0])
            assert refused is not None and refused.status == 401
            expect(stranger.locator("body")).to_contain_text("?token=")
            page = browser.new_page(viewport={"width": 860, "height": 760})
            page.goto(served_url)  # logs in: the cookie is set and the token leaves the address
            assert page.url == served_url.split("?")[0]
            expect(page.locator("#model")).to_contain_text("baseline-cnn")
            page.locator("#patches").set_input_files([str(p) for p in patches])
            for path, p in zip(patches, expected, strict=True):
                card = page.locator(".card", has_text=path.name)
                shown = card.locator(".probability")
                expect(shown).to_be_visible(timeout=30_000)
                assert float(shown.inner_text()) == pytest.approx(float(p), abs=5e-5 + 1e-5)
                assert abs(float(shown.get_attribute("data-probability")) - float(p)) <= 1e-5
                expect(card.locator("img[alt='Grad-CAM of the patch']")).to_be_visible(timeout=30_000)
            page.locator("#patches").set_input_files(str(bad))
            error = page.locator(".card", has_text="notes.png").locator(".error")
            expect(error).to_contain_text("unreadable", timeout=30_000)
            tiles = [np.asarray(Image.open(p).convert("RGB")) for p in patch_files[:4]]
            region = tmp_path / "region.png"
            rows = [np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)]
            Image.fromarray(np.concatenate(rows)).save(region)  # 192x192
            page.locator("#region").set_input_files(str(region))
            expect(page.locator("#region-result img")).to_be_visible(timeout=60_000)
            expect(page.locator("#region-result dl")).to_contain_text("192 x 192")
            page.keyboard.press("Tab")  # the page is reachable by keyboard: focus lands on a control
            assert page.evaluate("document.activeElement.tagName") in {"SUMMARY", "INPUT", "A"}
            shot = page.screenshot(path=str(tmp_path / "webapp.png"), full_page=True)
            if target := os.environ.get("HISTODETECT_SCREENSHOT"):  # 256 colours: small enough for a repository
                Image.open(io.BytesIO(shot)).quantize(256).save(target, optimize=True)
            page.set_viewport_size({"width": 380, "height": 800})  # a phone's width: nothing wider than the screen
            assert page.evaluate("document.documentElement.scrollWidth") <= 380
        finally:
            browser.close()
