"""Headless Chromium driven through its DevTools protocol (JSON messages over a websocket), for tests of the
pages serve.py serves: open a page, run JavaScript in it, wait for a condition, take a screenshot. Chromium from
the system's packages (`apt-get install chromium`; .ci/run installs it where it can); `find_chromium()` is
None without it, and the tests that need it skip."""

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    return next((path for path in map(shutil.which, NAMES) if path), None)


class Browser:
    """One headless Chromium with one page (a tab). Use as a context manager: the browser and its profile
    folder are removed at the end."""

    def __init__(self, width: int = 1280, height: int = 1500, timeout: float = 60) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        # --no-sandbox: the sandbox needs user namespaces, which containers and root users often lack
        self.process = subprocess.Popen(
            [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start")
            time.sleep(0.1)
        port = port_file.read_text().split("\n")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(target for target in json.load(response) if target["type"] == "page")
        self.connection = contextlib.ExitStack()  # websockets' connection is a context manager
        self.socket = self.connection.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None,
                                                            open_timeout=timeout))
        self.next_id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "connection", None) is not None:
            self.connection.close()
        self.process.kill()
        self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict:
        """One DevTools command; its result (the events that come meanwhile are skipped)."""
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 60) -> None:
        """Goes to `url` and waits until the JavaScript condition `ready` holds."""
        self.call("Page.navigate", url=url)
        self.wait_for(ready, timeout)

    def wait_for(self, condition: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{condition} still false after {timeout} s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
