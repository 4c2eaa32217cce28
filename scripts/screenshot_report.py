"""Render a cellcircuits HTML report in headless Chromium and save a screenshot (checks that its figures render).

    python scripts/screenshot_report.py results/report.html report.png [--height 2400]

Needs a headless Chromium on PATH (Debian: ``apt-get install chromium-headless-shell``). Exits with status 1 when
the browser is missing, fails, or the screenshot comes out blank.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"no headless Chromium found (tried {', '.join(BROWSERS)})", file=sys.stderr)
        return 1
    url = Path(args.report).resolve().as_uri()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={args.width},{args.height}", f"--screenshot={Path(args.png).resolve()}", url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    png = Path(args.png)
    if done.returncode != 0 or not png.exists():
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    from matplotlib import image

    pixels = image.imread(png)
    distinct = len({tuple(p) for p in pixels[::8, ::8].reshape(-1, pixels.shape[-1]).round(2).tolist()})
    print(f"{png}: {pixels.shape[1]}x{pixels.shape[0]} pixels, {distinct} distinct colours in a sample")
    return 0 if distinct > 50 else 1  # a page of text alone has few colours; rendered figures have many


if __name__ == "__main__":
    sys.exit(main())
