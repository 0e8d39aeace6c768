"""Explanations: attributable to neighbours, pictures inline, HTML self-contained."""

from __future__ import annotations

import base64
import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import visual_memory as vm


@pytest.fixture(scope="module")
def small_memory(tmp_path_factory, cifar_root, encoder):
    path = tmp_path_factory.mktemp("explain") / "mem"
    mem = vm.create(path, encoder=encoder)
    paths = [cifar_root / "train" / c / f"{4400 + i}.jpg" for c in ("cat", "ship", "truck") for i in range(4)]
    mem.add(paths, labels=[p.parent.name for p in paths])
    # A vector-only record whose source file still exists: its picture comes from the file.
    src = cifar_root / "train" / "ship" / "4410.jpg"
    mem.add_embeddings(encoder.embed(str(src)), ["ship"], ids=["vec-ship"], source=str(src), encoder=encoder)
    return path


def test_explanation_matches_classify_and_has_thumbnails(small_memory, cifar_root, encoder):
    mem = vm.open(small_memory, encoder=encoder)
    q = cifar_root / "val" / "ship" / "4501.jpg"
    e = mem.explain(q, k=13)
    p = mem.classify(str(q), k=13)[0]
    assert e.label == p.label and e.scores == pytest.approx(p.scores)
    assert [n.id for n in e.neighbors] == [n.id for n in p.neighbors]
    for n, m in zip(e.neighbors, p.neighbors):
        assert (n.label, n.rank, n.weight) == (m.label, m.rank, m.weight)
        assert n.similarity == pytest.approx(m.similarity) and n.contribution == pytest.approx(m.contribution)
    for lab, s in e.scores.items():
        assert sum(n.contribution for n in e.neighbors if n.label == lab) == pytest.approx(s)
    assert all(n.thumbnail for n in e.neighbors)  # 12 stored thumbnails + 1 made from the source file
    assert Image.open(io.BytesIO(e.query_thumbnail)).size == (32, 32)
    vec = next(n for n in e.neighbors if n.id == "vec-ship")
    assert Image.open(io.BytesIO(vec.thumbnail)).format == "JPEG"
    # The server never reads files for a client: no thumbnail without a stored one.
    e2 = mem.explain(q, k=13, read_sources=False)
    assert next(n for n in e2.neighbors if n.id == "vec-ship").thumbnail is None
    d = e.to_dict()
    assert d["label"] == e.label and len(d["neighbors"]) == 13 and d["neighbors"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
    assert "thumbnail" not in e.to_dict(thumbnails=False)["neighbors"][0]


def test_html_is_self_contained(small_memory, cifar_root, encoder, tmp_path):
    mem = vm.open(small_memory, encoder=encoder)
    e = mem.explain(cifar_root / "val" / "cat" / "4502.jpg", k=5)
    out = e.save_html(tmp_path / "sub" / "e.html")
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "Vote totals per label" in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)  # nothing fetched from anywhere
    imgs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(imgs) == 1 + 5
    for b in imgs:
        Image.open(io.BytesIO(base64.b64decode(b))).verify()
    for lab in e.scores:
        assert f'class="name" title="{lab}"' in html
    # Labels are escaped, never injected.
    mem2 = vm.open(small_memory, encoder=encoder)
    x = np.asarray(encoder.embed(str(cifar_root / "val" / "cat" / "4502.jpg")))[0]
    from visual_memory.explain import Explanation, explain

    e2 = explain(mem2, x, k=3)
    assert e2.query_thumbnail is None and e2.label == e.label
    e2.neighbors[0] = dataclasses.replace(e2.neighbors[0], label="<script>alert(1)</script>")
    assert "<script>alert" not in Explanation(e2.prediction, e2.neighbors).to_html()


def test_cli_explain_writes_html(small_memory, cifar_root, tmp_path):
    from visual_memory.cli import app

    out = tmp_path / "why.html"
    r = CliRunner().invoke(app, ["explain", str(small_memory), str(cifar_root / "val" / "truck" / "4500.jpg"), "--k", "4", "--html", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().count('class="card') == 4 and "contribution" in r.output
    r = CliRunner().invoke(app, ["explain", str(small_memory), str(tmp_path / "missing.jpg")])
    assert r.exit_code == 2 and "no such file" in r.output
