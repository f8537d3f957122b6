"""Browser fixtures: the real ComfyUI server with this pack, and Debian's Chromium driven by Playwright.

Chromium is the system's ``/usr/bin/chromium`` (``scripts/setup_env.sh`` installs it; Playwright's
own browser downloads are never used). Without Chromium or Playwright every test here is skipped
with the reason. Each test gets a fresh page (so a fresh client id); the browser profile is a new
temporary directory per session.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from devkit.server import ComfyServer

CHROMIUM = Path(os.environ.get("CONCEPT_ATTENTION_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_MARKERS = ("concept_attention", "concept-attention")  # in our script's URL and messages
PAGE_READY_TIMEOUT_MS = 120_000
LOG_TAIL_CHARS = 8000


def missing_requirement() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (scripts/setup_env.sh does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed: pip install -r tests/requirements.txt"
    return None


@pytest.fixture(autouse=True, scope="session")
def _browser_requirements() -> None:
    """Skip every browser test, with the reason, where Chromium or Playwright is missing."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)



@pytest.fixture(scope="session")
def browser_server(tmp_path_factory: pytest.TempPathFactory, _browser_requirements: None) -> Iterator[ComfyServer]:
    """A ComfyUI server for the browser tests (new-user dialogs switched off); stopped by PID."""
    server = ComfyServer(workdir=tmp_path_factory.mktemp("browser_server"))
    try:
        server.start()
        print(f"\nComfyUI (browser tests) up on {server.url} in {server.startup_s:.1f}s", file=sys.stderr)
        for key in ("Comfy.TutorialCompleted",):
            requests.post(f"{server.url}/settings/{key}", json=True, timeout=30).raise_for_status()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory, _browser_requirements: None) -> Iterator[Any]:
    """One headless Chromium with a fresh profile directory for the session."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        try:
            yield context
        finally:
            context.close()


@dataclass
class PageLog:
    """Console messages and uncaught errors of one page."""

    console: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, script url)
    uncaught: list[str] = field(default_factory=list)

    def pack_errors(self) -> list[str]:
        """Errors that come from (or name) this pack's extension; the stock front end's own
        complaints (404s of optional files, no internet) are not ours to judge."""
        found = [f"{text} ({url})" for kind, text, url in self.console
                 if kind == "error" and any(m in f"{text} {url}" for m in PACK_MARKERS)]
        found += [text for text in self.uncaught if any(m in text for m in PACK_MARKERS)]
        return found


@dataclass
class ComfyPage:
    """A loaded ComfyUI page and what it logged."""

    page: Any
    log: PageLog
    server: ComfyServer

    def js(self, script: str, arg: Any = None) -> Any:
        """Evaluate ``script`` (a function expression) in the page."""
        return self.page.evaluate(script, arg)

    @property
    def client_id(self) -> str:
        return self.js("() => window.comfyAPI.api.api.clientId")


def wait_for_settled_graph(page: Any, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Wait until the graph's nodes stop changing (the start-up graph has finished loading)."""
    signature = "() => app.graph.nodes.map(n => `${n.id}:${n.type}`).join(',')"
    deadline = time.monotonic() + timeout_s
    last, since = page.evaluate(signature), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = page.evaluate(signature)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


@pytest.fixture
def comfy_page(browser_server: ComfyServer, browser_context: Any,
               request: pytest.FixtureRequest) -> Iterator[ComfyPage]:
    """A fresh tab on the server's front end, ready once the app and this extension are loaded."""
    log = PageLog()
    page = browser_context.new_page()
    page.on("console", lambda m: log.console.append((m.type, m.text, m.location.get("url", ""))))
    page.on("pageerror", lambda e: log.uncaught.append(f"{e}\n{getattr(e, 'stack', '')}"))
    # The front end reopens the profile's last workflows (kept in localStorage) after it starts,
    # asynchronously; every test begins from the default graph instead.
    page.add_init_script("try { window.localStorage.clear(); } catch (e) {}")
    try:
        page.goto(browser_server.url, wait_until="load")
        page.wait_for_function("() => window.app && window.app.graph && window.conceptAttention "
                               "&& window.comfyAPI.api.api.clientId", timeout=PAGE_READY_TIMEOUT_MS)
        wait_for_settled_graph(page)
        yield ComfyPage(page, log, browser_server)
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            shot = Path(browser_server.workdir) / f"{request.node.name}.png"
            try:
                page.screenshot(path=str(shot))
            except Exception:  # noqa: BLE001 - a screenshot is only a help
                pass
            print(f"\n----- page console ({len(log.console)} messages; screenshot {shot}) -----")
            for kind, text, url in log.console[-40:]:
                print(f"[{kind}] {text[:500]} ({url})")
            print(f"----- ComfyUI server log tail -----\n{browser_server.log_tail(LOG_TAIL_CHARS)}")
        page.close()
