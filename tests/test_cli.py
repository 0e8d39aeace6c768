"""The `vismem` CLI end to end on real images (typer's runner, same process)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from authors_reference import authors_prediction_at_k
from visual_memory.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def piped_output(monkeypatch):
    """The CLI's consoles as in a pipe, even where the environment sets FORCE_COLOR or TTY_* (rich reads those at import)."""
    app_module = sys.modules["visual_memory.cli.app"]
    monkeypatch.setattr(app_module, "console", app_module._console(force_terminal=False))
    monkeypatch.setattr(app_module, "err_console", app_module._console(stderr=True, force_terminal=False))


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def image_folder(tmp_path, cifar_small):
    """A 3-class ImageFolder of 6 real CIFAR-10 train images per class."""
    root = tmp_path / "folder"
    for path, label in zip(cifar_small["train_paths"], cifar_small["train_y"]):
        if label in ("cat", "ship", "truck"):
            d = root / label
            d.mkdir(parents=True, exist_ok=True)
            if len(list(d.iterdir())) < 6:
                shutil.copy(path, d / path.name)
    return root


def test_create_add_classify_info_eval(tmp_path, image_folder, cifar_root, cifar_small):
    mem = tmp_path / "m.vm"
    r = invoke("create", mem)
    assert r.exit_code == 0, r.output
    r = invoke("add", mem, image_folder)
    assert r.exit_code == 0, r.output
    assert "added 18 record(s)" in r.output

    one = cifar_root / "val" / "ship" / "4500.jpg"
    r = invoke("add", mem, one, "--label", "ship", "--source", "manual")
    assert r.exit_code == 0, r.output
    # the same image again: refused, memory unchanged; --skip-existing skips it
    r = invoke("add", mem, one, "--label", "ship")
    assert r.exit_code == 2 and "already in the memory" in r.output
    r = invoke("add", mem, one, "--label", "ship", "--skip-existing")
    assert r.exit_code == 0 and "skipped 1" in r.output

    r = invoke("info", mem, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["count"] == 19 and info["labels"] == {"ship": 7, "cat": 6, "truck": 6}
    assert info["encoder"] == "efficientnet-lite0" and info["dim"] == 1280 and info["version"] == 3

    r = invoke("classify", mem, cifar_root / "val" / "ship" / "4501.jpg", "--k", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out) == 1 and len(out[0]["neighbors"]) == 5
    assert set(out[0]) >= {"label", "scores", "neighbors", "version"}

    # Held-out queries (val images of the three classes), scored against an independent
    # reference: brute-force cosine kNN over the stored vectors, then the authors' vote.
    queries = tmp_path / "queries"
    qx, qy = [], []
    for path, label, vec in zip(cifar_small["val_paths"], cifar_small["val_y"], cifar_small["val_x"]):
        if label in ("cat", "ship", "truck") and path.name != "4500.jpg" and sum(y == label for y in qy) < 4:
            (queries / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, queries / label / path.name)
            qx.append(vec)
            qy.append(label)
    r = invoke("eval", mem, queries, "--k", "1,5", "--json", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n_queries"] == 12
    assert set(res["accuracy"]) == {"plurality", "distance", "softmax", "rank"}
    import visual_memory as vm

    stored = vm.open(mem).get(vm.open(mem).ids(), columns=["id", "label", "vector"])
    mx = np.array([r["vector"] for r in stored], dtype=np.float64)
    sims = np.array(qx, dtype=np.float64) @ mx.T
    for vote in res["accuracy"]:
        for k in (1, 5):
            hits = []
            for i in range(len(qy)):
                order = sorted(range(len(stored)), key=lambda j: -sims[i, j])[:k]
                pred = authors_prediction_at_k(vote, [stored[j]["label"] for j in order], [1 - sims[i, j] for j in order],
                                               [stored[j]["id"] for j in order])[-1]
                hits.append(pred == qy[i])
            assert res["accuracy"][vote][str(k)] == pytest.approx(np.mean(hits)), (vote, k)


def test_cli_errors_are_one_clear_line(tmp_path):
    r = invoke("info", tmp_path / "nope")
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = invoke("create", tmp_path / "m", "--encoder", "no-such-encoder")
    assert r.exit_code == 2 and "unknown encoder 'no-such-encoder'" in r.output
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_demo_runs_on_real_data_and_writes_report(tmp_path, monkeypatch):
    """The README's main job, small: Fashion-MNIST (Debian package) unless VISMEM_DATA is set."""
    monkeypatch.delenv("VISMEM_DATA", raising=False)
    r = invoke("demo", "--out", tmp_path / "demo", "--per-class", "5", "--queries", "3")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["dataset"] == "Fashion-MNIST"
    assert report["memory_images"] == 50 and report["queries"] == 30
    # 10 classes: chance is 0.10; 5 exemplars/class with a real encoder do far better
    assert report["accuracy"]["rank"]["1"] > 0.3
    md = (tmp_path / "demo" / "report.md").read_text()
    assert md.startswith("# visual-memory demo")
    # The HTML report with its plots, as `vismem eval --report` writes it, and where it is.
    html = tmp_path / "demo" / "report" / "report.html"
    assert report["html_report"] == str(html) and "(report/report.html)" in md
    assert f"HTML report with plots: {html}" in r.output
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 6  # the figures are embedded in the page
    results = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    assert results["meta"]["memory"] == str(tmp_path / "demo" / "memory")
    # The report's k=1 accuracy is the demo's own (same memory, same queries).
    assert results["accuracy_vs_k"]["rank"][0] == pytest.approx(report["accuracy"]["rank"]["1"])
