"""The index layer: exact search is brute force; tombstones and compaction keep it so; FAISS backends work."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from visual_memory.errors import VectorError
from visual_memory import cpu
from visual_memory.index import as_queries, base, exact, exact_knn, exact_self_knn, make_index


def VectorIndex(dim, spec="Flat"):  # noqa: N802 - reads like the constructor it stands for
    return make_index(spec, dim)


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, alive: np.ndarray | None = None):
    """Reference kNN in float64 numpy: (similarities, rows), descending, ties by row."""
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    if alive is not None:
        sims[:, ~alive] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(xb.shape[0]), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("module", [exact, base, cpu])
def test_module_doctests(module):
    failures, tried = doctest.testmod(module)
    assert failures == 0 and (tried > 0 or module is base)


def test_exact_knn_and_self_knn_equal_brute_force(unit_vectors):
    xb, xq = unit_vectors(700, 24, seed=21), unit_vectors(30, 24, seed=22)
    sims, idx = exact_knn(xb, xq, 9, batch_size=7)  # several batches
    ref_sims, ref_idx = brute_force(xb, xq, 9)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    s_sims, s_idx = exact_self_knn(xb, 5, batch_size=64)
    full_sims, full_idx = brute_force(xb, xb, 6)
    for i in range(len(xb)):  # each row's own match removed, the next five kept in order
        want = [j for j in full_idx[i].tolist() if j != i][:5]
        assert s_idx[i].tolist() == want


def test_exact_search_equals_numpy_brute_force(unit_vectors):
    xb, xq = unit_vectors(2000, 64, seed=1), unit_vectors(50, 64, seed=2)
    ix = VectorIndex(64)
    ix.add(xb[:1200])
    ix.add(xb[1200:])  # added in two parts: rows continue
    sims, rows = ix.search(xq, 10)
    ref_sims, ref_rows = brute_force(xb, xq, 10)
    assert sims.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (50, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_k_larger_than_index_pads_with_missing(unit_vectors):
    ix = VectorIndex(8)
    ix.add(unit_vectors(3, 8))
    sims, rows = ix.search(unit_vectors(2, 8, seed=5), 5)
    assert rows.shape == (2, 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]


def test_empty_index_returns_only_missing():
    ix = VectorIndex(4)
    sims, rows = ix.search(np.eye(4, dtype=np.float32)[:2], 3)
    assert (rows == -1).all() and np.isneginf(sims).all()


def test_bad_k_is_refused(unit_vectors):
    ix = VectorIndex(8)
    ix.add(unit_vectors(3, 8))
    with pytest.raises(ValueError, match="k must be a positive integer; got 0"):
        ix.search(unit_vectors(1, 8), 0)


def test_tombstones_never_appear_and_results_stay_exact(unit_vectors):
    xb, xq = unit_vectors(500, 32, seed=3), unit_vectors(40, 32, seed=4)
    ix = VectorIndex(32)
    ix.add(xb)
    # Remove every query's current best hits, so the over-fetch path is exercised.
    _, top = ix.search(xq, 3)
    dead = np.unique(top)
    ix.remove(dead)
    ix.remove(dead[:5])  # removing twice is harmless
    assert ix.n_dead == len(dead) and ix.n_alive == 500 - len(dead) and ix.ntotal == 500
    alive = np.ones(500, dtype=bool)
    alive[dead] = False
    sims, rows = ix.search(xq, 10)
    assert not np.isin(rows, dead).any()
    ref_sims, ref_rows = brute_force(xb, xq, 10, alive)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_tombstones_leave_fewer_than_k(unit_vectors):
    ix = VectorIndex(8)
    ix.add(unit_vectors(4, 8))
    ix.remove(np.array([0, 2]))
    sims, rows = ix.search(unit_vectors(3, 8, seed=9), 4)
    assert sorted(rows[0, :2].tolist()) == [1, 3]
    assert (rows[:, 2:] == -1).all() and np.isneginf(sims[:, 2:]).all()


def test_compact_drops_tombstones_and_maps_rows(unit_vectors):
    xb, xq = unit_vectors(300, 16, seed=6), unit_vectors(20, 16, seed=7)
    ix = VectorIndex(16)
    ix.add(xb)
    dead = np.arange(0, 300, 3)
    ix.remove(dead)
    before_sims, before_rows = ix.search(xq, 7)
    old_rows = ix.compact()
    assert ix.ntotal == ix.n_alive == 200 and ix.n_dead == 0
    np.testing.assert_array_equal(old_rows, np.setdiff1d(np.arange(300), dead))
    sims, rows = ix.search(xq, 7)
    np.testing.assert_array_equal(old_rows[rows], before_rows)
    np.testing.assert_allclose(sims, before_sims, atol=1e-6)
    np.testing.assert_array_equal(ix.vectors(np.array([0, 1])), xb[old_rows[:2]])


def test_exact_index_returns_the_stored_vectors_and_erases_them(unit_vectors, tmp_path):
    xb = unit_vectors(10, 8)
    ix = VectorIndex(8)
    assert ix.lossless and ix.is_exact
    for i in range(10):  # one at a time: the matrix grows without losing rows
        ix.add(xb[i : i + 1])
    np.testing.assert_array_equal(ix.vectors(np.array([7, 2])), xb[[7, 2]])
    assert ix.erase(np.array([2])) is None
    assert not ix.vectors(np.array([2])).any() and 2 not in ix.search(xb[[2]], 9)[1]
    ix.save(tmp_path / "x.npz")
    back = exact.ExactIndex.load(tmp_path / "x.npz", 8)
    assert back.n_alive == 9 and back.ntotal == 10
    np.testing.assert_array_equal(back.search(xb, 4)[1], ix.search(xb, 4)[1])


@pytest.mark.parametrize("factory, params", [("HNSW32", {"efSearch": 128}), ("IVF8,Flat", {"nprobe": 8})])
def test_factory_strings_build_working_indexes(unit_vectors, factory, params):
    xb, xq = unit_vectors(1000, 32, seed=11), unit_vectors(20, 32, seed=12)
    ix = VectorIndex(32, factory)
    assert not ix.is_exact
    ix.add(xb)
    default = ix.search(xq, 5)[1]
    sims, rows = ix.search(xq, 5, params=params)
    # Per-call parameters never stick: a later call without them is what it was before.
    np.testing.assert_array_equal(ix.search(xq, 5)[1], default)
    _, ref_rows = brute_force(xb, xq, 5)
    # With the search parameter at its widest these indexes are (near) exact.
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows.tolist(), ref_rows.tolist())])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", xq, xb[rows]), atol=1e-5)
    # Tombstones work for approximate indexes too, and compaction keeps the rest findable.
    ix.remove(rows[:, 0])
    after = ix.search(xq, 5, params=params)[1]
    assert not np.isin(after, rows[:, 0]).any()
    old_rows = ix.compact()
    assert ix.ntotal == ix.n_alive == len(old_rows) == 1000 - len(np.unique(rows[:, 0]))
    np.testing.assert_array_equal(old_rows[ix.search(xq, 5, params=params)[1]], after)


def test_bad_factory_string_and_search_parameter():
    with pytest.raises(ValueError, match="invalid FAISS index factory string 'NoSuchIndex'"):
        VectorIndex(8, "NoSuchIndex")
    with pytest.raises(ValueError, match="for 7-d vectors"):
        VectorIndex(7, "IVF16,PQ4")  # PQ4 needs a dimension divisible by 4: checked at the real dimension
    ix = VectorIndex(8, "HNSW16")
    ix.add(np.eye(8, dtype=np.float32))
    with pytest.raises(ValueError, match="has no search parameter 'nprobe'"):
        ix.search(np.eye(8, dtype=np.float32)[:1], 2, params={"nprobe": 4})
    with pytest.raises(ValueError, match="exact search takes no search parameters"):
        VectorIndex(8).search(np.eye(8, dtype=np.float32)[:1], 2, params={"nprobe": 4})


def test_wrong_dimensions_are_refused_by_the_index(unit_vectors):
    ix = VectorIndex(8)
    with pytest.raises(VectorError, match=r"vectors must have shape \(n, 8\) for this index; got \(3, 7\)"):
        ix.add(unit_vectors(3, 7))
    with pytest.raises(VectorError, match=r"vectors must have shape \(n, 8\) for this index; got \(8,\)"):
        ix.add(unit_vectors(1, 8)[0])
    assert ix.ntotal == 0
    ix.add(unit_vectors(3, 8))
    with pytest.raises(VectorError, match=r"queries must have shape \(n, 8\) for this index; got \(2, 16\)"):
        ix.search(unit_vectors(2, 16), 1)
    assert ix.ntotal == 3 and ix.n_alive == 3


def test_as_queries_validates_and_normalises():
    q = as_queries(np.array([3.0, 4.0]), 2)
    assert q.shape == (1, 2) and q.dtype == np.float32 and q.flags.c_contiguous
    np.testing.assert_allclose(q, [[0.6, 0.8]])
    with pytest.raises(VectorError, match="dimension 3, but this memory's encoder gives 2-d"):
        as_queries(np.ones((2, 3)), 2)
    with pytest.raises(VectorError, match=r"must have shape \(n, 2\); got \(1, 1, 2\)"):
        as_queries(np.ones((1, 1, 2)), 2)
    with pytest.raises(VectorError, match="must be floating point; got int64"):
        as_queries(np.ones((1, 2), dtype=np.int64), 2)
    with pytest.raises(VectorError, match=r"NaN or infinite values \(rows \[1\]\)"):
        as_queries(np.array([[1.0, 0.0], [np.nan, 1.0]]), 2)
    with pytest.raises(VectorError, match=r"all-zero vectors \(rows \[0\]\)"):
        as_queries(np.zeros((1, 2)), 2, what="vectors")


def _clustered(n, d, seed, centres=50, noise=0.3):
    """Unit vectors in tight clusters: many near-ties, the hard case for reduced precision."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("with_dead", [False, True])
def test_bf16_kernel_returns_the_float32_top_k(with_dead):
    x = _clustered(6000, 64, seed=31)
    q = _clustered(80, 64, seed=32)
    alive = None
    if with_dead:
        alive = np.ones(len(x), bool)
        alive[np.random.default_rng(3).choice(len(x), 700, replace=False)] = False
    ref_s, ref_i = brute_force(x, q, 30, alive)
    s32, i32 = exact_knn(x, q, 30, alive=alive, bf16=False)
    s16, i16 = exact_knn(x, q, 30, alive=alive, bf16=True)
    np.testing.assert_array_equal(i16, i32)  # both kernels end in the same rescoring: identical
    np.testing.assert_array_equal(s16, s32)
    for a, b, sa, sb in zip(i16.tolist(), ref_i.tolist(), s16, ref_s):  # and equal to float64 brute force
        assert set(a) == set(b) or np.abs(np.sort(sa) - np.sort(sb)).max() < 1e-6


def test_exact_index_uses_bf16_where_wanted_and_erases_it_too(monkeypatch):
    monkeypatch.setenv("VISMEM_BF16", "1")
    monkeypatch.setattr(exact, "BF16_MIN_ROWS", 100)
    monkeypatch.setattr(exact, "BF16_MIN_QUERIES", 4)
    x = _clustered(3000, 32, seed=41)
    ix = VectorIndex(32)
    ix.add(x[:2000])
    q = x[:10]
    one = ix.search(q[:1], 5)  # a single query: the float32 kernel, no bf16 copy yet
    assert ix._bf16 is None
    batch = ix.search(q, 5)
    assert ix._bf16 is not None and len(ix._bf16.x) == 2000
    np.testing.assert_array_equal(batch[1][:1], one[1])
    ix.add(x[2000:])  # the copy follows adds
    assert len(ix._bf16.x) == 3000
    monkeypatch.setenv("VISMEM_BF16", "0")
    ref = ix.search(q, 5)
    monkeypatch.setenv("VISMEM_BF16", "1")
    np.testing.assert_array_equal(ix.search(q, 5)[1], ref[1])
    ix.erase(np.array([7]))
    assert not ix._bf16.x[7].any() and not ix.vectors(np.array([7])).any()
    assert 7 not in ix.search(q, 5)[1]


def test_faiss_switches_to_its_gemm_at_the_tuned_batch_size():
    import faiss

    x = _clustered(500, 48, seed=5)
    exact.faiss_knn(x, x[:3], 4)
    assert faiss.cvar.distance_compute_blas_threshold == exact.BLAS_MIN_QUERIES * 48


def test_cpu_features_are_detected_not_assumed(monkeypatch):
    from visual_memory import cpu

    f = cpu.features()
    assert set(f) == set(cpu.FLAGS) and all(isinstance(v, bool) for v in f.values())
    assert "cores; flags:" in cpu.summary()
    monkeypatch.setenv("VISMEM_BF16", "0")
    assert cpu.native_bf16() is False
    monkeypatch.setenv("VISMEM_BF16", "1")
    assert cpu.native_bf16() is True
    monkeypatch.delenv("VISMEM_BF16")
    assert cpu.native_bf16() == (f["avx512_bf16"] or f["amx_bf16"])
