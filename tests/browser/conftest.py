"""Real Chromium (Debian's /usr/bin/chromium) driven by Playwright against pytest-django's live server.

Playwright's sync API runs an event loop in the test's thread, so Django's guard against database calls from
async code is lifted for these tests (the calls are ordinary synchronous ones)."""

import html
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from django.core.cache import cache
from django.utils import timezone

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
RECORDER_PORT = 8119
FRAMER_PORT = 8121


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    cache.clear()


@pytest.fixture(scope="session")
def playwright_driver():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing; run `make system-packages` (installs chromium and chromium-driver)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser_page(playwright_driver, tmp_path, request):
    """A fresh Chromium profile (its own --user-data-dir) and page; ``shot(name)`` saves a screenshot.
    ``{"third_party_cookies": "block"}`` (or ``"allow"``) sets the profile's third-party cookie preference
    ("Block third-party cookies", or "Allow third-party cookies"); Debian's Chromium 156 blocks them by
    default, so a control that needs them sent must allow them."""
    options = dict(getattr(request, "param", {}) or {})
    third_party = options.pop("third_party_cookies", None)
    if third_party is not None:
        if third_party not in ("block", "allow"):
            raise ValueError(f"third_party_cookies={third_party!r}; use 'block' or 'allow'")
        block = third_party == "block"
        (tmp_path / "profile" / "Default").mkdir(parents=True)
        preferences = {"profile": {"cookie_controls_mode": int(block), "block_third_party_cookies": block}}
        (tmp_path / "profile" / "Default" / "Preferences").write_text(json.dumps(preferences))
    context = playwright_driver.chromium.launch_persistent_context(
        user_data_dir=str(tmp_path / "profile"),
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        **options,
    )
    page = context.pages[0] if context.pages else context.new_page()
    page.set_default_timeout(15_000)
    folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> Path:
        path = folder / f"{len(list(folder.iterdir())):02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    page.shot = shot
    yield page
    context.close()


class Recorder(ThreadingHTTPServer):
    """A stand-in for Prolific and MTurk on loopback: records each request it gets."""

    def __init__(self, port: int) -> None:
        self.requests: list[dict] = []
        super().__init__(("127.0.0.1", port), _RecorderHandler)


class _RecorderHandler(BaseHTTPRequestHandler):
    def _record(self, body: str) -> None:
        url = urlparse(self.path)
        self.server.requests.append(
            {
                "method": self.command,
                "path": url.path,
                "query": parse_qs(url.query),
                "form": parse_qs(body),
                "cookie": self.headers.get("Cookie"),
                "at": timezone.now(),
            }
        )
        shown = {k: v for k, v in self.server.requests[-1].items() if k != "at"}
        page = f"<html><body><h1>recorded</h1><pre>{json.dumps(shown)}</pre></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def do_GET(self) -> None:
        self._record("")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._record(self.rfile.read(length).decode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder(settings):
    """The recorder, with Prolific's completion URL and MTurk's turkSubmitTo pointed at it."""
    server = Recorder(RECORDER_PORT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{RECORDER_PORT}"
    settings.FOIL_PROLIFIC_COMPLETE_URL = f"{base}/submissions/complete"
    settings.FOIL_MTURK_SUBMIT_TO = [base]
    server.base = base
    yield server
    server.shutdown()
    server.server_close()


class _FramerHandler(BaseHTTPRequestHandler):
    """Serves ``/hit?src=<url>``: a page that shows ``src`` in an iframe, as MTurk's worker site shows a HIT
    whose ExternalQuestion has ``FrameHeight`` 0: a bar on top, the frame filling the rest of the window, the
    HIT's pages scrolling inside it (so a screenshot of the window is what a worker sees)."""

    def do_GET(self) -> None:
        src = parse_qs(urlparse(self.path).query).get("src", [""])[0]
        page = (
            "<!doctype html><html><head><style>"
            "body{margin:0;height:100vh;display:flex;flex-direction:column;font-family:sans-serif}"
            "header{background:#232f3e;color:#fff;padding:0.5rem 1rem}"
            "iframe{flex:1;width:100%;border:0}"
            '</style></head><body><header><h1 style="margin:0;font-size:1.2rem">Worker site</h1></header>'
            '<iframe name="hit" id="hit" src="' + html.escape(src) + '"></iframe></body></html>'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mturk_site():
    """A stand-in for MTurk's worker site on another loopback address (127.0.0.2: another site than the
    study's localhost, so the study's frame is third-party there). ``mturk_site.hit(url)`` is the page framing
    ``url``."""
    server = ThreadingHTTPServer(("127.0.0.2", FRAMER_PORT), _FramerHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.origin = f"http://127.0.0.2:{FRAMER_PORT}"
    server.hit = lambda url: f"{server.origin}/hit?{urlencode({'src': url})}"
    yield server
    server.shutdown()
    server.server_close()
