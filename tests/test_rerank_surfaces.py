"""Re-ranking through the surfaces: `Memory.classify(rerank=)` with the real encoder, the CLI
(`classify --rerank`, `eval --rerank`), and the server (`POST /classify?rerank=true`).

The model is a scripted double on 127.0.0.1 (`vlm_double`): an "oracle" that
answers the true label whenever a neighbour carries it, or a "saboteur" that
answers any other candidate, so the accounting of decisions changed (wrong ->
right, right -> wrong) can be checked against what the memory retrieved.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from rerank_support import build_memory, copy_memory, openai_reranker, queries
from server_support import TOKEN, LiveServer
from visual_memory.cli import app
from visual_memory.rerank import evaluate_rerank
from visual_memory.rerank.prompt import query_jpeg
from vlm_double import VLMDouble, label

runner = CliRunner()


@pytest.fixture(scope="module")
def base_memory(tmp_path_factory, cifar_small, encoder):
    return build_memory(tmp_path_factory.mktemp("rerank-surfaces") / "base", cifar_small, encoder)


@pytest.fixture
def double():
    with VLMDouble() as d:
        yield d


def oracle(truth: dict):
    """Answer the true label of the query image when it is a candidate, else the first candidate."""
    def answer(seen):
        t = truth[seen.images[0]]
        return label(t if t in seen.candidates else seen.candidates[0])
    return answer


def saboteur(truth: dict):
    """Answer a candidate that is not the true label, when there is one."""
    def answer(seen):
        t = truth[seen.images[0]]
        return label(next((c for c in seen.candidates if c != t), seen.candidates[0]))
    return answer


def truth_of(paths, labels) -> dict:
    return {query_jpeg(p)[0]: lab for p, lab in zip(paths, labels)}


def expected_flips(mem, x, labels, k):
    """From the retrieved neighbours alone: (vote right, true label among the candidates) per query."""
    preds = mem.classify(x, k=k)
    return [(p.label == t, t in {n.label for n in p.neighbors}, len({n.label for n in p.neighbors})) for p, t in zip(preds, labels)]


def test_classify_with_rerank_real_encoder_end_to_end(tmp_path, base_memory, cifar_small, encoder, double):
    mem = copy_memory(base_memory, tmp_path / "m", encoder)
    _, paths, labels = queries(cifar_small, 4)
    double.default = oracle(truth_of(paths, labels))
    preds = mem.classify(paths, k=10, rerank=openai_reranker(double))  # the real encoder embeds the paths
    assert len(double.requests) == 4
    for p, t in zip(preds, labels):
        r = p.rerank
        assert r is not None and r.fallback is None and r.vote_label == p.winner
        assert p.label == r.label and r.changed == (r.label != p.winner)
        assert p.label == (t if t in r.candidates else r.candidates[0])
        d = json.loads(json.dumps(p.to_dict()))
        assert d["rerank"]["label"] == p.label and d["rerank"]["model"] == "double-vlm" and d["winner"] == p.winner
    plain = mem.classify(paths, k=10)
    assert all(p.rerank is None and "rerank" not in p.to_dict() for p in plain)


def test_evaluate_rerank_counts_flips(tmp_path, base_memory, cifar_small, encoder, double):
    mem = copy_memory(base_memory, tmp_path / "m", encoder)
    x, paths, labels = queries(cifar_small, 10)
    exp = expected_flips(mem, x, labels, 10)
    truth = truth_of(paths, labels)

    double.default = oracle(truth)
    ev = evaluate_rerank(mem, x, labels, images=paths, reranker=openai_reranker(double, n=10, price_per_mtok=(1.0, 2.0)))
    assert ev.accuracy_vote == pytest.approx(sum(r for r, _, _ in exp) / 10)
    assert ev.accuracy_rerank == pytest.approx(sum(c for _, c, _ in exp) / 10)  # right whenever a neighbour knew
    assert ev.wrong_to_right == sum((not r) and c for r, c, _ in exp) and ev.right_to_wrong == 0
    assert ev.stats.calls == 10 and ev.stats.input_tokens == 10_000 and ev.stats.cost == pytest.approx(10 * (1000 + 40) / 1e6)
    assert ev.stats.fallbacks == {} and ev.stats.latency_p95_s is not None

    double.default = saboteur(truth)
    ev = evaluate_rerank(mem, x, labels, images=paths, reranker=openai_reranker(double, n=10))
    assert ev.right_to_wrong == sum(r and n > 1 for r, _, n in exp)
    assert ev.changed == ev.right_to_wrong + ev.wrong_to_right + ev.wrong_to_wrong
    assert ev.stats.cost is None  # no prices: unknown, not zero


def test_cli_classify_and_eval_with_rerank(tmp_path, base_memory, cifar_small, cifar_root, encoder, double):
    mem = copy_memory(base_memory, tmp_path / "m", encoder)
    _, paths, labels = queries(cifar_small, 2)
    double.default = oracle(truth_of(paths, labels))
    r = runner.invoke(app, ["classify", str(mem.path), *map(str, paths), "--k", "10", "--json",
                            "--rerank", double.openai_url, "--rerank-model", "oracle-vlm", "--rerank-n", "8"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["rerank"]["model"] for o in out] == ["oracle-vlm"] * 2 and all(o["rerank"]["n_shown"] == 8 for o in out)
    assert all(o["label"] == o["rerank"]["label"] for o in out)
    assert len(double.requests) == 2 and len(double.requests[0].images) == 1 + 8

    # eval: 2 queries per class from the real val folder; the oracle needs their truth
    from visual_memory.cache import select_per_class
    from visual_memory.images import scan_folder

    vpaths, vlabels = select_per_class(*scan_folder(cifar_root / "val"), 2)
    double.default = oracle(truth_of(vpaths, vlabels))
    out_json = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(mem.path), str(cifar_root / "val"), "--per-class", "2", "--k", "1,10",
                            "--rerank", double.openai_url, "--rerank-model", "oracle-vlm", "--rerank-n", "10",
                            "--rerank-price", "0.5,1.5", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    assert "accuracy, re-ranked" in r.output and "wrong -> right" in r.output and "$0.0" in r.output
    data = json.loads(out_json.read_text())["rerank"]
    assert data["n_queries"] == 20 and data["right_to_wrong"] == 0 and data["accuracy_rerank"] >= data["accuracy_vote"]
    assert data["stats"]["calls"] == 20 - data["stats"]["cache_hits"]
    # a second run is served from the memory's cache: no new calls, no spend
    before = len(double.requests)
    r = runner.invoke(app, ["eval", str(mem.path), str(cifar_root / "val"), "--per-class", "2", "--k", "10",
                            "--rerank", double.openai_url, "--rerank-model", "oracle-vlm", "--rerank-n", "10", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    again = json.loads(out_json.read_text())["rerank"]
    assert len(double.requests) == before and again["stats"]["cache_hits"] == 20 and again["stats"]["cost"] == 0.0
    assert again["accuracy_rerank"] == data["accuracy_rerank"]


def test_cli_rerank_option_errors(tmp_path, base_memory, cifar_small, encoder):
    mem = copy_memory(base_memory, tmp_path / "m", encoder)
    img = str(queries(cifar_small, 1)[1][0])
    r = runner.invoke(app, ["classify", str(mem.path), img, "--rerank", "http://127.0.0.1:9/v1"])
    assert r.exit_code == 2 and "--rerank-model" in r.output
    r = runner.invoke(app, ["classify", str(mem.path), img, "--rerank", "ftp://x", "--rerank-model", "m"])
    assert r.exit_code == 2 and "OpenAI-compatible URL" in r.output
    r = runner.invoke(app, ["classify", str(mem.path), img, "--rerank", "gemini", "--rerank-model", "gemini-2.5-flash"],
                      env={"VISMEM_RERANK_API_KEY": "", "GEMINI_API_KEY": "", "GOOGLE_API_KEY": ""})
    assert r.exit_code == 2 and "needs a key" in r.output


def test_server_classify_rerank(tmp_path, base_memory, cifar_small, encoder, double):
    from visual_memory.server import create_app

    mem = copy_memory(base_memory, tmp_path / "m", encoder)
    _, paths, labels = queries(cifar_small, 1)
    data = paths[0].read_bytes()
    double.default = lambda seen: label(seen.candidates[-1], delay=1.5)
    files = {"file": ("q.jpg", data, "image/jpeg")}
    with LiveServer(create_app(mem, token=TOKEN, reranker=openai_reranker(double, timeout=5.0))) as live, \
            LiveServer(create_app(copy_memory(base_memory, tmp_path / "m2", encoder), token=TOKEN)) as plain:
        box = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(f"{live.url}/classify?rerank=true&k=10", files=files, timeout=20)))
        t.start()
        deadline = time.monotonic() + 10
        while double.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert double.in_flight == 1
        # while the model thinks, an edit goes through: the model call holds no lock
        some_id = mem.ids()[0]
        w = httpx.post(f"{live.url}/reweight", json={"ids": [some_id], "weight": 0.5}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert w.status_code == 200 and double.in_flight == 1
        t.join(timeout=20)
        out = box["r"].json()
        assert box["r"].status_code == 200, out
        seen = double.requests[0]
        assert seen.images[0] == query_jpeg(data)[0] and len(seen.images) == 1 + 10
        assert out["rerank"]["label"] == seen.candidates[-1] == out["label"] and out["rerank"]["fallback"] is None
        assert out["rerank"]["vote_label"] == out["winner"] and out["rerank"]["model"] == "double-vlm"
        assert "rerank" not in httpx.post(f"{live.url}/classify?k=10", files=files, timeout=20).json()
        r = httpx.post(f"{plain.url}/classify?rerank=true", files=files, timeout=20)
        assert r.status_code == 400 and r.json()["error"] == "no_reranker"
