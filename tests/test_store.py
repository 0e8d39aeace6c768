"""The memory directory: manifest, Lance records, audit log, versions, writer lock."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest

import visual_memory as vm
from visual_memory.errors import MemoryExistsError, MemoryLockedError, NotAMemoryError, VisualMemoryError
from visual_memory.store import AUDIT, MANIFEST, RECORDS, Store, now_utc, record_schema


def _rows(ids, dim=4, label="a"):
    n = len(ids)
    vecs = np.eye(dim, dtype=np.float32)[np.arange(n) % dim]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([label] * n, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            pa.array([None] * n, pa.string()),
            pa.array(np.ones(n, np.float32)),
            pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
            pa.array([None] * n, pa.string()),
            pa.array([None] * n, pa.binary()),
        ],
        schema=record_schema(dim),
    )


def _audit_lines(path):
    return [json.loads(line) for line in (path / AUDIT).read_text().splitlines()]


def test_layout_and_manifest(memory_dir):
    vm.create(memory_dir, encoder=None, dim=4)
    assert (memory_dir / MANIFEST).is_file() and (memory_dir / RECORDS).is_dir() and (memory_dir / AUDIT).is_file()
    m = json.loads((memory_dir / MANIFEST).read_text())
    assert m["format"] == "visual-memory" and m["format_version"] == 1
    assert m["dim"] == 4 and m["index"] == "Flat" and m["vector_dtype"] == "float32"
    assert m["encoder"]["name"] == "vectors-4d"
    ds = lance.dataset(str(memory_dir / RECORDS))
    assert ds.schema.names == ["id", "label", "vector", "source", "weight", "added_at", "metadata", "thumbnail"]
    assert ds.count_rows() == 0
    (entry,) = _audit_lines(memory_dir)
    assert entry["op"] == "create" and entry["version"] == ds.version and entry["index"] == "Flat"


def test_manifest_records_the_encoder_spec_with_preprocessing(memory_dir, encoder):
    mem = vm.create(memory_dir, encoder=encoder)
    m = json.loads((memory_dir / MANIFEST).read_text())
    spec = m["encoder"]
    assert spec["name"] == "efficientnet-lite0" and spec["dim"] == 1280 == m["dim"]
    assert spec["fingerprint"] == encoder.spec.fingerprint
    assert spec["preprocess"] == encoder.spec.preprocess.to_dict()
    assert mem.encoder_spec == encoder.spec


def test_create_refuses_existing_memory_or_non_empty_dir(memory_dir, tmp_path):
    vm.create(memory_dir, encoder=None, dim=4)
    with pytest.raises(MemoryExistsError, match="a memory already exists here"):
        vm.create(memory_dir, encoder=None, dim=4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(MemoryExistsError, match="directory is not empty"):
        vm.create(other, encoder=None, dim=4)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_open_refuses_corrupt_or_foreign_or_newer_manifests(memory_dir):
    vm.create(memory_dir, encoder=None, dim=4)
    manifest = memory_dir / MANIFEST
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(NotAMemoryError, match="corrupt manifest"):
        vm.open(memory_dir)
    manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotAMemoryError, match="not a visual-memory manifest"):
        vm.open(memory_dir)
    newer = json.loads(good)
    newer["format_version"] = 99
    manifest.write_text(json.dumps(newer))
    with pytest.raises(VisualMemoryError, match="format 99 is newer.*upgrade visual-memory"):
        vm.open(memory_dir)


def test_each_commit_is_one_lance_version(memory_dir):
    store = vm.create(memory_dir, encoder=None, dim=4)._store
    v0 = store.version
    with store.writing():
        assert store.append(_rows(["a", "b"])) == v0 + 1
        assert store.append(_rows(["c"])) == v0 + 2
        assert store.delete("id = 'b'") == v0 + 3
    reopened = Store.open(memory_dir)
    assert reopened.version == v0 + 3 == reopened.latest_version()
    assert sorted(reopened.read_columns(["id"]).column("id").to_pylist()) == ["a", "c"]


def test_old_versions_open_read_only(memory_dir):
    store = vm.create(memory_dir, encoder=None, dim=4)._store
    with store.writing():
        v1 = store.append(_rows(["a"]))
        store.append(_rows(["b"]))
    old = Store.open(memory_dir, version=v1)
    assert old.read_only and old.count() == 1
    with pytest.raises(VisualMemoryError, match="read-only"):
        with old.writing():
            pass


def test_writes_outside_the_lock_are_refused(memory_dir):
    store = vm.create(memory_dir, encoder=None, dim=4)._store
    with pytest.raises(RuntimeError, match="inside `with store.writing"):
        store.append(_rows(["a"]))
    with pytest.raises(RuntimeError, match="inside `with store.writing"):
        store.audit("add", n=1)
    assert store.count() == 0


def test_lock_is_exclusive_and_names_the_holder(memory_dir):
    import os

    a = Store.open(vm.create(memory_dir, encoder=None, dim=4).path)
    b = Store.open(memory_dir)
    with a.writing():
        with a.writing():  # re-entrant for the holder
            pass
        with pytest.raises(MemoryLockedError, match=rf"another writer holds the lock \(.*:{os.getpid()}\)"):
            with b.writing():
                pass
    with b.writing():  # released
        pass


def test_reconcile_audit_recovers_a_commit_without_its_line(memory_dir):
    store = vm.create(memory_dir, encoder=None, dim=4)._store
    with store.writing():
        store.append(_rows(["a", "b"]))
        store.audit("add", n=2, ids=["a", "b"])
        # A crash here: the rows are committed, their audit line never written.
        store.append(_rows(["c", "d", "e"]))
        with open(memory_dir / AUDIT, "a") as f:
            f.write('{"op": "add", "torn')  # and a half-written line
    fresh = Store.open(memory_dir)
    with fresh.writing():  # reconciles on entry
        pass
    lines = _audit_lines(memory_dir)
    assert [e["op"] for e in lines] == ["create", "add", "add"]
    last = lines[-1]
    assert last["recovered"] is True and last["version"] == fresh.version
    assert last["ids"] == ["c", "d", "e"] and last["n"] == 3
    with fresh.writing():  # idempotent
        pass
    assert len(_audit_lines(memory_dir)) == 3


def test_reconcile_audit_sees_deletions(memory_dir):
    store = vm.create(memory_dir, encoder=None, dim=4)._store
    with store.writing():
        store.append(_rows(["a", "b"]))
        store.audit("add", n=2, ids=["a", "b"])
        store.delete("id = 'a'")
    with Store.open(memory_dir).writing():
        pass
    last = _audit_lines(memory_dir)[-1]
    assert last["op"] == "remove" and last["removed"] == 1 and last["recovered"] is True
