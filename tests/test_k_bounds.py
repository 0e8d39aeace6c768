"""k is bounded: refused above `MAX_K`, clamped to the memory's size for every search.

Before: ``classify(k=10**12)`` raised MemoryError, and ``--k 100000000`` on a
5-record memory took 147 s and 10 GB (the results were padded to k columns).
"""

from __future__ import annotations

import numpy as np
import pytest

import visual_memory as vm
from visual_memory.index import MAX_K


@pytest.fixture
def five(tmp_path, unit_vectors):
    mem = vm.create(tmp_path / "m", encoder=None, dim=16)
    x = unit_vectors(5, 16, seed=1)
    mem.add_embeddings(x, labels=["a", "a", "b", "b", "c"], ids=list("vwxyz"))
    return mem, x


@pytest.mark.parametrize("k", [10**12, MAX_K + 1])
def test_absurd_k_is_refused_naming_the_limit(five, k):
    mem, x = five
    for call in (lambda: mem.classify(x, k=k), lambda: mem.search(x, k=k), lambda: mem.kneighbors(x, k=k),
                 lambda: mem.predict_every_k(x, ks=[1, k]), lambda: mem.evaluate(x, ["a"] * 5, ks=[k])):
        with pytest.raises(ValueError, match=rf"k={k} .*the limit is {MAX_K}"):
            call()


def test_k_above_the_memory_size_is_clamped_and_reported(five):
    mem, x = five
    pred = mem.classify(x[:2], k=MAX_K)
    exact = mem.classify(x[:2], k=5)
    for p, q in zip(pred, exact):
        assert p.k == 5 and len(p.neighbors) == 5  # the k actually used
        assert p.label == q.label and p.scores == q.scores
        assert [n.id for n in p.neighbors] == [n.id for n in q.neighbors]
    sims, rows = mem.search(x[:2], k=1000)
    assert sims.shape == rows.shape == (2, 5) and (rows >= 0).all()
    _, ids = mem.kneighbors(x[:1], k=1000)
    assert sorted(ids[0]) == list("vwxyz")


def test_every_k_and_evaluate_accept_ks_above_the_size(five):
    """A k past the memory's size votes with every record: the same answer as k = len(memory)."""
    mem, x = five
    labels = ["a", "b", "b", "b", "c"]
    preds = mem.predict_every_k(x, ks=[1, 5, 50, 5000])
    for v, p in preds.items():
        assert p.shape == (5, 4)
        np.testing.assert_array_equal(p[:, 2], p[:, 1])
        np.testing.assert_array_equal(p[:, 3], p[:, 1])
        np.testing.assert_array_equal(p[:, 1], mem.predict(x, k=5, vote=v))
    res = mem.evaluate(x, labels, ks=[1, 5, 100])
    for v, acc in res.accuracy.items():
        assert set(acc) == {1, 5, 100} and acc[100] == acc[5]
        assert acc[1] == 0.8  # each vector is its own nearest record; one of five labels differs


def test_an_empty_memory_reports_k_zero(tmp_path, unit_vectors):
    mem = vm.create(tmp_path / "e", encoder=None, dim=4)
    pred = mem.classify(unit_vectors(1, 4), k=50)[0]
    assert pred.k == 0 and pred.neighbors == [] and pred.label is None
