#!/usr/bin/env python3
"""Screenshot a deepisles report.html with headless Chromium, with the network cut off.

    python scripts/screenshot_report.py REPORT_HTML OUT_PNG [--width 1200] [--height 1400] [--dump-dom OUT_HTML]

Needs a Chromium binary (Debian/Ubuntu: ``apt-get install chromium``; or set ``$CHROMIUM``). WebGL runs on
SwiftShader (software), so no GPU is needed. ``--dump-dom`` also writes the page's DOM after its scripts ran
(``<html data-viewer="ready">`` once the viewer shows the volumes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
APT_PACKAGE = "chromium"


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium/Chrome binary on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    return next((p for p in (shutil.which(c) for c in CANDIDATES) if p), None)


def _run(html: Path, action: list[str], width: int, height: int, budget_ms: int, timeout_s: float) -> str:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError(f"no Chromium found (apt-get install {APT_PACKAGE}, or set $CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="deepisles-chromium-") as profile:
        cmd = [
            exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # software WebGL2 for the viewer
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",  # no network
            "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
            *action, Path(html).resolve().as_uri(),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def screenshot(
    html: Path, png: Path, *, width: int = 1200, height: int = 1400, budget_ms: int = 20000, timeout_s: float = 120
) -> Path:
    """Write a ``width`` x ``height`` PNG of the page (top of the page, after its scripts ran)."""
    png = Path(png).resolve()
    _run(html, [f"--screenshot={png}"], width, height, budget_ms, timeout_s)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def dump_dom(html: Path, *, width: int = 1200, height: int = 1400, budget_ms: int = 20000, timeout_s: float = 120) -> str:
    """The page's DOM (serialised) after its scripts ran."""
    return _run(html, ["--dump-dom"], width, height, budget_ms, timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_html", type=Path)
    ap.add_argument("out_png", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=1400)
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time the page gets to load")
    ap.add_argument("--dump-dom", type=Path, help="also write the DOM after the scripts ran")
    a = ap.parse_args(argv)
    try:
        screenshot(a.report_html, a.out_png, width=a.width, height=a.height, budget_ms=a.budget_ms)
        if a.dump_dom:
            a.dump_dom.write_text(dump_dom(a.report_html, width=a.width, height=a.height, budget_ms=a.budget_ms))
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(a.out_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
