"""The Gradio Space (examples/space/app.py) driven as a person would: headless Debian Chromium through
Playwright uploads a photo, types a tweet, submits, and the entity table and the annotated photo appear.

Needs gradio, Playwright's Python package and /usr/bin/chromium (scripts/setup_env.sh installs them);
elsewhere the test skips, except under CI, where a missing piece fails it."""

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port
from test_pipeline import REPO, TWEET, export_tiny_checkpoint
from test_proposers import paint_scene

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MISSING = [
    name for name, present in (
        ("gradio", importlib.util.find_spec("gradio") is not None),
        ("playwright", importlib.util.find_spec("playwright") is not None),
        (CHROMIUM, os.path.exists(CHROMIUM)),
    ) if not present
]

ENTITY_TYPE = re.compile(r"\b(PER|LOC|ORG|OTHER)\b")

pytestmark = pytest.mark.slow


def wait_until_serving(url, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the Space exited with code {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the Space did not answer on {url} within {timeout} s")


def test_space_upload_type_submit_shows_table_and_annotated_image(tmp_path):
    if MISSING:
        message = f"the Space test needs {', '.join(MISSING)}: run scripts/setup_env.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    folder, _ = export_tiny_checkpoint(tmp_path)
    photo = paint_scene(tmp_path / "photo.jpg")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", GRADIO_SSR_MODE="False", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), MQSPN_MODEL=str(folder))
    log = open(tmp_path / "space.log", "w")
    space = subprocess.Popen([sys.executable, str(REPO / "examples" / "space" / "app.py")], cwd=tmp_path, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, space, timeout=180)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(url, wait_until="domcontentloaded")
                page.locator("#photo input[type=file]").set_input_files(str(photo))
                expect(page.locator("#photo img")).to_be_visible()
                page.locator("#tweet textarea").fill(TWEET)
                page.locator("#submit").click()

                # The table lists the entities; the annotated photo appears; the tweet is highlighted.
                expect(page.locator("#entities")).to_contain_text(ENTITY_TYPE, timeout=90_000)
                annotated = page.locator("#annotated img")
                expect(annotated).to_be_visible()
                assert annotated.evaluate("image => image.naturalWidth") >= 160
                expect(page.locator("#highlighted")).to_contain_text(ENTITY_TYPE)
                expect(page.locator("#highlighted")).to_contain_text("Messi")
                page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
            finally:
                browser.close()
    finally:
        space.terminate()
        try:
            space.wait(timeout=20)
        except subprocess.TimeoutExpired:
            space.kill()
            space.wait(timeout=20)
        log.close()
