"""The app in a real browser: `streamlit run source/app.py` on a free local port, headless
Chromium through Playwright uploads an image and sees the prediction; a screenshot is saved
to test-artifacts/app.png. Needs Debian's chromium (`make browser`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SAMPLE = ROOT / "assets" / "samples" / "digit-7.png"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    # Skipped on a developer's machine without chromium; in CI (`CI` set, as `make test`
    # installs it) a missing browser fails instead of passing quietly.
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason=f"{CHROMIUM} is missing: install it with `make browser` (apt-get install chromium)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(smoke_model, tmp_path):
    """A streamlit server for the smoke model; stopped (its whole process group) at the end."""
    port = free_port()
    env = dict(os.environ, MODEL_PATH=str(smoke_model))
    log = open(tmp_path / "streamlit.log", "w")  # noqa: SIM115 (closed below)
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    server = subprocess.Popen(
        [streamlit, "run", str(ROOT / "source" / "app.py"),
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "streamlit.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "streamlit did not become healthy in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_upload_an_image_in_chromium(app_url, smoke_model):
    from playwright.sync_api import expect, sync_playwright

    [expected] = Predictor(smoke_model, device="cpu").predict(SAMPLE)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            expect(page.get_by_text("Vision Transformer image classifier")).to_be_visible(
                timeout=60_000
            )
            # The examples show first; an upload replaces them.
            expect(page.get_by_text("digit-0.png").first).to_be_visible(timeout=60_000)
            page.locator("input[type=file]").set_input_files(str(SAMPLE))
            expect(page.get_by_text("1 of 1 image(s) classified.")).to_be_visible(timeout=60_000)
            # Streamlit keeps the examples' stale elements until the rerun ends.
            headline = page.get_by_text(
                f"Prediction: {expected.predicted} ({expected.probability:.1%})"
            )
            expect(headline).to_have_count(1, timeout=30_000)
            expect(headline).to_be_visible()
            expect(page.get_by_text("digit-0.png")).to_have_count(0)
            expect(page.get_by_text("Download predictions (CSV)")).to_be_visible()
            page.wait_for_timeout(1500)  # let the chart and table finish drawing
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
