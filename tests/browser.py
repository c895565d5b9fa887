"""Headless Chromium (Debian's package) driven by Playwright, for the viewer's test and benchmark.

Playwright's Python package drives the system's Chromium over the DevTools protocol
(``executable_path``; its own browser download is never used), and gives what a
``chromium --screenshot`` one-shot cannot: waiting on the page, repeated screenshots while
the scene arrives (the first-frame timing), and keyboard input to the GUI's sliders.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# What this machine needs (no GPU, no network): software WebGL (SwiftShader), and none of Chromium's own
# connections, which the closed network refuses one by one.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 800, "height": 600}


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(viewport: dict = VIEWPORT) -> Iterator:
    """A Playwright page in a fresh headless Chromium with an empty --user-data-dir; closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="fast3r-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=FLAGS, viewport=viewport,
            ignore_default_args=["--enable-automation"], env={**os.environ, "HOME": profile})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def magenta_pixels(png: bytes) -> int:
    """Pixels of the synthetic scenes' point colour (R and B high, G low): points drawn, not a blank canvas."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return int(((rgb[..., 0] >= 200) & (rgb[..., 1] <= 100) & (rgb[..., 2] >= 200)).sum())


def wait_for_pixels(page, done, timeout: float = 60.0, start: float | None = None) -> tuple[float, int, bytes]:
    """Screenshot until ``done(magenta_pixels)``; returns (seconds since ``start``, the count, the PNG)."""
    from playwright.sync_api import Error

    start = time.perf_counter() if start is None else start
    while True:
        try:
            png = page.screenshot(timeout=max(30.0, timeout) * 1000)
        except Error as err:  # before the page's first composited frame Chromium may refuse; try again
            if "Unable to capture screenshot" not in str(err) or time.perf_counter() - start > timeout:
                raise
            time.sleep(0.1)
            continue
        count = magenta_pixels(png)
        elapsed = time.perf_counter() - start
        if done(count):
            return elapsed, count, png
        if elapsed > timeout:
            raise TimeoutError(f"no frame with the points after {elapsed:.1f} s (last: {count} point pixels)")
        time.sleep(0.02)
