"""Editing the memory: remove, forget (physical erasure), relabel, reweight, versions, tags, optimize."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import visual_memory as vm
from visual_memory import erasure
from visual_memory.errors import SelectorError, UnknownIdError, VisualMemoryError


def _ids(n, start=0):
    return [f"rec-{i:06d}-edit" for i in range(start, start + n)]


@pytest.fixture
def mem(memory_dir, unit_vectors):
    m = vm.create(memory_dir, encoder=None, dim=8)
    x = unit_vectors(60, 8, seed=1)
    m.add_embeddings(x, labels=[("cat", "dog", "fox")[i % 3] for i in range(60)], ids=_ids(60), source="batch-a",
                     metadata=[{"secret": f"meta-secret-{i:04d}"} for i in range(60)])
    m.vectors = x  # for the tests' own checks
    return m


def _nids(p) -> list[str]:
    return [n.id for n in p.neighbors]


def _nsims(p) -> list[float]:
    return [n.similarity for n in p.neighbors]


def _files_containing(root: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    """The tests' own scan (plain substring search, independent of erasure.scan_files)."""
    out: dict[bytes, list[str]] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            for n in needles:
                if n in data:
                    out.setdefault(n, []).append(str(f.relative_to(root)))
    return out


# -- remove and selectors ----------------------------------------------------------


def test_remove_by_id_stops_voting_at_once_and_persists(mem):
    x = mem.vectors
    assert mem.classify(x[5], k=1)[0].neighbors[0].id == _ids(60)[5]
    v = mem.version
    r = mem.remove(ids=_ids(60)[5])
    assert (r.version, r.removed, r.ids) == (v + 1, 1, [_ids(60)[5]])
    assert mem.classify(x[5], k=1)[0].neighbors[0].id != _ids(60)[5]
    assert _ids(60)[5] not in mem and len(mem) == 59
    again = vm.open(mem.path)
    assert _ids(60)[5] not in again and len(again) == 59
    assert again.classify(x[5], k=1)[0].neighbors[0].id != _ids(60)[5]


def test_selectors_label_source_where_images_and_and(mem, tmp_path):
    assert mem.remove(label="fox", where="id < 'rec-000010-edit'").removed == 3  # AND: foxes among the first 10
    assert mem.labels["fox"] == 17
    assert mem.remove(source="no-such-source").removed == 0
    assert mem.remove(where="label = 'dog' AND id >= 'rec-000050-edit'").removed == 3
    # images=: a record whose id is the image's content hash
    img = tmp_path / "pic.bin"
    img.write_bytes(b"any encoded image bytes")
    digest = vm.images.sha256_of(img)
    mem.add_embeddings(np.eye(8)[0], labels="cat", ids=[digest])
    assert mem.remove(images=[img]).ids == [digest]
    n = len(mem)
    assert mem.remove(label=["cat", "dog"]).removed == n - mem.labels["fox"]
    assert mem.remove(source="batch-a").removed == 17 and len(mem) == 0


def test_bad_input_changes_nothing(mem):
    before = (mem.version, len(mem), mem.labels)
    with pytest.raises(SelectorError, match="no selector"):
        mem.remove()
    with pytest.raises(SelectorError, match="empty"):
        mem.remove(ids=[])
    with pytest.raises(UnknownIdError, match="'missing-1'.*'missing-2'"):
        mem.remove(ids=[_ids(60)[0], "missing-1", "missing-2"])
    with pytest.raises(SelectorError, match="malformed filter"):
        mem.remove(where="label = = 'cat'")
    with pytest.raises(SelectorError, match="malformed filter"):
        mem.remove(where="no_such_column > 3")
    with pytest.raises(SelectorError, match="'catt' has no records"):
        mem.remove(label="catt")
    with pytest.raises(UnknownIdError):
        mem.forget(ids=["never-existed-id"])
    with pytest.raises(SelectorError):
        mem.forget(where="")
    with pytest.raises(UnknownIdError):
        mem.relabel(["nope"], "cat")
    with pytest.raises(ValueError, match="non-empty"):
        mem.relabel(_ids(60)[:1], "  ")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            mem.reweight(_ids(60)[:1], bad)
    with pytest.raises(ValueError, match="2 ids but 3 weights"):
        mem.reweight(_ids(60)[:2], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="tag name"):
        mem.tag("123")
    assert (mem.version, len(mem), mem.labels) == before
    assert vm.open(mem.path).version == before[0]


# -- relabel / reweight --------------------------------------------------------------


def test_relabel_and_reweight_are_honoured_by_votes_and_persist(mem):
    x, ids = mem.vectors, _ids(60)
    q = x[7]
    assert mem.classify(q, k=1)[0].label == "dog"
    r = mem.relabel([ids[7]], "wolf")
    assert r.changed == 1 and mem.classify(q, k=1)[0].label == "wolf"
    assert mem.relabel([ids[7]], "wolf").changed == 0  # no change, no version
    assert mem.version == r.version
    # weight 0: still retrieved and inspectable, never votes
    assert mem.reweight(ids[7], 0.0).changed == 1
    p = mem.classify(q, k=3)[0]
    assert p.neighbors[0].id == ids[7] and p.neighbors[0].weight == 0.0 and p.neighbors[0].contribution == 0.0
    assert "wolf" not in p.scores
    # per-record weights in one version
    v = mem.version
    assert mem.reweight([ids[1], ids[2]], [0.5, 2.0]).changed == 2 and mem.version == v + 1
    again = vm.open(mem.path)
    got = {r["id"]: r for r in again.get([ids[1], ids[2], ids[7]])}
    assert (got[ids[1]]["weight"], got[ids[2]]["weight"], got[ids[7]]["weight"]) == (0.5, 2.0, 0.0)
    assert got[ids[7]]["label"] == "wolf"
    p2 = again.classify(q, k=3)[0]
    assert p2.label == p.label and p2.scores == pytest.approx(p.scores)
    # edits after a relabel still find the moved rows
    assert again.remove(ids=[ids[7], ids[1]]).removed == 2
    assert set(vm.open(mem.path).ids()) == set(ids) - {ids[7], ids[1]}
    assert [e["op"] for e in again.history()][-4:] == ["relabel", "reweight", "reweight", "remove"]


# -- versions and tags ----------------------------------------------------------------


def test_every_mutation_bumps_version_and_old_versions_read(mem):
    ids = _ids(60)
    v0 = mem.version
    mem.tag("start")
    mem.remove(ids=ids[:2])
    mem.relabel(ids[2:4], "bird")
    mem.reweight(ids[4], 0.5)
    assert mem.version == v0 + 3
    old = vm.open(mem.path, version=v0)
    assert len(old) == 60 and old.labels.get("bird") is None
    tagged = vm.open(mem.path, version="start")
    assert tagged.version == v0 and len(tagged) == 60
    with pytest.raises(VisualMemoryError, match="read-only"):
        tagged.remove(ids=ids[10])
    assert mem.tags() == {"start": v0}
    audited = [e for e in mem.history() if e["op"] in ("remove", "relabel", "reweight")]
    assert [e["version"] for e in audited] == [v0 + 1, v0 + 2, v0 + 3]
    assert [r["version"] for r in mem.versions() if r["op"] == "relabel"] == [v0 + 2]


# -- forget: physical erasure --------------------------------------------------------


def test_forget_erases_every_byte_and_receipt_proves_it(mem):
    ids = _ids(60)
    gone = [ids[3], ids[30], ids[31]]
    stored = {r["id"]: r["vector"] for r in mem.get(gone, columns=["id", "vector"])}  # bytes exactly as on disk
    mem.relabel([ids[30]], "moved")  # a relabel leaves an old copy in another fragment
    mem.remove(ids=[ids[31]])  # removed earlier, bytes still on disk: forget accepts it from history
    mem.tag("before-forget")
    mem.add_embeddings(np.eye(8)[1:3], labels="late", ids=_ids(2, 100))
    vec_bytes = [stored[i].tobytes() for i in gone]
    id_bytes = [i.encode() for i in gone]
    meta_bytes = [f"meta-secret-{i:04d}".encode() for i in (3, 30, 31)]
    # positive control: the bytes are there before, so the scan below can fail
    before = _files_containing(mem.path, vec_bytes + id_bytes + meta_bytes)
    assert set(before) == set(vec_bytes + id_bytes + meta_bytes)

    receipt = mem.forget(ids=gone)
    assert receipt.erased == 3 and receipt.verification["ok"] is True
    assert receipt.verification["vectors_scanned"] == 3 and receipt.verification["ids_scanned"] == 3
    assert receipt.tags_dropped == ["before-forget"]
    salt = json.loads((mem.path / "manifest.json").read_text())["audit_salt"]
    assert receipt.id_hashes == sorted(erasure.salted_hash(salt, i) for i in gone)
    json.dumps(receipt.to_dict())
    assert _files_containing(mem.path, vec_bytes + id_bytes + meta_bytes) == {}
    # the memory still works, other records intact, forgotten ones gone from every readable version
    assert set(mem.ids()) == set(ids) - set(gone) | set(_ids(2, 100))
    assert all(g not in vm.open(mem.path) for g in gone)
    for v in mem._store.version_numbers():
        assert not set(gone) & set(vm.open(mem.path, version=v).ids())
    with pytest.raises(VisualMemoryError, match="erased by the forget"):
        vm.open(mem.path, version=receipt.version_before)
    assert vm.open(mem.path, version=1).version == 1  # versions before the records existed stay readable
    assert mem.history()[-1]["op"] == "forget" and gone[0] not in (mem.path / "audit.jsonl").read_text()
    # RAM too: the forgotten rows' vectors are zeroed in the index
    index = mem._state.index
    in_ram = index.vectors(np.arange(index.ntotal))
    assert not any((in_ram == stored[g]).all(axis=1).any() for g in gone)


def test_forget_by_label_and_nothing_found(mem):
    r = mem.forget(label="fox")
    assert r.erased == 20 and "fox" not in mem.labels
    with pytest.raises(SelectorError, match="matches no records"):
        mem.forget(where="label = 'fox'")


def test_unlearning_is_exact_on_cifar(cifar_small, tmp_path):
    """Forget S, then every answer equals that of a memory built without S."""
    tx, ty, vx = cifar_small["train_x"], cifar_small["train_y"], cifar_small["val_x"]
    ids = [f"cifar-{i:05d}-{Path(p).stem}" for i, p in enumerate(cifar_small["train_paths"])]
    rng = np.random.default_rng(0)
    s = np.zeros(len(ids), bool)
    s[rng.choice(len(ids), 40, replace=False)] = True
    full = vm.create(tmp_path / "full", encoder=None, dim=tx.shape[1])
    full.add_embeddings(tx, labels=list(ty), ids=ids)
    receipt = full.forget(ids=[i for i, d in zip(ids, s) if d])
    assert receipt.erased == 40 and receipt.verification["ok"]
    scratch = vm.create(tmp_path / "scratch", encoder=None, dim=tx.shape[1])
    scratch.add_embeddings(tx[~s], labels=[y for y, d in zip(ty, s) if not d], ids=[i for i, d in zip(ids, s) if not d])
    for m in (full, vm.open(tmp_path / "full")):  # in-process and reopened from disk
        for vote in ("rank", "softmax", "plurality", "distance"):
            a, b = m.classify(vx, k=25, vote=vote), scratch.classify(vx, k=25, vote=vote)
            assert [p.label for p in a] == [p.label for p in b]
            assert [_nids(p) for p in a] == [_nids(p) for p in b]
            assert all(_nsims(p) == _nsims(q) for p, q in zip(a, b))
            assert [p.scores for p in a] == [p.scores for p in b]
        pa, pb = m.predict_every_k(vx, ks=range(1, 51)), scratch.predict_every_k(vx, ks=range(1, 51))
        assert all(np.array_equal(pa[v], pb[v]) for v in pa)


def test_forget_real_images_erases_thumbnails_sources_metadata(cifar_root, encoder, tmp_path):
    paths = sorted((cifar_root / "train" / "cat").glob("*.jpg"))[:6] + sorted((cifar_root / "train" / "dog").glob("*.jpg"))[:6]
    m = vm.create(tmp_path / "m", encoder=encoder)
    m.add(paths, labels=["cat"] * 6 + ["dog"] * 6, metadata=[{"note": f"private-note-{i:03d}"} for i in range(12)])
    target = paths[:2] + paths[6:7]
    rows = m.get([vm.images.sha256_of(p) for p in target], columns=["id", "vector", "thumbnail", "source", "metadata"])
    needles = [r["vector"].tobytes() for r in rows] + [r["thumbnail"] for r in rows] + [r["id"].encode() for r in rows] \
        + [r["source"].encode() for r in rows] + [r["metadata"]["note"].encode() for r in rows]
    assert all(n for n in needles) and len(_files_containing(m.path, needles)) == len(needles)
    receipt = m.forget(images=target)
    assert receipt.erased == 3 and receipt.verification["ok"]
    assert _files_containing(m.path, needles) == {}
    assert len(m) == 9 and m.classify(paths[8:9], k=1)[0].neighbors[0].id == vm.images.sha256_of(paths[8])


# -- compaction ------------------------------------------------------------------------


def test_small_adds_compact_automatically_and_optimize_shrinks(memory_dir, unit_vectors):
    m = vm.create(memory_dir, encoder=None, dim=8)
    x = unit_vectors(150, 8, seed=3)
    for i in range(150):
        m.add_embeddings(x[i], labels="a" if i % 2 else "b", ids=[f"one-by-one-{i:04d}"])
    small = len(m._store.fragment_ids())
    assert small <= 65, small  # auto-compaction kept fragments bounded
    assert any(e["op"] == "optimize" and e["auto"] for e in m.history())
    m.remove(ids=[f"one-by-one-{i:04d}" for i in range(0, 150, 3)])
    size_before = m._store.size_bytes()
    r = m.optimize(cleanup_older_than=timedelta(0))
    assert r.fragments_after <= 2 and r.versions_removed > 0 and r.bytes_after < size_before
    assert m.index["ntotal"] == m.index["alive"] == len(m) == 100
    reopened = vm.open(memory_dir)
    q = x[1:20]
    assert [_nids(p) for p in reopened.classify(q, k=5)] == [_nids(p) for p in m.classify(q, k=5)]


def test_forget_with_approximate_index_drops_vectors_from_ram(memory_dir, unit_vectors):
    m = vm.create(memory_dir, encoder=None, dim=8, index="HNSW32")
    x = unit_vectors(200, 8, seed=9)
    m.add_embeddings(x, labels="a", ids=_ids(200))
    stored = m.get(_ids(200)[:5], columns=["id", "vector"])
    r = m.forget(ids=_ids(200)[:5])
    assert r.verification["ok"] and len(m) == 195 and m.index["ntotal"] == 195  # rebuilt without them
    index = m._state.index
    in_ram = np.stack([index._index.reconstruct(i) for i in range(index.ntotal)])
    assert not any((in_ram == s["vector"]).all(axis=1).any() for s in stored)
    assert m.classify(x[10], k=1)[0].neighbors[0].id == _ids(200)[10]
    assert m.remove(ids=_ids(200)[10]).removed == 1  # row addresses still right after the rebuild


@pytest.mark.parametrize("n_needles", [3, 40])  # bytes.find path and the window filter
def test_scan_files_matches_plain_search(tmp_path, n_needles):
    rng = np.random.default_rng(n_needles)
    needles = [rng.bytes(int(rng.choice([8, 11, 14, 15, 32, 1536]))) for _ in range(n_needles)]
    planted = needles[: n_needles // 2 + 1]
    for k in range(3):
        data = bytearray(rng.bytes(200_000))
        for n in planted:
            pos = int(rng.integers(0, len(data) - len(n)))
            data[pos : pos + len(n)] = n  # every alignment, some across the 4,096-byte chunk edges
        (tmp_path / f"f{k}.bin").write_bytes(bytes(data))
    (tmp_path / "skip.me").write_bytes(b"".join(needles))
    hits, files, nbytes = erasure.scan_files(tmp_path, needles, exclude={"skip.me"}, chunk_bytes=4096)
    expected = {(n, f"f{k}.bin") for k in range(3) for n in needles if n in (tmp_path / f"f{k}.bin").read_bytes()}
    assert set(hits) == expected and files == 3 and nbytes == 600_000
    assert {n for n, _ in hits} >= set(planted)
