"""Forgetting an image together with its copies: forget(images=..., near=T) on real CIFAR-10 images."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory import erasure
from visual_memory.cli import app
from visual_memory.errors import SelectorError

T = 0.90  # the documented default for efficientnet-lite0 (benchmarks/bench_near_duplicates.py)


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def copies_of(path: Path) -> dict[str, bytes]:
    """Re-encoded, resized and lightly cropped copies of one image, as the bytes a user would hold."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        return {
            "jpeg q90": _jpeg(im, 90),
            "resized 64x64": _png(im.resize((64, 64), Image.Resampling.BICUBIC)),
            "90% crop": _png(im.crop((1, 1, 30, 30))),
        }


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path, cifar_root, encoder):
    """A memory of 30 real cats, 10 real dogs, and three copies of one of the cats."""
    cats = sorted((cifar_root / "train" / "cat").glob("*.jpg"))[:30]
    dogs = sorted((cifar_root / "train" / "dog").glob("*.jpg"))[:10]
    original = cats[0]
    copies = copies_of(original)
    mem = vm.create(tmp_path / "mem", encoder=encoder)
    mem.add(cats + dogs, labels=["cat"] * 30 + ["dog"] * 10)
    r = mem.add(list(copies.values()), labels="cat")
    # The test's own check of its premise: the copies are within T of the original, every other image is not.
    q = encoder.embed(original)
    sims = (mem.vectors() @ q.T).ravel()
    by_id = dict(zip(mem.ids(), sims.tolist()))
    original_id = hashlib.sha256(original.read_bytes()).hexdigest()
    copy_ids = r.ids
    assert all(by_id[i] >= T for i in copy_ids), {n: by_id[i] for n, i in zip(copies, copy_ids)}
    others = [i for i in mem.ids() if i not in copy_ids and i != original_id]
    assert max(by_id[i] for i in others) < T
    return mem, original, original_id, copy_ids, others


def test_forget_near_erases_the_image_and_its_copies_and_keeps_the_other_cats(setup):
    mem, original, original_id, copy_ids, others = setup
    doomed = sorted([original_id, *copy_ids])
    before = tree_digest(mem.path)
    p = mem.forget(images=[original], near=T, dry_run=True)
    assert sorted(p.ids) == doomed
    assert p.near == {"threshold": T, "copies": 3}
    assert tree_digest(mem.path) == before  # the dry run wrote nothing

    receipt = mem.forget(images=[original], near=T)
    assert receipt.erased == 4 and receipt.near_threshold == T and receipt.copies_found == 3
    assert receipt.verification["ok"] is True
    assert receipt.id_hashes == sorted(erasure.salted_hash(mem._store.salt(), i) for i in doomed)
    assert all(i not in mem for i in doomed)
    assert sorted(mem.ids()) == sorted(others)  # the 29 other cats and the dogs stay
    assert mem.labels == {"cat": 29, "dog": 10}
    assert receipt.to_dict()["copies_found"] == 3
    assert mem.history()[-1]["op"] == "forget" and f"near>={T:g}" in mem.history()[-1]["selector"]


def test_forget_near_works_when_only_copies_are_in_the_memory(setup):
    mem, original, original_id, copy_ids, _ = setup
    mem.forget(ids=[original_id])
    receipt = mem.forget(images=[original], near=T)
    assert receipt.erased == 3 and receipt.copies_found == 3
    assert all(i not in mem for i in copy_ids)
    with pytest.raises(SelectorError, match="no record has cosine similarity"):
        mem.forget(images=[original], near=T)  # nothing left to match


def test_near_needs_images_and_a_valid_threshold(setup):
    mem, original, *_ = setup
    with pytest.raises(SelectorError, match="near= needs images="):
        mem.forget(label="cat", near=T)
    with pytest.raises(ValueError, match="cosine similarity in"):
        mem.forget(images=[original], near=1.5)
    assert len(mem) == 43


def test_cli_forget_near_dry_run_then_erase(setup):
    mem, original, original_id, copy_ids, _ = setup
    runner = CliRunner()
    res = runner.invoke(app, ["forget", str(mem.path), "--image", str(original), "--near", str(T), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    preview = json.loads(res.output)
    assert preview["dry_run"] is True and preview["near"] == {"threshold": T, "copies": 3}
    assert sorted(c["id"] for c in preview["changes"]) == sorted([original_id, *copy_ids])
    res = runner.invoke(app, ["forget", str(mem.path), "--image", str(original), "--near", str(T)])
    assert res.exit_code == 0, res.output
    receipt = json.loads(res.output)
    assert receipt["erased"] == 4 and receipt["copies_found"] == 3 and receipt["near_threshold"] == T
    assert len(vm.open(mem.path)) == 39


def test_forget_near_also_erases_the_image_removed_earlier(setup):
    mem, original, original_id, copy_ids, _ = setup
    mem.remove(images=[original])  # removed, but its bytes are still on disk
    p = mem.forget(images=[original], near=T, dry_run=True)
    assert p.historic == [original_id] and sorted(c.id for c in p.changes) == sorted(copy_ids)
    receipt = mem.forget(images=[original], near=T)
    assert receipt.erased == 4 and receipt.copies_found == 3 and receipt.verification["ok"] is True
