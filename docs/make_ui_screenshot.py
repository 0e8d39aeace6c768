"""Regenerate docs/ui.png: the web UI explaining a CIFAR-10 image.

Builds a small memory (real CIFAR-10 train images, so every neighbour has a
thumbnail), serves it on loopback, drives headless Chromium (Debian's
/usr/bin/chromium through Playwright) and saves a screenshot.

    python docs/make_ui_screenshot.py [--per-class 12] [--out docs/ui.png]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

import visual_memory as vm
from visual_memory.images import scan_folder
from visual_memory.server import create_app

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--query", type=Path, default=DATA / "val" / "ship" / "4503.jpg")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ui.png")
    args = ap.parse_args()
    paths, labels = scan_folder(DATA / "train")
    keep = {}
    sel = [(p, lab) for p, lab in zip(paths, labels) if keep.setdefault(lab, []).append(p) or len(keep[lab]) <= args.per_class]
    with tempfile.TemporaryDirectory() as tmp:
        mem = vm.create(Path(tmp) / "mem")
        mem.add([p for p, _ in sel], labels=[lab for _, lab in sel], progress="adding")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(mem, token="demo"), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/#token=demo")
            page.fill("#k", "12")
            page.set_input_files("[data-testid=file]", str(args.query))
            page.wait_for_selector("[data-testid=neighbor]")
            page.wait_for_function("[...document.querySelectorAll('[data-testid=neighbor] img')].every(i => i.complete && i.naturalWidth > 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
