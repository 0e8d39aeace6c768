"""Neighbour files in the paper authors' JSON format: export, import, score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory.errors import VisualMemoryError
from visual_memory.interchange import FIELDS, evaluate_neighbors, export_neighbors, import_neighbors


@pytest.fixture
def small_mem(memory_dir, unit_vectors):
    x = unit_vectors(200, 8, seed=3)
    labels = ["a" if v[0] > 0 else "b" for v in x]
    mem = vm.create(memory_dir, encoder=None, dim=8)
    mem.add_embeddings(x, labels=labels, ids=[f"r{i}" for i in range(200)])
    return mem, x, labels


def test_export_import_round_trip_matches_our_own_votes(small_mem, unit_vectors, tmp_path):
    mem, x, labels = small_mem
    q = unit_vectors(30, 8, seed=4)
    qy = ["a" if v[0] > 0 else "b" for v in q]
    out = tmp_path / "nb.json"
    data = export_neighbors(mem, q, query_ids=[f"q{i}" for i in range(30)], query_labels=qy, k=20, path=out)
    rec = data["q0"]
    assert set(rec) == set(FIELDS) and rec["featurizer"] == "vectors-8d" and len(rec["neighbor_image_ids"]) == 20
    sims, ids = mem.kneighbors(q[:1], k=20)
    assert rec["neighbor_image_ids"] == ids[0]
    np.testing.assert_allclose(rec["neighbor_distances"], 1 - sims[0], atol=1e-6)
    loaded = import_neighbors(out)
    assert len(loaded) == 30
    ours = mem.evaluate(q, qy, ks=(1, 10, 20))
    theirs = evaluate_neighbors(loaded, ks=(1, 10, 20))
    for v in vm.VOTES:
        for k in (1, 10, 20):
            assert theirs["accuracy"][v][k] == pytest.approx(ours.accuracy[v][k])
    # JSON Lines and a plain list read the same.
    jl = tmp_path / "nb.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in data.values()))
    assert import_neighbors(jl) == loaded


def test_import_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": "x", "featurizer": "f", "image_class": "a"}]))
    with pytest.raises(VisualMemoryError, match="lacks field"):
        import_neighbors(bad)
    rec = {"featurizer": "f", "image_id": "x", "image_class": "a", "neighbor_image_ids": ["1", "2"],
           "neighbor_classes": ["a"], "neighbor_distances": [0.1, 0.2]}
    bad.write_text(json.dumps([rec]))
    with pytest.raises(VisualMemoryError, match="equal length"):
        import_neighbors(bad)
    rec["neighbor_classes"] = ["a", "b"]
    rec["neighbor_distances"] = [0.3, 0.1]
    bad.write_text(json.dumps([rec]))
    with pytest.raises(VisualMemoryError, match="ascending"):
        import_neighbors(bad)
    bad.write_text("{not json")
    with pytest.raises(VisualMemoryError, match="neither JSON"):
        import_neighbors(bad)
    with pytest.raises(FileNotFoundError):
        import_neighbors(tmp_path / "missing.json")


def test_export_bad_input(small_mem, unit_vectors):
    mem, *_ = small_mem
    with pytest.raises(ValueError, match="unique"):
        export_neighbors(mem, unit_vectors(2, 8), query_ids=["a", "a"])
    with pytest.raises(ValueError, match="query ids"):
        export_neighbors(mem, unit_vectors(2, 8), query_ids=["a"])


def test_cli_import_neighbors(small_mem, unit_vectors, tmp_path):
    mem, *_ = small_mem
    q = unit_vectors(10, 8, seed=5)
    out = tmp_path / "nb.json"
    export_neighbors(mem, q, query_ids=[f"q{i}" for i in range(10)], query_labels=["a"] * 10, k=10, path=out)
    from visual_memory.cli import app

    r = CliRunner().invoke(app, ["import-neighbors", str(out), "--k", "1,10", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_queries"] == 10 and set(res["accuracy"]) == set(vm.VOTES)
