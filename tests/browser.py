"""A real headless Chromium for the page tests (report.html, compare.html, the API site).

Debian's `chromium`, driven over `--remote-debugging-pipe`: no port, no websocket client, no
network. `audit` is what every page must pass: nothing requested from outside the file, no
script error, nothing wider than the window at 1400 and 800 px, and a screenshot that is not
blank. The `chromium` and `browser` fixtures are registered in `conftest.py`.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium; installs Debian's `chromium` when absent (as .ci/run does)."""
    found = os.environ.get("EXIGO_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be (needs apt-get as root)")
    install = "apt-get update -qq && apt-get install -y -qq chromium"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        install, shell=True, capture_output=True, text=True, timeout=1200, env=environment
    )
    if done.returncode != 0 or shutil.which("chromium") is None:
        pytest.skip(f"installing chromium failed: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium")


class DevTools:
    """A headless Chromium driven over `--remote-debugging-pipe` (JSON messages ending in NUL).

    The pipe needs no port, no websocket client and no network: Chromium reads commands from
    its fd 3 and writes replies and events to its fd 4.
    """

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout  # guards against a hung browser only; nothing is timed
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        # keep our ends away from 3 and 4, which the shell below assigns
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, events_write)]
        os.close(commands_read)
        os.close(events_write)
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
            "--window-size=1400,900", "about:blank",
        ]  # fmt: skip
        # bash (not dash) because the pipe's fd numbers may have two digits
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{high[0]} 4>&{high[1]}', "bash", executable, *flags],
            pass_fds=high,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in high:
            os.close(fd)
        self.commands, self.replies = commands_write, events_read
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], self.timeout)
            chunk = os.read(self.replies, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe or did not answer")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command (to the attached page, once attached) and return its result."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict[str, Any]:
        """The first event named `event` not yet consumed (waiting for it if needed)."""
        while True:
            for index, message in enumerate(self.events):
                if message.get("method") == event:
                    return self.events.pop(index)
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def attach(self, *, offline: bool = False) -> None:
        """Attach to the page and switch on the domains we watch (once)."""
        if self.session:
            return
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]  # fmt: skip
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        if offline:  # every request fails, as on an air-gapped machine
            self.call("Network.emulateNetworkConditions", offline=True, latency=0,
                      downloadThroughput=-1, uploadThroughput=-1)  # fmt: skip

    def open(self, url: str, *, offline: bool = False, width: int = 1400) -> None:
        """Load `url` in a `width` x 900 window and wait for its load event."""
        self.attach(offline=offline)
        self.resize(width)
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def resize(self, width: int, height: int = 900) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def press(self, key: str, code: int) -> None:
        """A person presses and releases `key` (e.g. "ArrowLeft", 37)."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=code)  # fmt: skip

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)  # fmt: skip

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def requested_urls(self) -> list[str]:
        return [
            m["params"]["request"]["url"]
            for m in self.events
            if m.get("method") == "Network.requestWillBeSent"
        ]

    def errors(self) -> list[dict[str, Any]]:
        """Script exceptions and console errors seen so far."""
        found = [m for m in self.events if m.get("method") == "Runtime.exceptionThrown"]
        found += [m for m in self.events if m.get("method") == "Log.entryAdded"
                  and m["params"]["entry"]["level"] == "error"]  # fmt: skip
        return found

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[DevTools]:
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp_path))  # fresh every time
    devtools = DevTools(chromium, profile)
    try:
        yield devtools
    finally:
        devtools.close()


#: Visible elements that reach past the window's edges (those inside a box that scrolls on
#: its own, `.table-wrap`, are allowed to). Every <details> is opened first.
_TOO_WIDE = """(() => {
  for (const details of document.querySelectorAll("details")) details.open = true;
  const width = document.documentElement.clientWidth;
  const wide = [];
  if (document.documentElement.scrollWidth > width + 1) {
    wide.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} > ${width}`);
  }
  for (const element of document.querySelectorAll("body *")) {
    if (element.closest("#lightbox") || element.parentElement.closest(".table-wrap")) continue;
    if (element.closest("svg") && element.tagName.toLowerCase() !== "svg") continue;
    const box = element.getBoundingClientRect();
    if (!box.width || !box.height) continue;
    if (box.right > width + 1 || box.left < -1) {
      const where = `${Math.round(box.left)}..${Math.round(box.right)}`;
      wide.push(`${element.tagName}.${element.className} ${where}`);
    }
  }
  for (const details of document.querySelectorAll("details")) details.open = false;
  return wide.slice(0, 12);
})()"""


@dataclass
class Audit:
    """What `audit` saw: the screenshots it saved (per width) and the URLs the page asked for."""

    screenshots: dict[int, Path] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)


def nonblank_share(png: Path) -> float:
    """Share of the pixels that differ from the screenshot's most common colour."""
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(1 << 24)
    total = sum(count for count, _ in colours)
    return 1 - max(count for count, _ in colours) / total


def audit(
    browser: DevTools, url: str, folder: Path, name: str, *, widths: tuple[int, ...] = (1400, 800)
) -> Audit:
    """Open `url` at each width and check what every exigo page must be.

    Nothing overflows the window, the screenshot of the first screen is not blank (at least 5%
    of its pixels differ from the background, with more than 50 colours), no script error, and
    no request leaves the file (`file:` and `data:` only).

    Args:
        browser: the DevTools session.
        url: the page.
        folder: where the screenshots go (`{name}-{width}.png`).
        name: their stem.
        widths: window widths in CSS pixels.

    Returns:
        The screenshots and the requested URLs.
    """
    seen = Audit()
    for width in widths:
        browser.open(url, width=width)
        too_wide = browser.evaluate(_TOO_WIDE)
        assert too_wide == [], f"{name} at {width} px: {too_wide}"
        shot = browser.screenshot(folder / f"{name}-{width}.png")
        with Image.open(shot) as image:
            assert image.width == width and len(image.getcolors(1 << 24) or []) > 50
        assert nonblank_share(shot) > 0.05, f"{name} at {width} px looks blank"
        seen.screenshots[width] = shot
    seen.urls = browser.requested_urls()
    assert seen.urls and all(u.startswith(("file:", "data:")) for u in seen.urls), seen.urls
    assert browser.errors() == []
    return seen


def screenshot_of(browser: DevTools) -> bytes:
    """The current viewport as PNG bytes (for comparing two moments of one page)."""
    shot = browser.call("Page.captureScreenshot", format="png")
    return base64.b64decode(shot["data"])


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
