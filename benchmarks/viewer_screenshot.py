"""A screenshot of ``fast3r view SCENE_DIR`` in headless Chromium, as in the README (PNG, 256 colours).

    python benchmarks/viewer_screenshot.py /tmp/teddy benchmarks/results/viewer_teddybear_random_weights.png

Serves the folder with the command itself, waits for every camera on the page, closes the
browser's software-WebGL notice (this machine has no GPU) and saves the page.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import chromium_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scene", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="1000x600", help="viewport WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    process = subprocess.Popen([sys.executable, "-m", "fast3r.cli", "view", str(args.scene), "--port", "0"],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = process.stdout.readline().split()[2]
        with chromium_page({"width": width, "height": height}) as page:
            page.goto(url)
            page.wait_for_function("() => /\\d+ cameras/.test(document.body.innerText)", timeout=120_000)
            notice = page.locator(".mantine-Notification-closeButton").first
            notice.wait_for(timeout=30_000)
            notice.click()
            page.locator(".mantine-Notification-root").first.wait_for(state="detached", timeout=10_000)
            time.sleep(2)  # the frame after the notice is gone
            png = args.out.with_suffix(".full.png")
            page.screenshot(path=str(png))
    finally:
        process.terminate()
        process.wait(10)
    image = Image.open(png).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    png.unlink()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
