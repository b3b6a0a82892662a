"""`glmkit web` in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): the page names the model,
a message gets a streamed answer (seen growing, and equal to what model.chat gives at temperature 0), Clear empties
the chat; a screenshot is saved."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.common import REPO
from tests.helpers.processes import BROWSER_MARKS, CHROMIUM, CHROMIUM_ARGS, ServerProcess

pytestmark = [pytest.mark.slow, *BROWSER_MARKS]


BUNDLED = REPO / "glmkit" / "assets" / "glm-tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The bundled model (so docs/img/web.png shows it), else a tiny random one that never stops early."""
    if (BUNDLED / "model.safetensors").exists():
        return BUNDLED
    return build_tiny_chat_model(tmp_path_factory.mktemp("web") / "tiny-web", "chatglm", endless=True)


def shown_name(model_dir: Path) -> str:
    return "glm-tiny" if model_dir == BUNDLED else model_dir.name


@pytest.fixture(scope="module")
def web(model_dir, tmp_path_factory):
    model = "glm-tiny" if model_dir == BUNDLED else str(model_dir)
    server = ServerProcess(lambda port: [sys.executable, "-m", "glmkit", "web", "--model", model, "--port", str(port)],
                           tmp_path_factory.mktemp("web-log"), name="glmkit web", ready_path="/", timeout=120)
    try:
        yield server.url + "/"
    finally:
        server.stop(signal.SIGTERM, timeout=30)


@pytest.fixture(scope="module")
def page(web):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(web, wait_until="domcontentloaded", timeout=60_000)
            yield page
        finally:
            browser.close()


def set_number(page, elem_id: str, value: str) -> None:
    """Types into the number box Gradio puts beside a slider."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def bot_text(page) -> str:
    bubbles = page.locator("#chatbot .bot")
    return bubbles.last.inner_text().strip() if bubbles.count() else ""


def test_chat_in_browser(page, model_dir, tmp_path):
    from glmkit import load_model, load_tokenizer

    page.locator("#temperature input[type=number]").wait_for(timeout=60_000)  # the page has rendered
    assert f"Model: {shown_name(model_dir)}" in page.locator("#model-name").inner_text()  # the model is named
    for elem_id, label in (("max-length", "max_length"), ("top-p", "top_p"), ("temperature", "temperature")):
        assert label in page.locator(f"#{elem_id}").inner_text(), f"no {label} control"
    set_number(page, "max-length", "120")
    set_number(page, "temperature", "0")

    query = "靜夜思"  # glm-tiny answers it with several lines (a short answer cannot show streaming)
    page.locator("#query textarea").fill(query)
    page.locator("#query textarea").press("Enter")

    # watch the answer grow: several different partial texts before it settles
    seen: list[str] = []
    deadline = time.monotonic() + 90
    stable_since = None
    while time.monotonic() < deadline:
        text = bot_text(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            stable_since = time.monotonic()
        elif seen and stable_since and time.monotonic() - stable_since > 3:
            break
        time.sleep(0.05)
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert all(b.startswith(a[: len(a) - 2]) for a, b in zip(seen, seen[1:])), "partial answers must grow"

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    expected, _ = model.chat(tok, query, history=[], max_length=120, do_sample=False)
    assert " ".join(seen[-1].split()) == " ".join(expected.split())  # the page renders runs of spaces as one
    assert page.locator("#chatbot .user").last.inner_text().strip() == query

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    docs = REPO / "docs" / "img"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, docs / "web.png")

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot .bot').length === 0", timeout=20_000)
