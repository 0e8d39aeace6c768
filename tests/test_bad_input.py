"""Bad input: a clear error naming the file or value, and the memory exactly as it was.

Every case snapshots the memory (count, ids, version, audit log, and the same
read back from disk by a fresh handle) before the bad call and compares after.
Image cases hide the bad image in the middle of a list of good ones: images are
all validated before anything is written, so the good ones are not added either.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visual_memory as vm
from visual_memory.encoders import Encoder, EncoderSpec, Preprocess
from visual_memory.errors import (
    EncoderError,
    EncoderMismatchError,
    ImageError,
    MemoryLockedError,
    NotAMemoryError,
    VectorError,
)


def snapshot(mem) -> tuple:
    on_disk = vm.open(mem.path)
    return (
        len(mem),
        sorted(mem.ids()),
        mem.version,
        (mem.path / "audit.jsonl").read_bytes(),
        len(on_disk),
        sorted(on_disk.ids()),
        on_disk.version,
    )


@pytest.fixture(scope="module")
def good(cifar_root) -> list[Path]:
    return sorted((cifar_root / "train" / "cat").glob("*.jpg"))[:2] + sorted((cifar_root / "train" / "ship").glob("*.jpg"))[:2]


@pytest.fixture
def mem(memory_dir, encoder, good):
    """An efficientnet-lite0 memory holding two real CIFAR images."""
    m = vm.create(memory_dir, encoder=encoder)
    m.add(good[:2], labels=["cat", "cat"])
    return m


# -- images ------------------------------------------------------------------------


def _jpeg_bytes(good: list[Path]) -> bytes:
    return good[2].read_bytes()


def corrupt_jpeg(good, path):
    data = bytearray(_jpeg_bytes(good))
    dht = data.index(b"\xff\xc4")  # garble the first Huffman table: the header still says JPEG
    data[dht + 4 : dht + 30] = b"\xff" * 26
    path.write_bytes(bytes(data))


def truncated_jpeg(good, path):
    data = _jpeg_bytes(good)
    path.write_bytes(data[: len(data) // 2])


def zero_byte_jpeg(good, path):
    path.write_bytes(b"")


def text_named_jpeg(good, path):
    path.write_text("this is not an image, just some text\n" * 10)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb(good, path):
    # 74 bytes on disk whose header claims 100000 x 100000 RGB pixels (30 GB decoded).
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "make, suffix, message",
    [
        (corrupt_jpeg, ".jpg", "corrupt or truncated image"),
        (truncated_jpeg, ".jpg", "corrupt or truncated image"),
        (zero_byte_jpeg, ".jpg", r"file is empty \(0 bytes\)"),
        (text_named_jpeg, ".jpg", "not a recognised image format"),
        (decompression_bomb, ".png", "decompression bomb"),
    ],
)
def test_bad_image_in_a_list_is_refused_and_nothing_is_added(mem, good, tmp_path, make, suffix, message):
    bad = tmp_path / f"bad_{make.__name__}{suffix}"
    make(good, bad)
    before = snapshot(mem)
    with pytest.raises(ImageError, match=message) as err:
        mem.add([good[2], bad, good[3]], labels=["ship", "ship", "ship"])
    assert str(bad) in str(err.value)
    assert snapshot(mem) == before
    # The same file is refused as a query too, and as raw bytes.
    with pytest.raises(ImageError, match=message):
        mem.classify([bad], k=1)
    with pytest.raises(ImageError, match=message):
        mem.add(bad.read_bytes(), labels="ship")
    assert snapshot(mem) == before


def test_bad_image_inside_an_image_folder(mem, good, tmp_path):
    root = tmp_path / "folder"
    for label, paths in (("ship", good[2:]), ("cat", good[:2])):
        (root / label).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, root / label / p.name)
    truncated_jpeg(good, root / "ship" / "broken.jpg")
    before = snapshot(mem)
    with pytest.raises(ImageError, match=r"ship/broken\.jpg: corrupt or truncated image"):
        mem.add(root)
    assert snapshot(mem) == before


def test_missing_file_is_named(mem, good, tmp_path):
    before = snapshot(mem)
    with pytest.raises(ImageError, match=r"nowhere\.jpg: no such file"):
        mem.add([good[2], tmp_path / "nowhere.jpg"], labels="ship")
    assert snapshot(mem) == before


def _gray(path):
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).save(path)


def _rgba(path):
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # alpha ramp
    Image.fromarray(arr, "RGBA").save(path)


def _gray16(path):
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(path)


def _expected_rgb(path: Path) -> Image.Image:
    """What the image should look like once converted, computed without visual_memory."""
    img = Image.open(path)
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 65535.0 * 255.0 + 0.5
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@pytest.mark.parametrize("make, mode", [(_gray, "L"), (_rgba, "RGBA"), (_gray16, "I;16")])
def test_grayscale_rgba_and_16bit_png_are_converted_not_refused(mem, encoder, tmp_path, make, mode):
    path = tmp_path / f"{make.__name__}.png"
    make(path)
    assert Image.open(path).mode == mode
    v = mem.version
    res = mem.add([path], labels="odd")
    assert res.added == 1 and mem.version == v + 1 and len(mem) == 3
    stored = mem.get(res.ids, columns=["vector"])[0]["vector"]
    np.testing.assert_allclose(stored, encoder.embed([_expected_rgb(path)])[0], atol=1e-5)


# -- vectors -----------------------------------------------------------------------


def test_wrong_dimension_vectors_are_refused(mem, encoder):
    before = snapshot(mem)
    with pytest.raises(VectorError, match="dimension 384, but this memory's encoder gives 1280-d"):
        mem.add_embeddings(np.ones((2, 384), np.float32), ["a", "b"])
    with pytest.raises(VectorError, match="dimension 384, but this memory holds 1280-d"):
        mem.classify(np.ones((1, 384), np.float32))
    assert snapshot(mem) == before


def test_nan_inf_and_zero_vectors_are_refused(mem):
    before = snapshot(mem)
    x = np.random.default_rng(0).standard_normal((4, 1280)).astype(np.float32)
    x[2, 17] = np.nan
    with pytest.raises(VectorError, match=r"NaN or infinite values \(rows \[2\]\)"):
        mem.add_embeddings(x, ["a"] * 4, ids=list("abcd"))
    x[2, 17], x[3, 0] = 0.0, np.inf
    with pytest.raises(VectorError, match=r"NaN or infinite values \(rows \[3\]\)"):
        mem.add_embeddings(x, ["a"] * 4, ids=list("abcd"))
    x[3] = 0.0
    with pytest.raises(VectorError, match=r"all-zero vectors \(rows \[3\]\)"):
        mem.add_embeddings(x, ["a"] * 4, ids=list("abcd"))
    with pytest.raises(ValueError, match="got 2 items but 3 labels"):
        mem.add_embeddings(x[:2], ["a"] * 3)
    assert snapshot(mem) == before


# -- encoders and memories ---------------------------------------------------------


def test_unknown_encoder_name(tmp_path, mem):
    target = tmp_path / "never"
    with pytest.raises(EncoderError, match=r"unknown encoder 'no-such-net'\. Known encoders: .*efficientnet-lite0"):
        vm.create(target, encoder="no-such-net")
    assert not target.exists()
    with pytest.raises(EncoderError, match="unknown encoder 'no-such-net'"):
        vm.create_encoder("no-such-net")
    before = snapshot(mem)
    with pytest.raises(EncoderMismatchError, match="made with encoder 'efficientnet-lite0', not 'no-such-net'"):
        vm.open(mem.path, encoder="no-such-net")
    assert snapshot(mem) == before


def test_a_path_that_is_not_a_memory(tmp_path):
    with pytest.raises(NotAMemoryError, match=rf"{tmp_path / 'missing'}: does not exist"):
        vm.open(tmp_path / "missing")
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "a.jpg").write_bytes(b"x")
    with pytest.raises(NotAMemoryError, match=rf"{plain}: is not a visual-memory directory \(no manifest.json\)"):
        vm.open(plain)
    assert sorted(p.name for p in plain.iterdir()) == ["a.jpg"]
    with pytest.raises(NotAMemoryError, match="is not a visual-memory directory"):
        vm.open(plain / "a.jpg")


def test_memory_without_its_records_table(mem):
    shutil.rmtree(mem.path / "records.lance")
    with pytest.raises(NotAMemoryError, match="records table is missing or unreadable"):
        vm.open(mem.path)


class PooledPixels(Encoder):
    """A real (if weak) encoder: the image average-pooled to 4x4 RGB, 48-d."""

    def __init__(self) -> None:
        self.spec = EncoderSpec(name="pooled-pixels", dim=48, weights="none",
                                preprocess=Preprocess(input_size=4, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3))

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) + 1e-3  # never an all-zero vector


def test_memory_made_with_another_encoder(tmp_path, encoder, good):
    other = vm.create(tmp_path / "pooled", encoder=PooledPixels())
    other.add(good[:2], labels="cat")
    before = snapshot(other)
    with pytest.raises(EncoderMismatchError, match="made with encoder 'pooled-pixels', not 'efficientnet-lite0'"):
        vm.open(other.path, encoder="efficientnet-lite0")
    with pytest.raises(EncoderMismatchError, match=r"made with encoder 'pooled-pixels' \(fingerprint .*\), not 'efficientnet-lite0'"):
        vm.open(other.path, encoder=encoder)
    with pytest.raises(EncoderMismatchError, match="vectors come from encoder efficientnet-lite0.*not comparable"):
        other.add_embeddings(np.ones((1, 48), np.float32), ["cat"], encoder=encoder.spec)
    with pytest.raises(EncoderMismatchError, match="vectors come from encoder efficientnet-lite0"):
        other.add_embeddings(np.ones((1, 48), np.float32), ["cat"], encoder="efficientnet-lite0")
    with pytest.raises(VectorError, match="dimension 1280, but this memory's encoder gives 48-d"):
        other.add_embeddings(encoder.embed(good[2:3]), ["ship"])
    assert snapshot(other) == before


def test_vectors_only_memory_refuses_images_and_encoders(memory_dir, good):
    mem = vm.create(memory_dir, encoder=None, dim=1280)
    mem.add_embeddings(np.eye(1280, dtype=np.float32)[:3], ["a", "b", "c"])
    before = snapshot(mem)
    with pytest.raises(EncoderMismatchError, match=r"stores precomputed 1280-d vectors without an encoder; pass vectors"):
        mem.add(good[:2], labels="cat")
    with pytest.raises(EncoderMismatchError, match="made with encoder 'vectors-1280d', not 'efficientnet-lite0'"):
        vm.open(memory_dir, encoder="efficientnet-lite0")
    with pytest.raises(EncoderMismatchError, match="vectors come from encoder efficientnet-lite0"):
        mem.add_embeddings(np.eye(1280, dtype=np.float32)[3:4], ["d"], encoder="efficientnet-lite0")
    assert snapshot(mem) == before


# -- concurrency -------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys
    import visual_memory as vm

    mem = vm.open(sys.argv[1])
    with mem._store.writing():
        print("locked", flush=True)
        sys.stdin.read()  # hold the writer lock until the parent closes our stdin
    """
)


def test_two_writers_at_once(mem):
    before = snapshot(mem)
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(mem.path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(MemoryLockedError, match=rf"another writer holds the lock \(.*:{child.pid}\)") as err:
            mem.add_embeddings(np.eye(1280, dtype=np.float32)[:1], ["x"], ids=["x"])
        assert str(mem.path) in str(err.value)
        assert snapshot(mem) == before
        # A writer that is willing to wait gets in once the other one finishes.
        child.stdin.close()
        res = mem.add_embeddings(np.eye(1280, dtype=np.float32)[:1], ["x"], ids=["x"], lock_timeout=30)
        assert res.added == 1 and len(mem) == 3
    finally:
        child.kill()
        child.wait(timeout=30)
