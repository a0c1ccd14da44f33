"""Headless Chromium for the dashboard tests: the OS package, driven by Playwright.

Why the system browser: Playwright's own browser download reaches the internet, which
CI machines and air-gapped clusters do not have. Debian's ``chromium`` package
(``make chromium`` installs it) is launched by path, with the flags that keep it from
phoning home (background networking, component updates, sync), a fresh profile, and a
fixed viewport so screenshots are comparable between runs.

Screenshots land in ``test-artifacts/screenshots/`` (gitignored): named ones from
:func:`save_screenshot`, and one per failed test (the ``page`` fixture in conftest).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Request,
    ViewportSize,
    sync_playwright,
)

__all__ = [
    "CHROMIUM_ENV",
    "LAUNCH_ARGS",
    "SCREENSHOT_DIR",
    "VIEWPORT",
    "ChromiumNotFound",
    "RequestLog",
    "find_chromium",
    "launch_chromium",
    "new_context",
    "save_screenshot",
    "screenshot_path",
]

ROOT = Path(__file__).resolve().parents[2]
#: Where screenshots go (kept after the run; gitignored).
SCREENSHOT_DIR = ROOT / "test-artifacts" / "screenshots"
#: Environment variable naming the browser binary to use instead of the system Chromium.
CHROMIUM_ENV = "PLUTO_TEST_CHROMIUM"
_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


class ChromiumNotFound(RuntimeError):
    """No system Chromium (``make chromium`` installs Debian's ``chromium`` package)."""


def find_chromium() -> Path:
    """The browser binary: ``$PLUTO_TEST_CHROMIUM``, else the system Chromium."""
    pinned = os.environ.get(CHROMIUM_ENV)
    if pinned:
        path = Path(pinned)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ChromiumNotFound(f"{CHROMIUM_ENV}={pinned} is not an executable file")
        return path
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ChromiumNotFound(
        "no Chromium at " + ", ".join(_CANDIDATES) + "; run `make chromium` "
        "(apt-get install chromium) or set " + CHROMIUM_ENV)


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """Playwright driving the system Chromium, a fresh profile per launch; never downloads."""
    executable = find_chromium()
    # Playwright must never fetch a browser of its own.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    playwright: Playwright = sync_playwright().start()
    try:
        # Playwright gives every launch a new empty profile (--user-data-dir) of its own.
        browser = playwright.chromium.launch(
            executable_path=str(executable),
            headless=True,
            args=LAUNCH_ARGS,
            chromium_sandbox=False,
        )
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


def new_context(browser: Browser) -> BrowserContext:
    """A fresh context (cookies, localStorage) with the fixed viewport and scale 1."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1,
                                  service_workers="block")
    context.set_default_timeout(10_000)
    return context


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:120] or "screenshot"


def screenshot_path(name: str) -> Path:
    """The path :func:`save_screenshot` uses for ``name``."""
    return SCREENSHOT_DIR / f"{_slug(name)}.png"


def save_screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save ``test-artifacts/screenshots/<name>.png`` (kept after the run)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = screenshot_path(name)
    page.screenshot(path=str(path), full_page=full_page)
    return path


class RequestLog:
    """Every request a page makes, to check it never leaves the server's own origin."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        page.on("request", self._seen)

    def _seen(self, request: Request) -> None:
        self.urls.append(request.url)

    def foreign(self, origin: str) -> list[str]:
        """Requests to anywhere but ``origin`` (``http://host:port``); data: URLs are local."""
        want = urlsplit(origin)
        return [url for url in self.urls
                if not url.startswith(("data:", "blob:", "about:"))
                and (urlsplit(url).scheme, urlsplit(url).netloc) != (want.scheme, want.netloc)]
