"""A real headless browser for the tests of the web page: Debian's `chromium`, driven by Playwright.

Playwright is told where the browser is (`executable_path`); `playwright install` is never run, since it
downloads browsers.  Without a browser the tests are skipped on a developer's machine; with
LLMP_REQUIRE_BROWSER=1 (CI sets it, after `.ci/run` installs `chromium`) the skip becomes a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser

BROWSER_ENV = "LLMP_BROWSER"  # the browser's path, if not `chromium` on PATH
REQUIRE_ENV = "LLMP_REQUIRE_BROWSER"
FOREIGN_HOST = "node.test"  # the browser resolves this name to 127.0.0.1: a page asked for by a name that is not loopback's


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(f"{reason} (apt-get install chromium; see .ci/run)")


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[Browser]:
    executable = os.environ.get(BROWSER_ENV) or shutil.which("chromium")
    if executable is None or not Path(executable).exists():
        _missing("no chromium browser found")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install '.[test]')")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            # CI runs as root, where Chromium's sandbox cannot start; containers often have a small /dev/shm.
            args=["--no-sandbox", "--disable-dev-shm-usage", f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"],
        )
        try:
            yield browser
        finally:
            await browser.close()
