"""Test helper: Debian's Chromium, headless, driven by Playwright (never Playwright's own browser download).

``.ci/run`` installs the ``chromium`` package; a missing browser fails the tests that need
it (no skip). The flags keep Chromium off the network, which is closed here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY = "window.reportReady === true"


class Browser:
    """One headless Chromium for a test session; :meth:`open` loads a page and collects console errors."""

    def __init__(self):
        path = shutil.which("chromium") or CHROMIUM
        if not Path(path).is_file():
            raise AssertionError(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
        from playwright.sync_api import sync_playwright

        self._profile = tempfile.mkdtemp(prefix="calibrate-chromium-")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            self._profile, executable_path=path, args=FLAGS, headless=True, viewport={"width": 1400, "height": 1000})

    def open(self, html: Path, timeout_ms: int = 60_000):
        """(page, console errors list, seconds until the page said it was ready) for a file."""
        page = self.context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        self.cdp = self.context.new_cdp_session(page)
        self.cdp.send("Performance.enable", {"timeDomain": "threadTicks"})
        start = time.perf_counter()
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_function(READY, timeout=timeout_ms)
        return page, errors, time.perf_counter() - start

    def main_thread_seconds(self) -> float:
        """CPU time the last opened page's main thread spent in tasks so far (Chromium's
        ``TaskDuration`` in thread ticks): what opening it costs, however busy the machine is."""
        metrics = {m["name"]: m["value"] for m in self.cdp.send("Performance.getMetrics")["metrics"]}
        return float(metrics["TaskDuration"])

    def close(self) -> None:
        self.context.close()
        self._pw.stop()
        shutil.rmtree(self._profile, ignore_errors=True)
