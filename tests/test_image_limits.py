"""Decoding and resizing are bounded before any pixel is allocated (issue 11, item 5).

An encoder scales an image's *shorter* side up to its input size and keeps the
aspect ratio, so a 370-byte 100000x1 PNG used to become a 22,400,000x224
intermediate (15 GB) inside `vismem add`, and an 85-byte 4000x1 PNG posted to
/classify grew the server by ~800 MB. The aspect ratio is now refused from
the header (`images.MAX_ASPECT_RATIO`), and every encoder's resize refuses an
intermediate above `encoders.base.MAX_RESIZED_PIXELS`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import visual_memory as vm
from visual_memory import images
from visual_memory.encoders import base, efficientnet, hf
from visual_memory.errors import ImageError

from server_support import free_port

REPO = Path(__file__).resolve().parents[1]


def strip_png(path: Path, width: int, height: int = 1) -> Path:
    """A tiny PNG of extreme aspect ratio (a few hundred bytes)."""
    Image.new("L", (width, height), 128).save(path, optimize=True)
    return path


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


# `vismem` with its address space capped at 4 GiB: a regression must fail the test, not take
# the shared machine's memory with it. (Set in the child: a preexec_fn would fork a process
# that holds Lance's runtime.)
VISMEM = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); from visual_memory.cli import app; app()"
# The child writes its own peak RSS at exit. VmHWM belongs to its address space (exec starts a new
# one); wait4's ru_maxrss would also count the test process's pages it shared between fork and exec,
# so it grew with whatever the tests before had left in this process (1.8 GB in a full run).
HWM = ("import atexit, os; atexit.register(lambda: open(os.environ['VISMEM_TEST_HWM'], 'w').write("
       "next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))); ")


def test_every_input_type_refuses_extreme_aspect_ratios_from_the_header(tmp_path):
    wide = strip_png(tmp_path / "wide.png", 100_000)
    assert wide.stat().st_size < 1000
    for item, name in ((wide, str(wide)), (wide.read_bytes(), "bytes>"), (Image.new("RGB", (1, 4000)), "PIL image"),
                       (np.zeros((1, 4000, 3), np.uint8), "array")):
        with pytest.raises(ImageError) as err:
            images.load_image(item)
        msg = str(err.value)
        assert name in msg and "aspect ratio" in msg and "50:1" in msg and "VISMEM_MAX_ASPECT_RATIO" in msg, msg
    # Up to the limit is fine: a 50:1 panorama decodes and embeds.
    assert images.load_image(Image.new("RGB", (5000, 100))).image.size == (5000, 100)


@pytest.mark.parametrize("pre", [efficientnet.PREPROCESS, hf.DINOV2_PREPROCESS, hf.CLIP_PREPROCESS, hf.SIGLIP_PREPROCESS],
                         ids=["efficientnet", "dinov2", "clip", "siglip"])
def test_every_encoders_resize_is_bounded(pre, monkeypatch):
    # Lift the aspect limit to reach the resize bound, and lower the bound so that the image
    # it refuses is small enough to be made safely even if it were not refused.
    monkeypatch.setattr(images, "MAX_ASPECT_RATIO", 1e9)
    monkeypatch.setattr(base, "MAX_RESIZED_PIXELS", 1_000_000, raising=False)
    img = Image.new("RGB", (2000, 20))
    (nw, nh), _ = pre.geometry(*img.size)
    if nw * nh <= 1_000_000:  # SigLIP squashes straight to the input size: bounded by design
        assert pre.resize_mode == "squash"
        assert pre(img).shape == (3, pre.input_size, pre.input_size)
        return
    with pytest.raises(ImageError) as err:
        pre(img, name="strip.png")
    msg = str(err.value)
    assert msg.startswith("strip.png: 2000x20") and f"{nw}x{nh}" in msg and "VISMEM_MAX_RESIZED_PIXELS" in msg, msg


def test_embedding_refuses_before_resizing(monkeypatch, encoder):
    monkeypatch.setattr(images, "MAX_ASPECT_RATIO", 1e9)
    monkeypatch.setattr(base, "MAX_RESIZED_PIXELS", 1_000_000, raising=False)
    buf = io.BytesIO()
    Image.new("RGB", (2000, 20)).save(buf, format="PNG")
    with pytest.raises(ImageError, match=r"<\d+ bytes>: 2000x20 would be resized to 22400x224"):
        encoder.embed(buf.getvalue())


def test_vismem_add_of_a_100000x1_png_fails_fast_and_changes_nothing(tmp_path):
    wide = strip_png(tmp_path / "wide.png", 100_000)
    mem = vm.create(tmp_path / "m.vm")
    before = (len(mem), mem.version)
    with open(tmp_path / "stderr", "w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", HWM + VISMEM, "add", str(tmp_path / "m.vm"), str(wide), "--label", "x"],
            stdout=subprocess.DEVNULL, stderr=err, env={**subprocess_env(), "VISMEM_TEST_HWM": str(tmp_path / "hwm")},
        )
        child.wait()
        err.seek(0)
        stderr = err.read()
    assert child.returncode == 2, (child.returncode, stderr[-2000:])
    assert "wide.png: 100000x1 has an aspect ratio of 100000:1, above the limit of 50:1" in stderr, stderr
    peak_kb = int((tmp_path / "hwm").read_text())
    assert peak_kb / 1024 < 1500, peak_kb  # was 15-21 GB, a normal add peaks at ~300 MB
    mem.refresh()
    assert (len(mem), mem.version) == before


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_server_refuses_a_4000x1_png_without_growing(tmp_path, cifar_root, encoder):
    """The real `vismem serve` process: its peak RSS barely moves when a 4000x1 strip is posted."""
    mem = vm.create(tmp_path / "m.vm", encoder=encoder)
    mem.add([cifar_root / "train" / "cat" / "0000.jpg"], labels="cat")
    strip = strip_png(tmp_path / "strip.png", 4000).read_bytes()
    assert len(strip) < 200
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", VISMEM, "serve", str(tmp_path / "m.vm"), "--port", str(port), "--token", "t"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "vismem serve did not start"
            time.sleep(0.2)
        cat = (cifar_root / "val" / "cat" / "4500.jpg").read_bytes()
        assert httpx.post(url + "/classify", files={"file": ("cat.jpg", cat, "image/jpeg")}, timeout=60).status_code == 200
        before = _vm_hwm_mb(server.pid)
        r = httpx.post(url + "/classify", files={"file": ("strip.png", strip, "image/png")}, timeout=60)
        grown = _vm_hwm_mb(server.pid) - before
        assert r.status_code == 413, r.text
        assert "strip.png: 4000x1 has an aspect ratio of 4000:1, above the limit of 50:1" in r.json()["detail"]
        assert grown < 50, f"server peak RSS grew by {grown:.0f} MB"  # was ~800 MB
    finally:
        server.terminate()
        server.wait(timeout=30)
