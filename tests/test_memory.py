"""The Memory facade: create/open/add/add_embeddings/classify/get/records/info/history."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import visual_memory as vm
from visual_memory.errors import DuplicateIdError, UnknownIdError
from authors_reference import authors_prediction_at_k


@pytest.fixture
def small_mem(memory_dir, unit_vectors):
    """A vectors-only memory: 60 records, 3 labels, ids r00..r59."""
    mem = vm.create(memory_dir, encoder=None, dim=8)
    x = unit_vectors(60, 8, seed=1)
    labels = [("cat", "dog", "owl")[i % 3] for i in range(60)]
    mem.add_embeddings(x, labels, ids=[f"r{i:02d}" for i in range(60)])
    return mem, x, labels


def _audit(mem):
    return [json.loads(line) for line in (mem.path / "audit.jsonl").read_text().splitlines()]


def test_create_open_and_info(memory_dir):
    mem = vm.create(memory_dir, encoder=None, dim=8)
    assert len(mem) == 0 and mem.dim == 8 and mem.path == memory_dir
    info = mem.info()
    assert info["count"] == 0 and info["labels"] == {} and info["encoder"] == "vectors-8d"
    assert info["dim"] == 8 and info["version"] == mem.version and info["size_bytes"] > 0
    assert repr(vm.open(memory_dir)).startswith(f"Memory(path={str(memory_dir)!r}, records=0")


def test_add_embeddings_normalises_counts_and_bumps_version(memory_dir):
    mem = vm.create(memory_dir, encoder=None, dim=2)
    v0 = mem.version
    res = mem.add_embeddings(np.array([[3.0, 4.0], [0.0, 2.0]]), ["a", "b"], ids=["x", "y"], source="test",
                             metadata=[{"k": 1}, None])
    assert res.added == 2 and res.version == v0 + 1 == mem.version and res.ids == ["x", "y"] and res.skipped == []
    assert len(mem) == 2 and mem.labels == {"a": 1, "b": 1} and "x" in mem and "z" not in mem
    rec = mem.get(["y", "x"], columns=["id", "label", "vector", "source", "weight", "metadata"])
    assert [r["id"] for r in rec] == ["y", "x"]
    np.testing.assert_allclose(rec[1]["vector"], [0.6, 0.8], rtol=1e-6)  # stored L2-normalised
    assert rec[1]["source"] == "test" and rec[1]["weight"] == 1.0 and rec[1]["metadata"] == {"k": 1}
    assert rec[0]["metadata"] is None
    mem.add_embeddings(np.array([[1.0, 1.0]]), "a", ids=["z"])
    assert mem.version == v0 + 2 and mem.labels == {"a": 2, "b": 1}


def test_default_embedding_ids_are_sha256_of_the_normalised_float32_vector(memory_dir):
    mem = vm.create(memory_dir, encoder=None, dim=2)
    res = mem.add_embeddings(np.array([[3.0, 4.0]]), ["a"])
    assert res.ids == [hashlib.sha256(np.array([0.6, 0.8], dtype=np.float32).tobytes()).hexdigest()]


def _brute_force(q, x, k):
    """Neighbours by a full sort of every similarity (no index), nearest first."""
    sims = (q.astype(np.float64) @ x.astype(np.float64).T)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_classify_matches_the_authors_vote_on_brute_force_neighbours(small_mem, unit_vectors):
    mem, x, labels = small_mem
    q = unit_vectors(7, 8, seed=2)
    order, top = _brute_force(q, x, 9)
    for vote in vm.VOTES:
        preds = mem.classify(q, k=9, vote=vote)
        assert len(preds) == 7
        for i, p in enumerate(preds):
            classes = [labels[j] for j in order[i]]
            assert p.label == authors_prediction_at_k(vote, classes, 1 - top[i], [f"r{j:02d}" for j in order[i]])[-1], (vote, i)
            assert p.k == 9 and p.vote == vote and p.version == mem.version
            assert [n.id for n in p.neighbors] == [f"r{j:02d}" for j in order[i]]
            assert [n.rank for n in p.neighbors] == list(range(9))
            np.testing.assert_allclose([n.similarity for n in p.neighbors], top[i], atol=1e-5)
            # Scores: the sum of a label's contributions, written out per vote (PAPER.md's table).
            w = {"plurality": np.ones(9), "distance": np.exp(-(1 - top[i])), "rank": 1 / (2 + np.arange(9)),
                 "softmax": np.exp((top[i] - top[i, 0]) / 0.07)}[vote]
            want = {lab: sum(wj for wj, c in zip(w, classes) if c == lab) for lab in set(classes)}
            assert set(p.scores) == set(want)
            for lab, score in p.scores.items():
                assert score == pytest.approx(want[lab], rel=1e-5)
                assert score == pytest.approx(sum(n.contribution for n in p.neighbors if n.label == lab))
            assert list(p.scores.values()) == sorted(p.scores.values(), reverse=True)
            assert next(iter(p.scores)) == p.label
            assert all(n.weight == 1.0 for n in p.neighbors)


def _line_memory(memory_dir, labels):
    """Records on a 2-d arc at angles 0.1, 0.2, ...: the query (1, 0) sees them in order."""
    mem = vm.create(memory_dir, encoder=None, dim=2)
    ang = 0.1 * (1 + np.arange(len(labels)))
    mem.add_embeddings(np.stack([np.cos(ang), np.sin(ang)], 1), labels, ids=[f"n{i}" for i in range(len(labels))])
    return mem, np.array([[1.0, 0.0]])


def test_classify_ties_and_scores_follow_the_authors_rule(memory_dir):
    mem, q = _line_memory(memory_dir, ["A", "B", "B", "A"])
    (p,) = mem.classify(q, k=4, vote="plurality")
    # 2-2: B reached 2 at the third neighbour, A only at the fourth; the scores list the winner first.
    assert p.label == "B" and list(p.scores) == ["B", "A"] and p.scores == {"B": 2.0, "A": 2.0}
    assert [mem.classify(q, k=k, vote="plurality")[0].label for k in (1, 2, 3, 4)] == ["A", "A", "B", "B"]
    assert mem.predict_every_k(q, ks=[1, 2, 3, 4], votes=["plurality"])["plurality"].tolist() == [["A", "A", "B", "B"]]


def test_weight_zero_records_are_excluded_from_the_vote_and_the_ranks(memory_dir):
    mem, q = _line_memory(memory_dir, ["D", "C", "D", "D", "C"])
    mem.reweight(["n0"], 0.0)  # the nearest record: no vote, no rank position
    (p,) = mem.classify(q, k=5, vote="rank")
    # voters C 1/2, D 1/3, D 1/4, C 1/5: C .7 vs D .583
    assert [n.contribution for n in p.neighbors] == pytest.approx([0.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert [n.rank for n in p.neighbors] == [0, 1, 2, 3, 4]  # k counts positions in the retrieved list
    assert p.label == "C" and p.scores == pytest.approx({"C": 0.7, "D": 7 / 12})
    every = mem.predict_every_k(q, ks=[1, 2, 3, 4, 5], votes=["rank", "plurality"])
    assert every["rank"].tolist() == [list("DCCDC")]  # k=1: no voter yet, the nearest's label (the authors' fallback)
    assert every["plurality"].tolist() == [list("DCCDD")]
    # Every retrieved neighbour excluded: none is.
    mem.reweight(["n1", "n2"], 0.0)
    (p,) = mem.classify(q, k=3, vote="rank")
    assert [n.contribution for n in p.neighbors] == pytest.approx([1 / 2, 1 / 3, 1 / 4]) and p.label == "D"
    # A soft weight multiplies and keeps its position.
    mem.reweight(["n0", "n1", "n2"], [1.0, 0.25, 1.0])
    (p,) = mem.classify(q, k=3, vote="rank")
    assert [n.contribution for n in p.neighbors] == pytest.approx([1 / 2, 0.25 / 3, 1 / 4])


def test_classify_one_vector_and_self_match(small_mem):
    mem, x, labels = small_mem
    (p,) = mem.classify(x[4], k=1)
    assert p.label == labels[4] and p.neighbors[0].id == "r04"
    assert p.neighbors[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert p.neighbors[0].distance == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < p.confidence <= 1.0
    d = p.to_dict()
    assert d["label"] == labels[4] and d["neighbors"][0]["id"] == "r04"


def test_classify_with_k_above_memory_size(memory_dir):
    mem = vm.create(memory_dir, encoder=None, dim=2)
    mem.add_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), ["a", "b"], ids=["x", "y"])
    (p,) = mem.classify(np.array([[1.0, 0.1]]), k=5)
    assert p.label == "a" and [n.id for n in p.neighbors] == ["x", "y"]


def test_empty_memory_predicts_none(memory_dir):
    mem = vm.create(memory_dir, encoder=None, dim=2)
    (p,) = mem.classify(np.array([[1.0, 0.0]]), k=3)
    assert p.label is None and p.scores == {} and p.neighbors == []


def test_bad_k_and_vote_are_refused(small_mem):
    mem, x, _ = small_mem
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            mem.classify(x[:1], k=k)
    with pytest.raises(ValueError, match="unknown vote 'best'"):
        mem.classify(x[:1], vote="best")


def test_predict_every_k_and_evaluate_match_the_authors_vote(small_mem, unit_vectors):
    mem, x, labels = small_mem
    q = unit_vectors(20, 8, seed=3)
    order, top = _brute_force(q, x, 12)
    every = mem.predict_every_k(q, ks=[1, 5, 12])
    truth = ["cat", "dog", "owl", "owl"] * 5  # arbitrary true labels
    res = mem.evaluate(q, truth, ks=[1, 5, 12])
    assert res.n_queries == 20 and set(res.accuracy) == set(vm.VOTES)
    for vote in vm.VOTES:
        theirs = [authors_prediction_at_k(vote, [labels[j] for j in order[i]], 1 - top[i], [f"r{j:02d}" for j in order[i]])
                  for i in range(20)]
        for col, k in enumerate([1, 5, 12]):
            at_k = [t[k - 1] for t in theirs]
            assert every[vote][:, col].tolist() == at_k, (vote, k)
            assert res.accuracy[vote][k] == pytest.approx(np.mean([a == b for a, b in zip(at_k, truth)]))


def test_kneighbors(small_mem):
    mem, x, _ = small_mem
    sims, ids = mem.kneighbors(x[:2], k=3)
    assert sims.shape == (2, 3) and ids[0][0] == "r00" and ids[1][0] == "r01"


def test_get_and_records(small_mem):
    mem, _, _ = small_mem
    assert [r["label"] for r in mem.get(["r01", "r02"])] == ["dog", "owl"]
    assert mem.get([]) == []
    with pytest.raises(UnknownIdError, match=r"1 unknown id\(s\): \['nope'\]"):
        mem.get(["r01", "nope"])
    cats = mem.records(label="cat", limit=None)
    assert len(cats) == 20 and {r["label"] for r in cats} == {"cat"}
    page = mem.records(offset=10, limit=5)
    assert len(page) == 5
    assert {r["id"] for r in mem.records(where="id IN ('r03', 'r33')")} == {"r03", "r33"}
    with pytest.raises(ValueError, match="offset and limit must be >= 0"):
        mem.records(offset=-1)


def test_duplicate_ids_refused_or_skipped(small_mem):
    mem, x, _ = small_mem
    v, n = mem.version, len(mem)
    with pytest.raises(DuplicateIdError, match=r"1 id\(s\) already in the memory, e.g. \['r05'\]; nothing was added"):
        mem.add_embeddings(x[:2] * -1, ["cat", "cat"], ids=["new", "r05"])
    assert mem.version == v and len(mem) == n and "new" not in mem
    with pytest.raises(DuplicateIdError, match="the input repeats 1 id"):
        mem.add_embeddings(x[:2] * -1, ["cat", "cat"], ids=["twin", "twin"])
    assert mem.version == v and "twin" not in mem
    res = mem.add_embeddings(x[:3] * -1, ["cat"] * 3, ids=["new", "r05", "new"], skip_existing=True)
    assert res.added == 1 and res.skipped == ["r05", "new"] and res.ids == ["new"]
    assert mem.version == v + 1 and len(mem) == n + 1
    assert mem.get(["r05"])[0]["label"] == "owl"  # the existing record is untouched


def test_audit_log_has_one_line_per_mutation(small_mem):
    mem, x, _ = small_mem
    mem.add_embeddings(-x[:2], ["cat", "dog"], ids=["n1", "n2"])
    with pytest.raises(DuplicateIdError):
        mem.add_embeddings(-x[:1], ["cat"], ids=["n1"])  # refused: no line
    lines = _audit(mem)
    assert [e["op"] for e in lines] == ["create", "add_embeddings", "add_embeddings"]
    assert [e["version"] for e in lines[1:]] == [mem.version - 1, mem.version]
    assert lines[2]["ids"] == ["n1", "n2"] and lines[2]["n"] == 2 and lines[2]["labels"] == ["cat", "dog"]
    assert len(lines[1]["ids"]) == 60
    assert mem.history() == lines


def test_reopen_gives_identical_predictions(small_mem, unit_vectors):
    mem, _, _ = small_mem
    q = unit_vectors(15, 8, seed=4)
    before = [(p.label, p.scores, [n.id for n in p.neighbors]) for p in mem.classify(q, k=7)]
    again = vm.open(mem.path)
    assert len(again) == len(mem) and again.version == mem.version and again.ids() == mem.ids()
    after = [(p.label, p.scores, [n.id for n in p.neighbors]) for p in again.classify(q, k=7)]
    assert after == before


def test_a_second_handle_sees_new_commits(small_mem):
    mem, x, _ = small_mem
    other = vm.open(mem.path)
    mem.add_embeddings(-x[:1], ["eel"], ids=["e1"])
    assert "e1" not in other
    assert other.refresh() is True and "e1" in other and other.version == mem.version
    assert other.classify(-x[:1], k=1)[0].label == "eel"
    assert other.refresh() is False


def test_refresh_reads_appends_incrementally_and_reloads_on_other_changes(memory_dir, unit_vectors, monkeypatch):
    x = unit_vectors(60, 8, seed=11)
    writer = vm.create(memory_dir, encoder=None, dim=8)
    writer.add_embeddings(x[:20], labels=["a", "b"] * 10, ids=[f"r{i}" for i in range(20)])
    reader = vm.open(memory_dir)
    reloads = []
    full_reload = reader._state.load
    monkeypatch.setattr(reader._state, "load", lambda: (reloads.append(1), full_reload()))

    writer.add_embeddings(x[20:40], labels=["c"] * 20, ids=[f"r{i}" for i in range(20, 40)])
    writer.add_embeddings(x[40:], labels=["a"] * 20, ids=[f"r{i}" for i in range(40, 60)])
    assert reader.refresh() and reloads == []  # two appends: read incrementally
    fresh = vm.open(memory_dir)
    assert reader.ids() == fresh.ids() and reader.labels == fresh.labels
    for p, q in zip(reader.classify(x, k=7), fresh.classify(x, k=7)):
        assert (p.label, p.scores, [n.id for n in p.neighbors]) == (q.label, q.scores, [n.id for n in q.neighbors])

    writer.relabel(["r3"], "z")  # not an append: the reader reloads
    reader.refresh()
    assert reloads == [1] and reader.get(["r3"])[0]["label"] == "z" and reader.labels["z"] == 1


def test_old_version_is_readable(small_mem):
    mem, x, _ = small_mem
    v = mem.version
    mem.add_embeddings(-x[:1], ["eel"], ids=["e1"])
    old = vm.open(mem.path, version=v)
    assert len(old) == 60 and "e1" not in old and old.version == v


# -- real images -------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_images(cifar_root):
    """6 CIFAR-10 training images from each of 3 classes, plus 2 held-out ones."""
    classes = ["airplane", "frog", "truck"]
    train = [sorted((cifar_root / "train" / c).glob("*.jpg"))[:6] for c in classes]
    val = [sorted((cifar_root / "val" / c).glob("*.jpg"))[:2] for c in classes]
    return classes, train, val


def test_add_images_ids_are_sha256_of_bytes_and_predictions_survive_reopen(memory_dir, encoder, few_images):
    classes, train, val = few_images
    mem = vm.create(memory_dir, encoder=encoder)
    paths = [p for ps in train for p in ps]
    labels = [c for c, ps in zip(classes, train) for _ in ps]
    res = mem.add(paths[:-2], labels=labels[:-2])
    assert res.added == 16 and len(mem) == 16
    assert res.ids == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:-2]]
    rec = mem.get(res.ids[:1], columns=["id", "label", "source", "vector"])[0]
    assert rec["source"] == str(paths[0]) and rec["label"] == "airplane"
    np.testing.assert_allclose(rec["vector"], encoder.embed(paths[0])[0], atol=1e-5)
    # Bytes and PIL inputs too; a PIL image's id is the hash of its RGB pixels.
    data = paths[-2].read_bytes()
    pil = Image.open(io.BytesIO(paths[-1].read_bytes())).convert("RGB")
    res2 = mem.add([data, pil], labels="truck", source="upload")
    assert res2.ids == [hashlib.sha256(data).hexdigest(), hashlib.sha256(pil.tobytes()).hexdigest()]
    assert mem.labels == {"airplane": 6, "frog": 6, "truck": 6}
    # Adding the same file again is refused by content, whatever its name.
    with pytest.raises(DuplicateIdError, match="already in the memory"):
        mem.add(paths[0], labels="frog")
    assert [e["op"] for e in mem.history()] == ["create", "add", "add"]
    queries = [p for ps in val for p in ps]
    before = mem.classify(queries, k=5)
    again = vm.open(memory_dir)
    after = again.classify(queries, k=5)
    assert [p.label for p in after] == [p.label for p in before]
    for a, b in zip(after, before):
        assert [n.id for n in a.neighbors] == [n.id for n in b.neighbors]
        np.testing.assert_allclose([n.similarity for n in a.neighbors], [n.similarity for n in b.neighbors], atol=1e-6)
    # Image queries and their embeddings give the same answer.
    vecs = again.embed(queries)
    assert [p.label for p in again.classify(vecs, k=5)] == [p.label for p in after]
    assert all(p.version == again.version for p in after)


def test_add_with_precomputed_vectors_equals_add(tmp_path, encoder, few_images):
    """`add(images, vectors=mem.embed(images))` stores what `add(images)` stores, thumbnails included."""
    classes, train, _ = few_images
    paths = [p for ps in train for p in ps][:6]
    a = vm.create(tmp_path / "a", encoder=encoder)
    b = vm.create(tmp_path / "b", encoder=encoder)
    ra = a.add(paths, labels="x")
    rb = b.add(paths, labels="x", vectors=b.embed(paths))
    assert ra.ids == rb.ids and [e["op"] for e in b.history()][-1] == "add"
    cols = ["id", "label", "source", "vector", "thumbnail"]
    for x, y in zip(a.get(ra.ids, columns=cols), b.get(rb.ids, columns=cols)):
        np.testing.assert_allclose(x.pop("vector"), y.pop("vector"), atol=1e-6)
        assert x == y and x["thumbnail"]
    with pytest.raises(ValueError, match="6 images but 5 vectors"):
        b.add(paths, labels="x", vectors=b.embed(paths)[:5], skip_existing=True)
    with pytest.raises(vm.VectorError, match="dimension 3"):
        b.add(paths, labels="x", vectors=np.ones((6, 3)), skip_existing=True)
    assert len(b) == 6 and b.version == rb.version


def test_prediction_json_keeps_the_vote_order_for_numeric_labels(memory_dir):
    # JSON objects are unordered and JavaScript lists integer-like keys first: `ranking` is the order.
    mem = vm.create(memory_dir, encoder=None, dim=2)
    mem.add_embeddings(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), labels=["7", "7", "3"], ids=["a", "b", "c"])
    d = mem.classify(np.array([[1.0, 0.05]]), k=3)[0].to_dict()
    assert d["label"] == "7" and d["ranking"] == ["7", "3"] and list(d["scores"]) == d["ranking"]
