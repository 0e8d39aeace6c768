"""HTTP API: every endpoint, and every kind of bad input, against a real memory.

The memory: 200 cached CIFAR-10 embeddings + 40 real CIFAR-10 images added
through the real encoder (so they have thumbnails). Each test works on its own
copy of it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server_support import TOKEN, build_base_memory, copy_memory, local_client, val_image

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base_memory(tmp_path_factory, cifar_root, cifar_small, encoder):
    return build_base_memory(tmp_path_factory.mktemp("server") / "base", cifar_root, cifar_small, encoder)


@pytest.fixture
def mem(base_memory, tmp_path, encoder):
    return copy_memory(base_memory, tmp_path / "mem", encoder)


@pytest.fixture
def client(mem):
    from visual_memory.server import create_app

    with local_client(create_app(mem, token=TOKEN)) as c:
        yield c


def jpeg(label_img: bytes) -> tuple[str, bytes, str]:
    return ("q.jpg", label_img, "image/jpeg")


def real_ids(mem) -> list[str]:
    return [i for i in mem.ids() if not i.startswith("emb-")]


def state(mem) -> tuple:
    mem.refresh()
    return len(mem), mem.version, mem.labels


# -- reads ---------------------------------------------------------------------------


def test_healthz_stats_and_docs(client, mem):
    h = client.get("/healthz").json()
    assert h == {"status": "ok", "records": 240, "version": mem.version}
    s = client.get("/stats").json()
    assert s["count"] == 240 and s["labels"]["cat"] == 24 and s["encoder"] == "efficientnet-lite0"
    assert "/" not in s["path"]  # no server filesystem layout leaks out
    spec = client.get("/openapi.json").json()
    for path in ("/classify", "/healthz", "/records", "/records/{record_id}", "/forget", "/relabel", "/reweight", "/explain", "/stats", "/history"):
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200
    # Swagger UI is served by this process, so /docs works offline too.
    assert "cdn.jsdelivr" not in docs.text and "/static-offline-docs/swagger-ui-bundle.js" in docs.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    ui = client.get("/")
    assert ui.status_code == 200 and "visual-memory" in ui.text
    assert client.get("/ui/app.js").status_code == 200


def test_classify_real_image_matches_library(client, mem, cifar_root):
    data = val_image(cifar_root, "ship", 3)
    r = client.post("/classify?k=7", files={"file": jpeg(data)})
    assert r.status_code == 200, r.text
    p = r.json()
    want = mem.classify(data, k=7)[0]
    assert p["label"] == want.label
    assert p["scores"] == pytest.approx(want.scores)
    assert [n["id"] for n in p["neighbors"]] == [n.id for n in want.neighbors]
    assert len(p["neighbors"]) == 7 and p["version"] == mem.version
    n0 = p["neighbors"][0]
    assert set(n0) >= {"id", "label", "similarity", "rank", "weight", "contribution", "thumbnail_url"}
    assert sum(n["contribution"] for n in p["neighbors"] if n["label"] == p["label"]) == pytest.approx(p["scores"][p["label"]])
    import hashlib

    assert p["image"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_classify_bad_inputs(client, cifar_root, mem):
    data = val_image(cifar_root, "cat")
    assert client.post("/classify").status_code == 422  # no file
    r = client.post("/classify", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = client.post("/classify", files={"file": ("fake.png", b"this is not a png at all", "image/png")})
    assert r.status_code == 415 and "fake.png" in r.json()["detail"]
    r = client.post("/classify", files={"file": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert r.status_code == 400 and "cut.jpg" in r.json()["detail"]
    r = client.post("/classify", files={"file": ("empty.jpg", b"", "image/jpeg")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    assert client.post("/classify?k=0", files={"file": jpeg(data)}).status_code == 422
    assert client.post("/classify?k=abc", files={"file": jpeg(data)}).status_code == 422
    r = client.post("/classify?vote=median", files={"file": jpeg(data)})
    assert r.status_code == 422 and "median" in r.json()["detail"]


def test_upload_limits(mem, cifar_root):
    from visual_memory.server import create_app

    data = val_image(cifar_root, "dog")
    with local_client(create_app(mem, token=TOKEN, max_upload_bytes=len(data) - 1)) as c:
        r = c.post("/classify", files={"file": jpeg(data)})
        assert r.status_code == 413 and "byte" in r.json()["detail"]
        before = state(mem)
        assert c.post("/records", files={"files": jpeg(data)}, params={"label": "dog"}, headers=AUTH).status_code == 413
        assert state(mem) == before
    with local_client(create_app(mem, token=TOKEN, max_upload_pixels=32 * 32 - 1)) as c:
        r = c.post("/classify", files={"file": jpeg(data)})
        assert r.status_code == 413 and "pixel" in r.json()["detail"]
    # A huge declared body is refused before it is parsed.
    with local_client(create_app(mem, token=TOKEN, max_upload_bytes=1000, max_files=2)) as c:
        big = b"x" * (3 * 1024 * 1024)
        r = c.post("/classify", content=big, headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413


def test_explain_json_and_html(client, cifar_root):
    data = val_image(cifar_root, "horse", 1)
    r = client.post("/explain?k=5", files={"file": jpeg(data)})
    assert r.status_code == 200, r.text
    e = r.json()
    assert len(e["neighbors"]) == 5 and e["query"]["thumbnail"].startswith("data:image/jpeg;base64,")
    assert all("thumbnail_url" in n and "source" in n for n in e["neighbors"])
    h = client.post("/explain?k=5&format=html", files={"file": jpeg(data)})
    assert h.status_code == 200 and h.headers["content-type"].startswith("text/html")
    assert "Vote totals per label" in h.text and h.text.count('class="card') == 5
    assert "http" not in h.text.split("<body>")[1]  # self-contained: no external references
    assert client.post("/explain?format=pdf", files={"file": jpeg(data)}).status_code == 422


def test_records_browse_paging_and_thumbnails(client, mem):
    r = client.get("/records", params={"label": "cat", "limit": 10}).json()
    assert r["total"] == 24 and len(r["records"]) == 10 and all(x["label"] == "cat" for x in r["records"])
    r2 = client.get("/records", params={"label": "cat", "offset": 10, "limit": 100}).json()
    ids = [x["id"] for x in r["records"] + r2["records"]]
    assert len(ids) == len(set(ids)) == 24
    assert client.get("/records", params={"label": "no-such-label"}).json() == {
        "total": 0, "offset": 0, "limit": 50, "version": mem.version, "records": []}
    assert client.get("/records", params={"limit": 0}).status_code == 422
    assert client.get("/records", params={"offset": -1}).status_code == 422

    with_thumb = [x for x in ids if not x.startswith("emb-")]
    without = [x for x in ids if x.startswith("emb-")]
    assert len(with_thumb) == 4 and len(without) == 20
    rec = next(x for x in r["records"] + r2["records"] if x["id"] == with_thumb[0])
    assert rec["thumbnail_url"] == f"/records/{with_thumb[0]}/thumbnail" and rec["source"].endswith(".jpg")
    t = client.get(rec["thumbnail_url"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size == (32, 32)  # CIFAR images are smaller than the 64px cap
    r = client.get(f"/records/{without[0]}/thumbnail")
    assert r.status_code == 404 and "no stored thumbnail" in r.json()["detail"]
    one = client.get(f"/records/{with_thumb[0]}").json()
    assert one["label"] == "cat" and one["weight"] == 1.0 and "added_at" in one
    for url in ("/records/nope", "/records/nope/thumbnail"):
        r = client.get(url)
        assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_history_newest_first(client, mem):
    h = client.get("/history").json()
    assert h["total"] == len(mem.history()) >= 3
    assert [e["op"] for e in h["entries"]][:2] == ["add", "add_embeddings"]
    assert client.get("/history?limit=1").json()["entries"][0]["op"] == "add"


def test_reads_can_require_the_token(mem):
    from visual_memory.server import create_app

    with local_client(create_app(mem, token=TOKEN, protect_reads=True)) as c:
        assert c.get("/records").status_code == 401
        assert c.get("/records", headers=AUTH).status_code == 200


# -- writes --------------------------------------------------------------------------


def test_mutations_need_the_token(client, mem, cifar_root):
    before = state(mem)
    some = real_ids(mem)[0]
    calls = [
        ("post", "/records", {"files": {"files": jpeg(val_image(cifar_root, "cat"))}, "params": {"label": "cat"}}),
        ("delete", f"/records/{some}", {}),
        ("post", "/forget", {"json": {"ids": [some]}}),
        ("post", "/relabel", {"json": {"ids": [some], "label": "x"}}),
        ("post", "/reweight", {"json": {"ids": [some], "weight": 0.5}}),
    ]
    for method, url, kw in calls:
        for headers, why in (({}, "missing token"), ({"Authorization": "Bearer wrong"}, "bad token"), ({"Authorization": TOKEN}, "bad token")):
            r = getattr(client, method)(url, headers=headers, **kw)
            assert r.status_code == 401, (url, r.text)
            assert r.json()["detail"].startswith(why) and r.headers["www-authenticate"] == "Bearer"
    assert state(mem) == before


def test_add_images_new_class_then_classify(client, mem, cifar_root):
    imgs = [val_image(cifar_root, "frog", i) for i in range(5)]
    files = [("files", (f"f{i}.jpg", b, "image/jpeg")) for i, b in enumerate(imgs[:4])]
    r = client.post("/records", files=files, params={"label": "my-frog"}, headers=AUTH)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["added"] == 4 and len(out["ids"]) == 4 and out["skipped"] == []
    assert client.get("/stats").json()["labels"]["my-frog"] == 4
    rec = client.get(f"/records/{out['ids'][0]}").json()
    assert rec["metadata"] == {"filename": "f0.jpg"} and rec["source"] == "upload" and rec["thumbnail_url"]
    # The stored image is its own nearest neighbour.
    p = client.post("/classify?k=5", files={"file": jpeg(imgs[0])}).json()
    assert p["neighbors"][0]["id"] == out["ids"][0] and p["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    # A second label: a second request.
    r = client.post("/records", files=[("files", ("a.jpg", imgs[4], "image/jpeg"))], params={"label": "frog"}, headers=AUTH)
    assert r.status_code == 201 and r.json()["added"] == 1
    # Re-adding: refused as a whole (409), or skipped on request.
    before = state(mem)
    r = client.post("/records", files=files, params={"label": "my-frog"}, headers=AUTH)
    assert r.status_code == 409 and "already" in r.json()["detail"]
    assert state(mem) == before
    r = client.post("/records", files=files[:1] + [("files", ("n.jpg", val_image(cifar_root, "frog", 9), "image/jpeg"))],
                    params={"label": "my-frog", "skip_existing": "true"}, headers=AUTH)
    assert r.status_code == 201 and r.json()["added"] == 1 and r.json()["skipped"] == [out["ids"][0]]


def test_add_bad_inputs_change_nothing(client, mem, cifar_root):
    good = ("files", ("g.jpg", val_image(cifar_root, "cat", 7), "image/jpeg"))
    before = state(mem)
    cases = [
        ({"files": [good, ("files", ("x.txt", b"text", "text/plain"))], "params": {"label": "cat"}}, 415),
        ({"files": [good, ("files", ("bad.jpg", b"\xff\xd8\xff garbage", "image/jpeg"))], "params": {"label": "cat"}}, 415),
        ({"files": [good], "params": {}}, 422),  # no label
        ({"files": [good], "params": {"label": "   "}}, 422),
        ({"params": {"label": "cat"}}, 422),  # no files
    ]
    for kw, status in cases:
        r = client.post("/records", headers=AUTH, **kw)
        assert r.status_code == status, (kw.get("params"), r.text)
        assert r.json()["detail"]
    from visual_memory.server import create_app

    with local_client(create_app(mem, token=TOKEN, max_files=2)) as c:
        r = c.post("/records", files=[good] * 3, params={"label": "cat"}, headers=AUTH)
        assert r.status_code == 422 and "at most 2" in r.json()["detail"]
    assert state(mem) == before


def test_delete_record(client, mem, cifar_root):
    rid = real_ids(mem)[0]
    assert client.delete("/records/nope", headers=AUTH).status_code == 404
    r = client.delete(f"/records/{rid}", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == 1 and r.json()["ids"] == [rid]
    assert client.get(f"/records/{rid}").status_code == 404
    assert client.delete(f"/records/{rid}", headers=AUTH).status_code == 404
    assert client.get("/healthz").json()["records"] == 239
    assert client.get("/history?limit=1").json()["entries"][0]["op"] == "remove"


def test_forget_returns_receipt_and_erases(client, mem, cifar_root):
    rid = next(i for i in real_ids(mem) if mem.get([i], columns=["label"])[0]["label"] == "cat")
    before = state(mem)
    for body, status in ((b"{not json", 422), (b'{"ids": []}', 422), (b'{"ids": "abc"}', 422), (b'{"id": ["x"]}', 422), (b'{"ids": [""]}', 422)):
        r = client.post("/forget", content=body, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"] == "validation" and r.json()["detail"]
    r = client.post("/forget", json={"ids": [rid, "nope"]}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert state(mem) == before
    r = client.post("/forget", json={"ids": [rid]}, headers=AUTH)
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert rid not in str(receipt)  # the receipt itself must not re-leak the id
    assert client.get(f"/records/{rid}").status_code == 404
    assert client.get(f"/records/{rid}/thumbnail").status_code == 404
    assert rid not in [x["id"] for x in client.get("/records", params={"label": "cat", "limit": 500}).json()["records"]]


def test_relabel_and_reweight_change_the_prediction(client, mem, cifar_root):
    data = val_image(cifar_root, "airplane", 2)
    p = client.post("/classify?k=5", files={"file": jpeg(data)}).json()
    top = p["neighbors"][0]
    r = client.post("/relabel", json={"ids": [top["id"]], "label": "zeppelin"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == 1
    p2 = client.post("/classify?k=5", files={"file": jpeg(data)}).json()
    assert p2["neighbors"][0]["label"] == "zeppelin" and "zeppelin" in p2["scores"]
    assert p2["version"] > p["version"]
    r = client.post("/reweight", json={"ids": [top["id"]], "weight": 0}, headers=AUTH)
    assert r.status_code == 200 and r.json()["changed"] == 1
    p3 = client.post("/classify?k=5", files={"file": jpeg(data)}).json()
    assert p3["neighbors"][0]["weight"] == 0 and "zeppelin" not in p3["scores"]
    for body in ({"ids": [top["id"]], "weight": -1}, {"ids": [top["id"]], "weight": "heavy"}, {"ids": [top["id"]]}):
        assert client.post("/reweight", json=body, headers=AUTH).status_code == 422
    r = client.post("/reweight", content=b'{"ids": ["%s"], "weight": NaN}' % top["id"].encode(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422
    assert client.post("/relabel", json={"ids": [top["id"]], "label": ""}, headers=AUTH).status_code == 422
    r = client.post("/relabel", json={"ids": ["nope"], "label": "x"}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    ops = [e["op"] for e in client.get("/history?limit=2").json()["entries"]]
    assert ops == ["reweight", "relabel"]


def test_vectors_only_memory_refuses_uploads_clearly(tmp_path, cifar_root):
    import visual_memory as vm
    from visual_memory.server import create_app

    m = vm.create(tmp_path / "v", encoder=None, dim=4)
    m.add_embeddings(np.eye(4), ["a", "b", "c", "d"], ids=list("abcd"))
    with local_client(create_app(m, token=TOKEN)) as c:
        r = c.post("/classify", files={"file": jpeg(val_image(cifar_root, "cat"))})
        assert r.status_code == 400 and "without an encoder" in r.json()["detail"]
        assert c.get("/records").json()["total"] == 4


def test_picks_up_commits_from_other_processes(mem, unit_vectors):
    import visual_memory as vm
    from visual_memory.server import create_app

    with local_client(create_app(mem, token=TOKEN, refresh_every=0.0)) as c:
        assert c.get("/healthz").json()["records"] == 240
        other = vm.open(mem.path)  # a second writer, e.g. `vismem add` while the server runs
        v = other.add_embeddings(unit_vectors(1, mem.dim, seed=3), ["late"], ids=["late-1"]).version
        h = c.get("/healthz").json()
        assert h == {"status": "ok", "records": 241, "version": v}
        assert c.get("/records/late-1").json()["label"] == "late"
