"""The real FiftyOne App for browser tests: an App server subprocess and headless Chromium.

- :func:`app_server`: a context manager that starts ``python -m fiftyone.server.main`` on
  a free localhost port against this test session's database and plugins dir (the same
  environment as the test, plus ``extra_env``) and yields its URL; the server is stopped
  afterwards.
- :func:`require_playwright`: ``sync_playwright`` (skips the test with the reason when
  Debian's ``chromium`` or Python ``playwright`` is missing).
- :data:`CHROMIUM` / :data:`CHROMIUM_ARGS`: how the browser is launched.
- :func:`dismiss_popover`: closes the App's "Explore Enterprise" popover when it shows.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_playwright():
    """``playwright.sync_api.sync_playwright``; skips when chromium or playwright is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python playwright is not installed (pip install playwright)")
    return sync_playwright


@contextlib.contextmanager
def app_server(tmp, extra_env=None, timeout=90):
    """A FiftyOne App server on this test session's database; yields its URL.

    ``extra_env``: variables added to the server's environment (e.g.
    ``{"FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true"}``). Its log is ``tmp/server.log``.
    """
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp / "server.log"
    log = open(log_path, "wb")
    env = dict(os.environ)  # same FIFTYONE_DATABASE_URI / FIFTYONE_PLUGINS_DIR as this test
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiftyone.server.main", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"App server exited: {log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"App server did not answer in {timeout} s")
                time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)
        log.close()


def stop_process(proc, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dismiss_popover(page):
    """Closes the "Explore Enterprise" popover if it is shown; True when it was."""
    dismiss = page.get_by_text("Dismiss", exact=True)
    if dismiss.count():
        dismiss.first.dispatch_event("click")
        return True
    return False
