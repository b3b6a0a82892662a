"""`glmkit web --tools` in headless Chromium: the model's tool call is run and shown as its own titled message with
the result, and the answer follows. The page is glmkit.serving.web.launch (what `glmkit web` calls) on a model whose
answers are scripted below it (tests.helpers.chat_models.scripted_model), since a tiny random model never calls a
tool."""

from __future__ import annotations

import signal
import sys

import pytest

from tests.helpers.chat_models import build_tiny_glm4_model
from tests.helpers.processes import BROWSER_MARKS, CHROMIUM, CHROMIUM_ARGS, ServerProcess

pytestmark = [pytest.mark.slow, *BROWSER_MARKS]

TOOLS = '''
def get_weather(city: str) -> dict:
    """The weather in a city."""
    return {"city": city, "sky": "sunny"}
'''


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-tools")
    model = build_tiny_glm4_model(root / "tiny-glm4")
    (root / "tools.py").write_text(TOOLS, encoding="utf-8")
    def argv(port: int) -> list[str]:
        return [sys.executable, "-c", "from pathlib import Path; from tests.helpers.chat_models import scripted_model; "
                "from glmkit.serving.toolbox import Toolbox; from glmkit.serving.web import launch; "
                f"m, t = scripted_model(Path({str(model)!r})); launch(m, t, 'tiny-glm4', port={port}, "
                f"tools=Toolbox.from_file({str(root / 'tools.py')!r}))"]

    server = ServerProcess(argv, root, name="the web page", ready_path="/", timeout=120)
    try:
        yield server.url + "/"
    finally:
        server.stop(signal.SIGTERM, timeout=30)


def test_tool_call_shown_in_browser(web):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(web, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#temperature input[type=number]").wait_for(timeout=60_000)
            box = page.locator("#temperature input[type=number]")
            box.fill("0")
            box.press("Enter")
            page.locator("#query textarea").fill("What's the weather in Paris?")
            page.locator("#query textarea").press("Enter")
            page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes("
                                   "'The weather in Paris is sunny.')", timeout=90_000)
            shown = page.locator("#chatbot").inner_text()
            assert 'get_weather({"city": "Paris"})' in shown  # the call's title
            assert shown.index("get_weather(") < shown.index("The weather in Paris is sunny.")
        finally:
            browser.close()
