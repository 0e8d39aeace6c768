"""Forget leaves nothing: labels and sources in the audit log, the embedding cache, the salt, audit repair, progress.

Each test scans bytes itself (plain substring search over every file),
independently of `visual_memory.erasure`'s own verification scan.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import visual_memory as vm
from visual_memory import erasure
from visual_memory.cache import EmbeddingCache, embed_paths

D = 8


def _ids(n, start=0):
    return [f"erasure-rec-{i:05d}" for i in range(start, start + n)]


def _files_containing(root: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            for n in needles:
                if n in data:
                    out.setdefault(n, []).append(str(f.relative_to(root)))
    return out


@pytest.fixture
def mem(memory_dir, unit_vectors):
    m = vm.create(memory_dir, encoder=None, dim=D)
    x = unit_vectors(40, D, seed=2)
    labels = ["cat", "dog"] * 15 + ["label-only-of-jane-doe"] * 5 + ["label-shared-with-live"] * 5
    m.add_embeddings(x[:30], labels=labels[:30], ids=_ids(30), source="batch-shared-source")
    m.add_embeddings(x[30:35], labels=labels[30:35], ids=_ids(5, 30), source="/home/jane/private/album-0042")
    m.add_embeddings(x[35:], labels=labels[35:], ids=_ids(5, 35), source="another-live-source")
    m.vectors = x
    return m


# -- 10: labels and sources ------------------------------------------------------------


def test_forget_erases_labels_and_sources_only_the_forgotten_records_had(mem):
    ids = _ids(40)
    gone = ids[30:35] + [ids[0]]  # every "jane" record and one cat
    mem.relabel([ids[0]], "relabelled-to-a-private-name")  # a relabel line keeps the new label
    mem.remove(source="/home/jane/private/album-0042")  # a remove line keeps the source in its selector
    private = [b"label-only-of-jane-doe", b"/home/jane/private/album-0042", b"relabelled-to-a-private-name"]
    kept = [b"label-shared-with-live", b"batch-shared-source", b"another-live-source"]
    assert set(_files_containing(mem.path, private + kept)) == set(private + kept)  # positive control
    receipt = mem.forget(ids=gone)
    assert _files_containing(mem.path, private) == {}
    assert receipt.verification["ok"] and receipt.verification["texts_scanned"] == 3
    # labels and sources of live records stay where no forgotten record is named
    assert set(_files_containing(mem.path, kept)) == set(kept)
    log = [json.loads(x) for x in (mem.path / "audit.jsonl").read_text().splitlines()]
    assert [e["op"] for e in log] == ["create", "add_embeddings", "add_embeddings", "add_embeddings", "relabel", "remove", "forget"]
    assert [e["version"] for e in log[:6]] == list(range(1, 7))
    add2, relabel, remove = log[2], log[4], log[5]
    # what a line keeps: op, version, counts, hashed ids; its free text is gone
    assert add2["n"] == 5 and len(add2["ids"]) == 5 and all(i.startswith("erased:") for i in add2["ids"])
    assert add2["labels"] == ["erased"]
    assert relabel["label"] == "erased" and relabel["old_labels"] == ["erased"] and relabel["n"] == 1
    assert remove["selector"] == {"source": "erased"} and remove["n"] == 5
    # a line naming a forgotten record loses even labels live records share ("cat" beside its hash tells its label)
    add1 = log[1]
    assert add1["labels"] == ["erased", "erased"] and add1["ids"][1:] == ids[1:30]
    assert add1["ids"][0] == "erased:" + erasure.salted_hash(mem._store.salt(), ids[0])
    # a line naming only live records keeps their labels
    assert log[3]["labels"] == ["label-shared-with-live"] and log[3]["ids"] == ids[35:40]


def test_scrub_entry_rules():
    token = {"rec-a": "erased:h1"}
    text = {"private-label"}
    naming = {"op": "add", "ids": ["rec-a", "rec-b"], "labels": ["cat", "private-label"], "n": 2, "version": 3}
    assert erasure.scrub_entry(naming, token, text) == {"op": "add", "ids": ["erased:h1", "rec-b"],
                                                         "labels": ["erased", "erased"], "n": 2, "version": 3}
    other = {"op": "remove", "ids": ["rec-c"], "selector": {"where": "label = 'private-label' OR label = 'cat'",
                                                            "label": ["cat", "private-label"]}}
    assert erasure.scrub_entry(other, token, text)["selector"] == {"where": "label = 'erased' OR label = 'cat'",
                                                                   "label": ["cat", "erased"]}
    assert erasure.scrub_entry({"op": "tag", "tag": "v1"}, token, text) == {"op": "tag", "tag": "v1"}


# -- 11: the user's embedding cache ---------------------------------------------------------


def test_forget_purges_the_embedding_cache(cifar_root, encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("VISMEM_CACHE_DIR", str(tmp_path / "user-cache"))
    paths = sorted((cifar_root / "train" / "bird").glob("*.jpg"))[:3]
    vecs = embed_paths(encoder, paths)  # what `vismem eval` and friends leave in the cache
    m = vm.create(tmp_path / "m", encoder=encoder)
    m.add(paths, labels="bird")
    gone_id = vm.images.sha256_of(paths[0])
    cache_dir = tmp_path / "user-cache" / "embeddings"
    needles = [gone_id.encode(), gone_id.encode("utf-32-le"), vecs[0].tobytes()]
    assert _files_containing(cache_dir, needles)  # positive control: numpy keeps keys as UTF-32
    receipt = m.forget(images=[paths[0]])
    assert _files_containing(cache_dir, needles) == {}
    assert receipt.verification["ok"]
    assert receipt.verification["embedding_cache"] == {"dir": str(cache_dir), "entries_removed": 1, "shards_rewritten": 1}
    fresh = EmbeddingCache(encoder.spec.fingerprint)
    found, got = fresh.get([vm.images.sha256_of(p) for p in paths])
    assert found.tolist() == [False, True, True]
    np.testing.assert_array_equal(got, vecs[1:])


def test_a_stale_cache_handle_sees_a_miss_after_a_purge(tmp_path, monkeypatch):
    from visual_memory import cache

    monkeypatch.setenv("VISMEM_CACHE_DIR", str(tmp_path))
    c = EmbeddingCache("fp")
    c.put(["k1", "k2"], np.eye(2, dtype=np.float32))
    stale = EmbeddingCache("fp")  # indexed the shard before the purge, loaded nothing yet
    assert cache.purge(["k1"])["entries_removed"] == 1
    found, got = stale.get(["k1", "k2"])
    assert found.tolist() == [False, False] and got.shape == (0, 0)  # its shard is gone: a miss, not a crash
    assert EmbeddingCache("fp").get(["k1", "k2"])[0].tolist() == [False, True]


# -- 12: the salt ---------------------------------------------------------------------------


def test_a_handle_opened_before_another_process_first_forget_keeps_its_salt(mem):
    early = vm.open(mem.path)  # e.g. the server, opened before anyone forgot anything
    assert "audit_salt" not in early._store.manifest
    out = subprocess.run([sys.executable, "-c", "import sys, visual_memory as vm; "
                          "print(vm.open(sys.argv[1]).forget(ids=[sys.argv[2]]).id_hashes[0])", str(mem.path), _ids(1)[0]],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH="src"))
    assert out.returncode == 0, out.stderr
    salt = json.loads((mem.path / "manifest.json").read_text())["audit_salt"]
    assert out.stdout.strip() == erasure.salted_hash(salt, _ids(1)[0])
    r = early.forget(ids=[_ids(2)[1]])
    assert json.loads((mem.path / "manifest.json").read_text())["audit_salt"] == salt  # not written over
    assert r.id_hashes == [erasure.salted_hash(salt, _ids(2)[1])]
    forgets = [e for e in vm.open(mem.path).history() if e["op"] == "forget"]
    assert [e["id_hashes"] for e in forgets] == [[erasure.salted_hash(salt, i)] for i in _ids(2)]


# -- 14: audit repair -----------------------------------------------------------------------


def _tear(path: Path) -> bytes:
    log = path / "audit.jsonl"
    good = log.read_bytes()
    with open(log, "ab") as f:
        f.write(b'{"op": "add", "torn')
    return good


def test_audit_repair_never_rewrites_the_log(mem, monkeypatch):
    good = _tear(mem.path)
    real_open = builtins.open

    def crash_after_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if str(file).endswith("audit.jsonl") and ("w" in mode):
            f.close()
            raise OSError("simulated crash right after opening the audit log for writing")
        return f

    monkeypatch.setattr(builtins, "open", crash_after_open)
    with vm.open(mem.path)._store.writing():  # repairs on entry
        pass
    monkeypatch.setattr(builtins, "open", real_open)
    assert (mem.path / "audit.jsonl").read_bytes() == good


CRASH_REPAIR = r"""
import sys, visual_memory as vm
vm.open(sys.argv[1]).remove(ids=[sys.argv[2]])
"""


def test_audit_repair_killed_at_the_truncate_loses_no_line(mem):
    good = _tear(mem.path)
    env = dict(os.environ, VISMEM_CRASH_AT="audit:repair", PYTHONPATH="src")
    out = subprocess.run([sys.executable, "-c", CRASH_REPAIR, str(mem.path), _ids(1)[0]], env=env, capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert (mem.path / "audit.jsonl").read_bytes().startswith(good)  # every complete line is still there
    m = vm.open(mem.path)
    m.remove(ids=[_ids(1)[0]])
    lines = (mem.path / "audit.jsonl").read_text().splitlines()
    assert (mem.path / "audit.jsonl").read_bytes().startswith(good) and len(lines) == len(good.splitlines()) + 1
    assert [json.loads(x)["op"] for x in lines][-1] == "remove"


# -- 19: progress and the scan --------------------------------------------------------------


def test_forget_reports_scan_progress_through_the_progress_module(mem, monkeypatch, caplog):
    from visual_memory import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="visual_memory.progress"):
        mem.forget(ids=[_ids(1)[0]])
    lines = [r.getMessage() for r in caplog.records if r.name == "visual_memory.progress"]
    assert lines and all(x.startswith("verifying erasure: ") for x in lines)
    assert lines[-1].startswith("verifying erasure: done")


def test_recovery_on_open_reports_progress(mem, monkeypatch, caplog):
    from visual_memory import progress

    env = dict(os.environ, VISMEM_CRASH_AT="forget:cleaned", PYTHONPATH="src")
    out = subprocess.run([sys.executable, "-c", "import sys, visual_memory as vm; vm.open(sys.argv[1]).forget(ids=[sys.argv[2]])",
                          str(mem.path), _ids(1)[0]], env=env, capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO):
        m = vm.open(mem.path)
    assert _ids(1)[0] not in m and not (mem.path / erasure.JOURNAL).exists()
    assert any(r.getMessage().startswith("verifying erasure: done") for r in caplog.records)


@pytest.mark.parametrize("chunk", [4096, 4099])  # aligned and unaligned chunks (object-store streams)
def test_scan_finds_needles_that_share_windows_at_every_offset(tmp_path, chunk):
    rng = np.random.default_rng(chunk)
    needles = [f"rec-{i:06d}".encode() for i in range(40)]  # 10 bytes: the 4-byte pass
    needles += [f"shared-prefix-record-{i:06d}".encode() for i in range(40)]  # 27 bytes, common windows
    needles += [rng.bytes(int(n)) for n in (8, 14, 15, 64, 5120)]
    planted = needles[::3]
    data = bytearray(rng.bytes(300_000))
    for n in planted:
        pos = int(rng.integers(0, len(data) - len(n)))
        data[pos : pos + len(n)] = n
    decoys = b"".join(n[:-1] + b"\xff" for n in needles)  # every needle but its last byte
    (tmp_path / "f.bin").write_bytes(bytes(data) + decoys)
    hits, files, nbytes = erasure.scan_files(tmp_path, needles, chunk_bytes=chunk)
    expected = {n for n in needles if n in (tmp_path / "f.bin").read_bytes()}
    assert {n for n, _ in hits} == expected and expected >= set(planted) and files == 1


def test_scan_of_sparse_vectors_among_zero_words(tmp_path):
    """Real embeddings are 40% exact zeros: the scan must find them without keying on zero words."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((400, 64)).astype(np.float32) - 0.23, 0)
    needles = [v.tobytes() for v in x[:30]]
    data = bytearray(x[30:].tobytes() + bytes(100_000))
    for k, n in enumerate(needles[:10]):
        pos = 8 * k * 997 + k % 8  # every alignment
        data[pos : pos + len(n)] = n
    (tmp_path / "vectors.lance").write_bytes(bytes(data))
    hits, _, _ = erasure.scan_files(tmp_path, needles, chunk_bytes=65536)
    assert {n for n, _ in hits} == {n for n in needles if n in bytes(data)} and len(hits) >= 10
    w = erasure._WindowFilter(needles)
    assert 0 not in w.passes[0][4]  # no needle is keyed by a zero word
