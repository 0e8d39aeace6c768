"""Edge values at the API's boundary, and standard JSON everywhere (issue 11, item 15).

Numbers a client can send that the store cannot hold (an offset past int64, a
weight past float32) are refused with the limit named (422), never a 500 or a
storage engine's message; an empty memory's undefined scores are ``null``, in
the server's JSON and in ``vismem ... --json``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import visual_memory as vm
from server_support import TOKEN, local_client
from visual_memory.cli import app as cli

AUTH = {"Authorization": f"Bearer {TOKEN}"}
F32 = np.finfo(np.float32)


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as every JSON parser outside Python does."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def memory(tmp_path, encoder, cifar_root):
    mem = vm.create(tmp_path / "m.vm", encoder=encoder)
    mem.add([cifar_root / "train" / c / "0000.jpg" for c in ("cat", "dog")], labels=["cat", "dog"])
    return mem


def test_offsets_past_int64_are_refused_not_500(memory):
    from visual_memory.server import create_app

    with local_client(create_app(memory, token=TOKEN)) as c:
        for url in ("/records", "/history"):
            r = c.get(url, params={"offset": "99999999999999999999"})
            assert r.status_code == 422 and "offset" in r.json()["detail"], (url, r.text)
            r = c.get(url, params={"offset": str(2**63 - 1)})
            assert r.status_code == 200, (url, r.text)
        assert c.get("/records", params={"offset": str(2**63 - 1)}).json()["records"] == []


def test_weights_must_fit_float32(memory):
    from visual_memory.server import create_app

    rid = memory.ids()[0]
    before = (memory.version, memory.get([rid], columns=["weight"])[0]["weight"])
    with local_client(create_app(memory, token=TOKEN)) as c:
        for weight in (1e39, 1e-50, 1e-40, -1e-50):
            r = c.post("/reweight", json={"ids": [rid], "weight": weight}, headers=AUTH)
            assert r.status_code == 422, (weight, r.text)
            detail = r.json()["detail"].lower()
            assert "lance" not in detail and "arrow" not in detail, detail
        assert "1.17549435e-38" in c.post("/reweight", json={"ids": [rid], "weight": 1e-50}, headers=AUTH).json()["detail"]
        memory.refresh()
        assert (memory.version, memory.get([rid], columns=["weight"])[0]["weight"]) == before
        for weight in (float(F32.tiny), float(F32.max), 0):  # the ends of the range are kept exactly
            r = c.post("/reweight", json={"ids": [rid], "weight": weight}, headers=AUTH)
            assert r.status_code == 200, (weight, r.text)
            assert c.get(f"/records/{rid}").json()["weight"] == weight
    # The library refuses the same values, with the same limits named.
    for weight in (1e39, 1e-50, float("inf")):
        with pytest.raises(ValueError, match=r"between 1.17549435e-38 and 3.40282347e\+38"):
            memory.reweight([rid], weight)


def test_empty_memory_scores_are_null_not_infinity(tmp_path, encoder, cifar_root):
    from visual_memory.server import create_app

    mem = vm.create(tmp_path / "empty.vm", encoder=encoder)
    image = (cifar_root / "val" / "cat" / "4500.jpg").read_bytes()
    assert math.isinf(mem.classify(image, k=5)[0].ood_score)  # the library keeps the number
    with local_client(create_app(mem, token=TOKEN)) as c:
        for url in ("/classify", "/explain"):
            r = c.post(url, files={"file": ("q.jpg", image, "image/jpeg")})
            assert r.status_code == 200, (url, r.text)
            body = strict_json(r.text)
            assert body["ood_score"] is None and body["label"] is None and body["neighbors"] == [], body
    out = CliRunner().invoke(cli, ["classify", str(tmp_path / "empty.vm"), str(cifar_root / "val" / "cat" / "4500.jpg"), "--json"])
    assert out.exit_code == 0, out.output
    printed = strict_json(out.stdout)
    assert (printed[0] if isinstance(printed, list) else printed)["ood_score"] is None
