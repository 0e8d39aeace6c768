"""Re-ranking with a VLM, against a real HTTP server on 127.0.0.1 speaking the OpenAI and Gemini protocols.

The memory holds 40 real CIFAR-10 images (with their stored 64 px
thumbnails); the endpoint is a scripted double (`vlm_double`), so what the
client sent, how it parsed, retried, limited and cached is all observed from
the server side. No real model is called (no network here).
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading

import pytest
from PIL import Image

from rerank_support import build_memory, copy_memory, openai_reranker, queries
from visual_memory.rerank import (
    FALLBACKS,
    PROMPT_VERSION,
    GeminiBackend,
    OpenAIBackend,
    VLMReranker,
    parse_answer,
    rerank_predictions,
)
from visual_memory.rerank.prompt import SYSTEM, query_jpeg
from vlm_double import VLMDouble, label, raw, reply, status

SECRET = "sk-test-secret-4f1c9e"


@pytest.fixture(scope="module")
def base_memory(tmp_path_factory, cifar_small, encoder):
    return build_memory(tmp_path_factory.mktemp("rerank") / "base", cifar_small, encoder)


@pytest.fixture(scope="module")
def mem(base_memory, encoder):
    import visual_memory as vm

    return vm.open(base_memory, encoder=encoder)


@pytest.fixture
def double():
    with VLMDouble() as d:
        yield d


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in ("VISMEM_RERANK_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def one(mem, cifar_small, i=0, k=10):
    x, paths, labels = queries(cifar_small, 10)
    return mem.classify(x[i : i + 1], k=k)[0], paths[i], labels[i]


# -- the prompt on the wire ---------------------------------------------------------------


def test_request_carries_query_neighbour_thumbnails_and_candidates(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small, k=10)
    res = openai_reranker(double, price_per_mtok=(0.5, 2.0)).rerank(path, pred, memory=mem)

    (seen,) = double.requests
    assert seen.path == "/v1/chat/completions" and seen.protocol == "openai"
    assert seen.body["model"] == "double-vlm" and seen.body["temperature"] == 0 and seen.body["max_tokens"] == 1024
    assert seen.system == SYSTEM and '{"label"' in SYSTEM
    assert "authorization" not in {h.lower() for h in seen.headers}  # no key in the environment: none sent
    # images: the query (CIFAR's 32x32, not upscaled), then each neighbour's stored thumbnail, byte for byte
    assert Image.open(io.BytesIO(seen.images[0])).size == (32, 32)
    assert seen.images[0] == query_jpeg(path)[0]
    stored = [r["thumbnail"] for r in mem.get([n.id for n in pred.neighbors], columns=["thumbnail"])]
    assert seen.images[1:] == stored and len(stored) == 10
    # each neighbour's label right before its image, nearest first; candidates = labels among them
    shown = [t for t in seen.texts if t.startswith("Neighbour ")]
    assert shown == [f'Neighbour {i}: "{n.label}"' for i, n in enumerate(pred.neighbors, 1)]
    assert seen.candidates == list(dict.fromkeys(n.label for n in pred.neighbors))
    # the default double answers the first candidate (the nearest neighbour's label)
    assert res.label == pred.neighbors[0].label and res.fallback is None and res.attempts == 1
    assert res.changed == (res.label != pred.winner) and res.vote_label == pred.winner
    assert res.input_tokens == 1000 and res.output_tokens == 20
    assert res.cost == pytest.approx((1000 * 0.5 + 20 * 2.0) / 1e6)
    assert res.model == "double-vlm" and res.prompt_version == PROMPT_VERSION and res.n_shown == 10


def test_large_query_is_sent_at_384_px_and_n_bounds_the_neighbours(mem, cifar_small, double):
    pred, _, _ = one(mem, cifar_small, k=20)
    big = Image.new("RGB", (1000, 600), (200, 30, 30))
    openai_reranker(double, n=5).rerank(big, pred, memory=mem)
    (seen,) = double.requests
    assert Image.open(io.BytesIO(seen.images[0])).size == (384, 230)
    assert len(seen.images) == 1 + 5 and len([t for t in seen.texts if t.startswith("Neighbour ")]) == 5


def test_labels_only_sends_the_query_image_alone(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small)
    res = openai_reranker(double, labels_only=True).rerank(path, pred, memory=mem)
    (seen,) = double.requests
    assert len(seen.images) == 1
    listing = next(t for t in seen.texts if t.startswith("Labels of its 10 nearest"))
    assert listing.splitlines()[1:] == [f'{i}. "{n.label}"' for i, n in enumerate(pred.neighbors, 1)]
    assert res.fallback is None


def test_weight_zero_neighbours_are_not_shown(tmp_path, base_memory, cifar_small, encoder, double):
    m = copy_memory(base_memory, tmp_path / "m", encoder)
    pred, path, _ = one(m, cifar_small)
    silenced = pred.neighbors[0]
    m.reweight([silenced.id], 0.0)
    pred = one(m, cifar_small)[0]
    openai_reranker(double).rerank(path, pred, memory=m)
    (seen,) = double.requests
    assert len(seen.images) == 1 + 9  # 10 retrieved, one cannot vote
    assert silenced.id not in {n.id for n in pred.neighbors if n.weight > 0}


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    '{{"label": "{}", "rationale": "fur and ears"}}',
    '```json\n{{"label": " {} "}}\n```',
    "  '{}'. ",
    "The query image shows a {}.",
    "Answer: **{}**",
    'Sure! {{"label": "{}"}}',
])
def test_answers_parse_over_http(mem, cifar_small, double, template):
    pred, path, _ = one(mem, cifar_small, i=3)
    double.default = lambda seen: reply(template.format(seen.candidates[-1].upper()))
    res = openai_reranker(double).rerank(path, pred, memory=mem)
    last = double.requests[0].candidates[-1]
    assert res.fallback is None and res.label == last and res.changed == (last != pred.winner)


@pytest.mark.parametrize("answer, reason", [
    (label("zebra"), "not_a_candidate"),
    (reply("banana"), "not_a_candidate"),
    (reply("I honestly cannot tell what this picture shows, sorry"), "unparseable"),
    (reply('{"label": 7}'), "unparseable"),
    (reply(""), "bad_response"),
    (raw(b"<html>not json</html>"), "bad_response"),
    (raw(b'{"choices": []}'), "bad_response"),
])
def test_bad_answers_fall_back_to_the_vote(mem, cifar_small, double, answer, reason):
    pred, path, _ = one(mem, cifar_small)
    vote_label = pred.label
    double.push(answer)
    res = rerank_predictions(openai_reranker(double), mem, [path], [pred])[0]
    assert res.fallback == reason and reason in FALLBACKS and res.detail
    assert res.label == vote_label and not res.changed and pred.label == vote_label and pred.rerank is res
    assert len(double.requests) == 1  # a wrong answer is not retried


def test_an_answer_naming_two_candidates_is_ambiguous(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small, i=3)
    double.default = lambda seen: reply(f"Either {seen.candidates[0]} or {seen.candidates[1]}, hard to say.")
    res = openai_reranker(double).rerank(path, pred, memory=mem)
    assert len(double.requests[0].candidates) >= 2 and res.fallback == "ambiguous" and res.label == pred.winner


def test_parse_answer_table():
    c = ["cat", "dog", "tabby cat", "golden_retriever"]
    assert parse_answer('{"Label": "CAT"}', c).label == "cat"
    assert parse_answer("a Tabby Cat", c).label == "tabby cat"  # the longer name wins over the one inside it
    assert parse_answer("golden retriever", c).label == "golden_retriever"
    assert parse_answer("It is a cat, not a dog.", c).fallback == "ambiguous"
    assert parse_answer('{"label": "tiger"}', c).fallback == "not_a_candidate"
    assert parse_answer("label: wolf", c).fallback == "not_a_candidate"
    assert parse_answer(None, c).fallback == "unparseable"
    assert parse_answer('{"label": "cat", "rationale": "whiskers"}', c).rationale == "whiskers"


# -- failures, retries, limits ------------------------------------------------------------


def test_timeout_falls_back_after_the_retries(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small)
    double.push(label("cat", delay=1.5), label("cat", delay=1.5))
    res = openai_reranker(double, timeout=0.25, retries=1).rerank(path, pred, memory=mem)
    assert res.fallback == "timeout" and res.attempts == 2 and len(double.requests) == 2
    assert res.label == pred.winner


def test_429_then_200_honours_retry_after(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small)
    double.push(status(429, retry_after="1"))
    res = openai_reranker(double).rerank(path, pred, memory=mem)
    first, second = double.requests
    assert res.fallback is None and res.attempts == 2
    assert second.started - first.started >= 0.95  # waited as told, not the 0.01 s back-off
    assert second.images == first.images  # the same request again


def test_retry_after_beyond_the_cap_is_not_waited_for(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small)
    double.push(status(429, retry_after="120"))
    res = openai_reranker(double, max_retry_after=5).rerank(path, pred, memory=mem)
    assert res.fallback == "rate_limited" and "120" in res.detail and len(double.requests) == 1


def test_500_is_retried_with_backoff_then_falls_back(mem, cifar_small, double):
    pred, path, _ = one(mem, cifar_small)
    double.push(status(500), status(503))
    ok = openai_reranker(double, retries=2).rerank(path, pred, memory=mem)
    assert ok.fallback is None and ok.attempts == 3 and len(double.requests) == 3
    double.push(status(500), status(502), status(500))
    bad = openai_reranker(double, retries=2).rerank(path, pred, memory=mem)
    assert bad.fallback == "server_error" and bad.attempts == 3 and len(double.requests) == 6 and bad.label == pred.winner


def test_api_key_is_sent_but_never_written(mem, cifar_small, double, monkeypatch, caplog, tmp_path, base_memory, encoder):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-fallback")
    monkeypatch.setenv("VISMEM_RERANK_API_KEY", SECRET)  # ours wins over the provider's
    m = copy_memory(base_memory, tmp_path / "m", encoder)
    pred, path, _ = one(m, cifar_small)
    double.push(status(401, message=f"bad key {SECRET}"))  # a server that echoes the key back
    caplog.set_level(logging.DEBUG)
    r = openai_reranker(double, cache=True)
    denied = r.rerank(path, pred, memory=m)
    ok = r.rerank(path, pred, memory=m)
    assert double.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert denied.fallback == "http_error" and "401" in denied.detail and len(double.requests) == 2  # 401 not retried
    assert ok.fallback is None
    assert SECRET not in json.dumps([denied.to_dict(), ok.to_dict(), pred.to_dict()]) + caplog.text + repr(r)
    for f in m.path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_unreachable_endpoint_falls_back(mem, cifar_small):
    d = VLMDouble()  # bound, never started, then closed: the port refuses connections
    d._server.server_close()
    pred, path, _ = one(mem, cifar_small)
    res = VLMReranker(OpenAIBackend(d.openai_url, model="m", timeout=1.0), retries=1, backoff=0.01, cache=False).rerank(path, pred, memory=mem)
    assert res.fallback == "connection" and res.attempts == 2


def test_concurrency_limit_is_observed_by_the_server(mem, cifar_small, double):
    x, paths, _ = queries(cifar_small, 8)
    double.default = lambda seen: label(seen.candidates[0], delay=0.25)
    preds = mem.classify(x, k=10)
    r = openai_reranker(double, max_concurrency=2)
    results = rerank_predictions(r, mem, paths, preds)
    assert double.max_in_flight == 2 and len(double.requests) == 8
    assert [res.label for res in results] == [p.neighbors[0].label for p in preds]  # in the order asked
    # the limit binds across threads too (e.g. server requests): 6 callers, 3 slots
    double.max_in_flight = 0
    r3 = openai_reranker(double, max_concurrency=3)
    threads = [threading.Thread(target=r3.rerank, args=(paths[i], preds[i]), kwargs={"memory": mem}) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert double.max_in_flight == 3


def test_no_candidates_makes_no_call(tmp_path, double, unit_vectors):
    import visual_memory as vm

    m = vm.create(tmp_path / "empty", encoder=None, dim=8)
    pred = m.classify(unit_vectors(1, 8), k=5)[0]
    res = openai_reranker(double).rerank(Image.new("RGB", (8, 8)), pred, memory=m)
    assert res.fallback == "no_candidates" and res.label is None and not double.requests


# -- the cache ---------------------------------------------------------------------------


def test_cache_hits_keys_and_forget(tmp_path, base_memory, cifar_small, encoder, double):
    m = copy_memory(base_memory, tmp_path / "m", encoder)
    x, paths, _ = queries(cifar_small, 3)
    r = openai_reranker(double, cache=True, price_per_mtok=(1.0, 1.0))
    preds = m.classify(x, k=10)
    first = rerank_predictions(r, m, paths, preds)
    again = rerank_predictions(r, m, paths, m.classify(x, k=10))
    assert len(double.requests) == 3 and not any(f.cached for f in first)
    assert all(a.cached and a.cost == 0.0 and a.attempts == 0 for a in again)
    assert [a.label for a in again] == [f.label for f in first]
    folder = m.path / "cache" / "rerank"
    entries = list(folder.rglob("*.json"))
    assert len(entries) == 3
    # an entry names no record: no id, no URL, no key; only the label, rationale and accounting
    ids = [n.id for p in preds for n in p.neighbors]
    for e in entries:
        text = e.read_text()
        assert not any(i in text for i in ids) and "127.0.0.1" not in text
        assert set(json.loads(text)) == {"label", "rationale", "model", "prompt_version", "input_tokens", "output_tokens", "cost", "created_at"}
    # another n, another model: new calls; a file with the same key is reused by a second reranker
    openai_reranker(double, cache=True, n=5).rerank(paths[0], preds[0], memory=m)
    openai_reranker(double, cache=True, model="other").rerank(paths[0], preds[0], memory=m)
    assert len(double.requests) == 5
    assert openai_reranker(double, cache=True).rerank(paths[0], preds[0], memory=m).cached
    # an edit makes a new version: the old answers are not reused
    m.relabel([ids[-1]], "relabelled")
    openai_reranker(double, cache=True).rerank(paths[0], m.classify(x[:1], k=10)[0], memory=m)
    assert len(double.requests) == 6
    # forget drops every re-rank entry with the derived cache, and its scan finds no forgotten byte
    receipt = m.forget(ids=[preds[0].neighbors[0].id])
    assert receipt.verification["ok"] is True and not folder.exists()
    res = openai_reranker(double, cache=True).rerank(paths[0], m.classify(x[:1], k=10)[0], memory=m)
    assert not res.cached and len(double.requests) == 7


def test_failures_are_not_cached(tmp_path, base_memory, cifar_small, encoder, double):
    m = copy_memory(base_memory, tmp_path / "m", encoder)
    pred, path, _ = one(m, cifar_small)
    double.push(label("zebra"))
    assert openai_reranker(double, cache=True).rerank(path, pred, memory=m).fallback == "not_a_candidate"
    assert openai_reranker(double, cache=True).rerank(path, pred, memory=m).fallback is None
    assert len(double.requests) == 2


# -- Gemini through the real google-genai client ------------------------------------------


def gemini(double, **kw) -> VLMReranker:
    backend = GeminiBackend(model="gemini-double", base_url=double.url, timeout=kw.pop("timeout", 2.0))
    return VLMReranker(backend, cache=False, backoff=0.01, **kw)


def test_gemini_request_shape(mem, cifar_small, double, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    pred, path, _ = one(mem, cifar_small, k=10)
    double.default = lambda seen: reply(f'{{"label": "{seen.candidates[-1]}", "rationale": "shape"}}', tokens=(3000, 12))
    res = gemini(double, price_per_mtok=(0.1, 0.4)).rerank(path, pred, memory=mem)
    (seen,) = double.requests
    # the client picks the API version (google-genai 3.x: v1); the path is the Gemini API's
    assert re.fullmatch(r"/v1(beta|alpha)?/models/gemini-double:generateContent", seen.path) and seen.protocol == "gemini"
    assert seen.headers.get("x-goog-api-key") == SECRET
    assert seen.system == SYSTEM
    cfg = seen.body["generationConfig"]
    assert cfg["temperature"] == 0 and cfg["maxOutputTokens"] == 1024
    stored = [r["thumbnail"] for r in mem.get([n.id for n in pred.neighbors], columns=["thumbnail"])]
    assert seen.images == [query_jpeg(path)[0], *stored]
    assert seen.candidates == list(dict.fromkeys(n.label for n in pred.neighbors))
    assert [t for t in seen.texts if t.startswith("Neighbour ")] == [f'Neighbour {i}: "{n.label}"' for i, n in enumerate(pred.neighbors, 1)]
    assert res.fallback is None and res.label == seen.candidates[-1] and res.rationale == "shape"
    assert (res.input_tokens, res.output_tokens) == (3000, 12) and res.cost == pytest.approx((3000 * 0.1 + 12 * 0.4) / 1e6)
    assert SECRET not in json.dumps(res.to_dict())


def test_gemini_retries_and_fallbacks(mem, cifar_small, double, monkeypatch):
    monkeypatch.setenv("VISMEM_RERANK_API_KEY", SECRET)
    pred, path, _ = one(mem, cifar_small)
    double.push(status(429, retry_after="1"))
    ok = gemini(double).rerank(path, pred, memory=mem)
    assert ok.fallback is None and ok.attempts == 2 and len(double.requests) == 2
    assert double.requests[1].started - double.requests[0].started >= 0.95  # Retry-After read off the client's error
    double.push(status(500), status(500), status(500))
    bad = gemini(double, retries=2).rerank(path, pred, memory=mem)
    assert bad.fallback == "server_error" and bad.attempts == 3 and bad.label == pred.winner
    double.push(label("cat", delay=1.5))
    slow = gemini(double, timeout=0.25, retries=0).rerank(path, pred, memory=mem)
    assert slow.fallback == "timeout" and slow.attempts == 1
    double.push(label("zebra"))
    assert gemini(double).rerank(path, pred, memory=mem).fallback == "not_a_candidate"
    double.push(status(403, message=f"key {SECRET} invalid"))
    denied = gemini(double).rerank(path, pred, memory=mem)
    assert denied.fallback == "http_error" and "403" in denied.detail and SECRET not in denied.detail


def test_gemini_needs_a_key():
    with pytest.raises(ValueError, match="VISMEM_RERANK_API_KEY"):
        GeminiBackend(model="gemini-2.5-flash")


# -- bad input raises at the boundary ------------------------------------------------------


def test_bad_options_and_inputs_raise(mem, cifar_small, double):
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="model"):
        OpenAIBackend(double.openai_url, model="")
    for bad in ({"n": 0}, {"max_concurrency": 0}, {"retries": -1}, {"price_per_mtok": (1.0,)}, {"backoff": -1}):
        with pytest.raises(ValueError):
            openai_reranker(double, **bad)
    x, _, _ = queries(cifar_small, 1)
    with pytest.raises(ValueError, match="query images"):
        mem.classify(x, k=5, rerank=openai_reranker(double))
    with pytest.raises(TypeError, match="Reranker"):
        mem.classify(queries(cifar_small, 1)[1], k=5, rerank="http://127.0.0.1:1/v1")
    assert not double.requests
