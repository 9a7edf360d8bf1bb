"""Start and stop ``spatial-msma view`` in a child process (tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Flags for Debian's chromium on a machine without a display or network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_viewer(work: Path, *extra: str, timeout_s: float = 90.0, env: dict | None = None):
    """Start the viewer on a free loopback port with its work folder under ``work``.

    Returns ``(process, url, port)`` once the page is served; raises with the server log if
    it exits or does not answer within ``timeout_s``."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    log_path = work / f"server_{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "SpatialMSMALib.cli", "view", "--port", str(port),
             "--work-dir", str(work / f"work_{port}"), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the viewer exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
            return process, url, port
        except OSError:
            time.sleep(0.5)
    stop_viewer(process)
    raise RuntimeError(f"the viewer did not answer within {timeout_s:.0f} s")


def stop_viewer(process) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def overlay_pixels(rgb) -> int:
    """Pixels of an ``(H, W, 3)`` uint8 screenshot coloured by the overlay (saturated: the
    segments' colours and the hot heat map) rather than grey anatomy."""
    rgb = rgb.astype(int)
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).sum())


def views_differ(a, b, tolerance: float = 0.05) -> bool:
    """Whether two view screenshots differ: a different size (the page re-laid out the view,
    e.g. while the progress bar appears) or a mean absolute difference above ``tolerance``
    grey levels."""
    import numpy as np

    if a.shape != b.shape:
        return True
    return bool(np.abs(a.astype(int) - b.astype(int)).mean() > tolerance)


class ViewerPage:
    """A Playwright page on the viewer, with the few reads the tests and benchmarks need."""

    def __init__(self, page):
        self.page = page

    @classmethod
    def open(cls, browser, url: str, timeout_s: float = 60.0) -> ViewerPage:
        page = browser.new_page(viewport={"width": 1400, "height": 900},
                                accept_downloads=True)
        page.goto(url)
        page.wait_for_selector("#detect-button", timeout=timeout_s * 1000)
        return cls(page)

    def state(self, name: str):
        return self.page.evaluate(f"window.trame.state.get('{name}')")

    def set_state(self, name: str, value) -> None:
        self.page.evaluate("([n, v]) => window.trame.state.set(n, v)", [name, value])

    def wait_state(self, expression: str, timeout_s: float = 60.0) -> None:
        """Wait until a JavaScript expression over the trame state ``s`` is true."""
        self.page.wait_for_function(
            f"() => {{ const s = window.trame.state; return {expression}; }}",
            timeout=timeout_s * 1000)

    def view_shot(self, index: int = 0, save: Path | None = None):
        """Screenshot of one rendered view (0: axial) as ``(H, W, 3)`` uint8."""
        from io import BytesIO

        import numpy as np
        from PIL import Image

        png = self.page.locator("img.image-display-area").nth(index).screenshot()
        if save is not None:
            Path(save).parent.mkdir(parents=True, exist_ok=True)
            Path(save).write_bytes(png)
        return np.asarray(Image.open(BytesIO(png)).convert("RGB"))

    def settled_shot(self, previous=None, timeout_s: float = 20.0, index: int = 0,
                     save: Path | None = None, poll_s: float = 0.7):
        """A view screenshot once it differs from ``previous`` (if given) and has stopped
        changing (two equal shots ``poll_s`` apart)."""
        import numpy as np

        deadline = time.time() + timeout_s
        shot = self.view_shot(index, save)
        while time.time() < deadline:
            time.sleep(poll_s)
            again = self.view_shot(index, save)
            changed = previous is None or views_differ(again, previous)
            if changed and np.array_equal(again, shot):
                return again
            shot = again
        return shot

    def first_change(self, previous, timeout_s: float = 10.0, index: int = 0):
        """Seconds until the view differs from ``previous`` (polling screenshots as fast as
        the browser gives them), or None."""

        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if views_differ(self.view_shot(index), previous):
                return time.perf_counter() - start
        return None
