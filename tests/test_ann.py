"""Approximate indexes inside a memory: every backend through the Memory API, saved with it, erasable.

Synthetic clustered vectors (the labels are the clusters), small enough for
CI; the 1M/10M measurements are in benchmarks/bench_ann.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory.cli import app
from visual_memory.erasure import scan_files
from visual_memory.index import FaissIndex, min_train_size, saved
from visual_memory.memory import state as state_mod

D = 32
BACKENDS = ["IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8np", "HNSW16"]


def clustered(n: int, d: int = D, clusters: int = 20, seed: int = 0, spread: float = 0.25):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    labels = rng.integers(0, clusters, n)
    x = (centres[labels] + spread * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), [f"c{c}" for c in labels]


def make(tmp_path: Path, spec: str, n: int, *, name: str = "m", seed: int = 0, spread: float = 0.25):
    x, labels = clustered(n, seed=seed, spread=spread)
    mem = vm.create(tmp_path / name, encoder=None, dim=D, index=spec)
    mem.add_embeddings(x, labels, ids=[f"r{i}" for i in range(n)])
    return mem, x, labels


def n_for(spec: str) -> int:
    return max(min_train_size(spec), 700) + 300


@pytest.mark.parametrize("spec", BACKENDS)
def test_every_backend_adds_classifies_removes_forgets_and_reopens(tmp_path, spec):
    n = n_for(spec)
    mem, x, labels = make(tmp_path, spec, n)
    assert mem.index["spec"] == spec and not mem.index["exact"]
    q = x[:40]
    params = {"efSearch": 64} if spec.startswith("HNSW") else {"nprobe": 16}  # every list: exact among candidates
    preds = mem.classify(q, k=10, search_params=params)
    assert np.mean([p.label == labels[i] for i, p in enumerate(preds)]) >= 0.95
    # Top-1 of a stored vector is itself; a compressed index finds it among its re-ranked candidates.
    selves = np.mean([p.neighbors[0].id == f"r{i}" for i, p in enumerate(preds)])
    assert selves >= (0.9 if mem.index.get("compressed") else 1.0)

    mem.remove(ids=["r0", "r1"])
    after = mem.classify(q[:2], k=5, search_params=params)
    assert all(nb.id not in ("r0", "r1") for p in after for nb in p.neighbors)
    assert len(mem) == n - 2

    again = vm.open(tmp_path / "m")
    assert again._state.load_note.startswith("loaded the saved index"), again._state.load_note
    assert len(again) == n - 2
    reopened = again.classify(q, k=10, search_params=params)
    before = mem.classify(q, k=10, search_params=params)
    assert [[nb.id for nb in p.neighbors] for p in reopened] == [[nb.id for nb in p.neighbors] for p in before]

    receipt = again.forget(ids=["r5", "r6"])
    assert receipt.verification["ok"] is True
    if again.index.get("compressed"):
        assert receipt.verification["codes_scanned"] >= 1
    assert all(nb.id not in ("r5", "r6") for p in again.classify(q[5:7], k=5, search_params=params) for nb in p.neighbors)
    last = vm.open(tmp_path / "m")
    assert len(last) == n - 4 and last._state.load_note.startswith("loaded the saved index")


def test_compressed_indexes_return_exact_similarities_of_the_stored_vectors(tmp_path):
    mem, x, _ = make(tmp_path, "IVF16,PQ8np", n_for("IVF16,PQ8np"))
    sims, rows = mem.search(x[:5], k=8, params={"nprobe": 16})
    ids = mem.rows.id_lists(rows)
    for i in range(5):
        stored = np.stack([x[int(r[1:])] for r in ids[i]])
        np.testing.assert_allclose(sims[i], stored @ x[i], rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(sims[i]) <= 1e-7)
    # Without re-ranking the similarities are the codes' (approximate), never the stored ones.
    raw, _ = mem.search(x[:5], k=8, params={"nprobe": 16, "rerank": 0})
    assert not np.allclose(raw, sims, atol=1e-4)
    # Vectors for forget, prune and evaluation come from the store, bit for bit.
    np.testing.assert_array_equal(mem.vectors(np.array([3, 7])), x[[3, 7]])


def test_a_tiny_first_add_stays_exact_until_the_index_can_train(tmp_path):
    mem, x, labels = make(tmp_path, "IVF64,Flat", 5)
    assert mem.index["spec"] == "Flat" and mem.index["exact"]
    assert "trains at 2496 records" in mem.info()["index_note"]
    assert mem.classify(x[:1], k=1)[0].neighbors[0].id == "r0"
    more, more_labels = clustered(2600, seed=1)
    mem.add_embeddings(more, more_labels, ids=[f"s{i}" for i in range(2600)])
    assert mem.index["spec"] == "IVF64,Flat" and mem.index["ntotal"] == 2605 == len(mem)
    assert mem.history()[-1]["op"] == "index" and mem.history()[-1]["action"] == "trained"
    assert vm.open(tmp_path / "m")._state.load_note.startswith("loaded the saved index")


def test_a_failed_training_leaves_the_records_committed_and_search_exact(tmp_path, monkeypatch):
    mem, x, _ = make(tmp_path, "IVF16,Flat", 100)

    def boom(self, vectors):
        raise RuntimeError("training failed")

    monkeypatch.setattr(FaissIndex, "train", boom)
    more, labels = clustered(700, seed=2)
    mem.add_embeddings(more, labels, ids=[f"s{i}" for i in range(700)])
    assert len(mem) == 800 == mem.index["ntotal"] and mem.index["exact"]
    assert mem.search(more[:1], k=1)[1].tolist() == [[100]]
    assert not (tmp_path / "m" / "index").exists()


def test_search_parameters_never_stick_to_the_index_nor_leak_across_threads(tmp_path):
    mem, x, _ = make(tmp_path, "IVF16,Flat", 2000)
    q = x[:64]
    default = mem.search(q, k=10)[1]
    one = mem.search(q, k=10, params={"nprobe": 1})[1]
    full = mem.search(q, k=10, params={"nprobe": 16})[1]
    assert not np.array_equal(one, full)  # nprobe matters here, so a leak would show
    np.testing.assert_array_equal(mem.search(q, k=10)[1], default)
    results: dict = {}

    def run(tag, params):
        results[tag] = [mem.search(q, k=10, params=params)[1] for _ in range(20)]

    threads = [threading.Thread(target=run, args=(t, p)) for t, p in (("one", {"nprobe": 1}), ("full", {"nprobe": 16}),
                                                                    ("default", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got in results["one"]:
        np.testing.assert_array_equal(got, one)
    for got in results["full"]:
        np.testing.assert_array_equal(got, full)
    for got in results["default"]:
        np.testing.assert_array_equal(got, default)
    with pytest.raises(ValueError, match="no search parameter 'efSearch'"):
        mem.search(q, k=3, params={"efSearch": 10})


def test_the_factory_string_is_checked_at_the_memorys_real_dimension(tmp_path):
    vm.create(tmp_path / "a", encoder=None, dim=384, index="IVF4096,PQ64np")  # refused at dim=1 before
    with pytest.raises(ValueError, match="PQ7"):
        vm.create(tmp_path / "b", encoder=None, dim=384, index="IVF64,PQ7")  # 7 does not divide 384
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_ivf_removal_is_real_and_forget_zeroes_the_codes_in_ram(tmp_path):
    mem, x, _ = make(tmp_path, "IVF16,PQ8np", n_for("IVF16,PQ8np"))
    ix = mem._state.index
    assert ix._index.ntotal == len(mem)
    mem.remove(ids=["r3"])
    assert ix._index.ntotal == len(mem)  # the code left the inverted list (remove_ids), not a tombstone
    codes = ix.codes(x[[10, 11]])
    assert ix.live_codes_among(codes) == set(codes)
    mem.forget(ids=["r10", "r11"])
    ix = mem._state.index
    assert ix.live_codes_among(codes) == set()
    hits, _, _ = scan_files(tmp_path / "m", codes)
    assert hits == []


def test_a_crash_while_saving_the_index_loses_nothing(tmp_path):
    mem, x, _ = make(tmp_path, "IVF16,Flat", 1000)
    script = (f"import visual_memory as vm; m = vm.open({str(tmp_path / 'm')!r}); m.remove(ids=['r1', 'r2'])")
    env = {**os.environ, "VISMEM_CRASH_AT": "index:files-written"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    back = vm.open(tmp_path / "m")
    assert len(back) == 998 and "r1" not in back and "r3" in back  # the store's commit stands
    assert not back._state.load_note.startswith("loaded")  # the old saved index is not of this version: rebuilt
    assert back.search(x[:1], k=1, params={"nprobe": 16})[1].tolist() == [[0]]
    assert all(nb.id not in ("r1", "r2") for nb in back.classify(x[1:3], k=5)[0].neighbors)
    back.remove(ids=["r4"])  # the next save removes the crashed save's orphan files
    meta = json.loads((tmp_path / "m" / "index" / "meta.json").read_text())
    assert sorted(p.name for p in (tmp_path / "m" / "index").iterdir()) == sorted(
        ["meta.json"] + [Path(f).name for f in meta["files"].values()])


def test_a_corrupt_or_foreign_saved_index_is_never_used(tmp_path, caplog):
    mem, x, _ = make(tmp_path, "IVF16,Flat", 1000)
    meta = json.loads((tmp_path / "m" / "index" / "meta.json").read_text())
    blob = tmp_path / "m" / meta["files"]["index"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    back = vm.open(tmp_path / "m")
    assert "corrupt" in back._state.load_note and any("corrupt" in r.message for r in caplog.records)
    assert back.search(x[:3], k=1, params={"nprobe": 16})[1].ravel().tolist() == [0, 1, 2]
    # Another spec's saved index (e.g. a copy from another memory) is refused by its meta.
    found, why = saved.load(back._store.storage, spec="IVF32,Flat", dim=D, fingerprint=f"vectors-{D}d",
                            index_class=FaissIndex)
    assert found is None and "spec" in why


def test_appends_after_the_last_save_are_caught_up_on_open(tmp_path):
    mem, x, labels = make(tmp_path, "IVF16,Flat", 1000)
    saved_version = json.loads((tmp_path / "m" / "index" / "meta.json").read_text())["version"]
    more, more_labels = clustered(10, seed=3)
    mem.add_embeddings(more, more_labels, ids=[f"s{i}" for i in range(10)])  # 1%: not saved (open catches up)
    assert json.loads((tmp_path / "m" / "index" / "meta.json").read_text())["version"] == saved_version
    back = vm.open(tmp_path / "m")
    assert "appended fragment" in back._state.load_note and len(back) == 1010
    assert back.classify(more[:1], k=1, search_params={"nprobe": 16})[0].neighbors[0].id == "s0"


def test_auto_picks_by_size_and_budget_and_says_so(tmp_path):
    mem, x, labels = make(tmp_path, "auto", 500)
    assert mem.index["spec"] == "Flat" and "auto" in mem.info()["index"]
    big, big_labels = clustered(10_000, seed=4)
    mem.add_embeddings(big, big_labels, ids=[f"b{i}" for i in range(10_000)])
    out = mem.build_index("auto", budget="8GB")
    assert out["resolved"] == "IVF256,Flat" and mem.index["spec"] == "IVF256,Flat"
    out = mem.build_index("auto", budget="1MB")  # 10.5k x 32 floats do not fit: PQ
    assert out["resolved"].endswith("PQ4np") and mem.index["compressed"]
    info = vm.open(tmp_path / "m").info()
    assert info["index"] == "auto" and info["index_stats"]["spec"] == out["resolved"]
    assert info["index_note"].startswith(f"auto chose {out['resolved']!r}")
    assert [e["action"] for e in mem.history() if e["op"] == "index"] == ["build", "build"]
    mem.build_index("Flat")
    assert not (tmp_path / "m" / "index").exists() and mem.index["exact"]


def test_cli_index_build_and_check(tmp_path):
    make(tmp_path, "Flat", 1200, spread=2.0)  # overlapping clusters: one list of sixteen misses neighbours
    runner = CliRunner()
    res = runner.invoke(app, ["index", "build", str(tmp_path / "m"), "--index", "IVF16,Flat", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["resolved"] == "IVF16,Flat"
    res = runner.invoke(app, ["index", "check", str(tmp_path / "m"), "--queries", "30", "--k", "10", "--json",
                              "--params", '{"nprobe": 16}'])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert list(out)[:5] == ["recall_at_k", "agreement", "k", "queries", "speedup"]
    assert out["recall_at_k"] == 1.0 and out["agreement"] == 1.0 and out["k"] == 10 and out["queries"] == 30
    low = json.loads(runner.invoke(app, ["index", "check", str(tmp_path / "m"), "--queries", "30", "--k", "10",
                                         "--json", "--params", '{"nprobe": 1}']).output)
    assert low["recall_at_k"] < 0.9  # the check can fail
    res = runner.invoke(app, ["index", "check", str(tmp_path / "m"), "--params", "[1]"])
    assert res.exit_code != 0 and "JSON object" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert "IVF16,Flat" in res.output


_RSS = r"""
import sys
import faiss, lance, numpy as np, pyarrow, visual_memory as vm
from visual_memory.memory import indexing, state  # everything open imports lazily, loaded before measuring

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

x = np.load(sys.argv[2])
vm.open(sys.argv[3]).classify(x[:1], k=1)  # warm the code paths on a tiny memory
before = rss_kib()
m = vm.open(sys.argv[1])
preds = m.classify(x[:20], k=10)
truth = m.get([f"r{i}" for i in range(20)], columns=["label"])
ok = sum(p.label == t["label"] for p, t in zip(preds, truth))
print(before, rss_kib(), ok)
"""


def test_a_compressed_memory_opens_and_classifies_without_loading_its_vectors(tmp_path, monkeypatch):
    # RSS held after open + classify, in a fresh process, against the raw vectors' size: the
    # exact memory must load them all (the control that shows the check can fail), the
    # IVF-PQ memory only its codes (8 + 32 bytes a record) and the few rows it re-ranks.
    monkeypatch.setattr(state_mod, "TRAIN_SAMPLE", 10_000)
    n, d = 150_000, 256
    x, labels = clustered(n, d=d, clusters=50)
    np.save(tmp_path / "q.npy", x[:20])
    raw_mb = x.nbytes / 2**20
    vm.create(tmp_path / "tiny", encoder=None, dim=d).add_embeddings(x[:5], labels[:5])
    peaks = {}
    for spec in ("Flat", "IVF64,PQ32np"):
        mem = vm.create(tmp_path / spec.replace(",", "_"), encoder=None, dim=d, index=spec)
        mem.add_embeddings(x, labels, ids=[f"r{i}" for i in range(n)])
        del mem
        out = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path / spec.replace(",", "_")), str(tmp_path / "q.npy"),
                              str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        before, peak, ok = map(int, out.stdout.split()[-3:])
        assert ok >= 18  # it classifies
        peaks[spec] = (peak - before) / 1024
    assert peaks["Flat"] >= 0.9 * raw_mb, peaks
    assert peaks["IVF64,PQ32np"] < 0.35 * raw_mb, peaks


def test_evaluations_default_to_exact_search_and_say_which_index_answered(tmp_path):
    mem, x, labels = make(tmp_path, "IVF16,Flat", 2000, spread=2.0)
    q, truth = clustered(200, seed=9, spread=2.0)
    exact = mem.evaluate(q, truth, ks=[10], votes=["plurality"])
    approx = mem.evaluate(q, truth, ks=[10], votes=["plurality"], search="index")
    assert exact.extra["search"].startswith("Flat (exact") and approx.extra["search"] == "IVF16,Flat"
    flat = vm.create(tmp_path / "flat", encoder=None, dim=D)
    flat.add_embeddings(x, labels, ids=[f"r{i}" for i in range(2000)])
    assert flat.evaluate(q, truth, ks=[10], votes=["plurality"]).accuracy == exact.accuracy
    with pytest.raises(ValueError, match="search must be"):
        mem.evaluate(q, truth, search="approximate")


def test_edits_that_leave_the_index_alone_rewrite_only_the_row_table(tmp_path):
    mem, x, _ = make(tmp_path, "IVF16,PQ8np", n_for("IVF16,PQ8np"))
    meta = lambda: json.loads((tmp_path / "m" / "index" / "meta.json").read_text())  # noqa: E731
    first = meta()["files"]
    mem.remove(ids=["r1"])
    mem.relabel(["r2"], "relabelled")
    after = meta()["files"]
    assert after["index"] == first["index"] and after["rows"] != first["rows"]  # the codes file was kept
    back = vm.open(tmp_path / "m")
    assert back._state.load_note.startswith("loaded the saved index") and len(back) == len(mem)
    assert back._state.index.n_alive == len(mem) and "r1" not in back
    assert all(nb.id != "r1" for nb in back.classify(x[1:2], k=5, search_params={"nprobe": 16})[0].neighbors)
    assert back.get(["r2"], columns=["label"])[0]["label"] == "relabelled"
    back.forget(ids=["r3"])  # erasure: the codes file itself is rewritten
    assert meta()["files"]["index"] != first["index"]
    assert not (tmp_path / "m" / first["index"]).exists()


def test_batched_re_ranking_in_chunks_answers_as_one_query_at_a_time(tmp_path, monkeypatch):
    mem, x, _ = make(tmp_path, "IVF16,PQ8np", n_for("IVF16,PQ8np"))
    monkeypatch.setattr(state_mod, "RERANK_ROWS", 100)  # 2 queries per chunk at k=10, rerank 4
    sims, rows = mem.search(x[:25], k=10)
    for i in (0, 1, 2, 13, 24):
        s1, r1 = mem.search(x[i : i + 1], k=10)
        np.testing.assert_array_equal(rows[i], r1[0])
        np.testing.assert_allclose(sims[i], s1[0], rtol=1e-6)
