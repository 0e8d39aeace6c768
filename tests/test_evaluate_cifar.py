"""The paper's directions on real CIFAR-10 (a CI-sized subset) and the report end to end.

Memory: the first 100 train images per class; queries: the first 30 val images
per class; distinct new classes: Fashion-MNIST trouser and bag (100 train +
50 test each). All embeddings go through the content-addressed cache.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory.cache import embed_folder, file_sha256
from visual_memory.datasets import embed_arrays, fashion_mnist_dir, fashion_mnist_subset
from visual_memory.evaluate import NEW_CLASSES, EvalData, run_experiments

TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_eval(cifar_root, encoder):
    tx, ty, tp = embed_folder(encoder, cifar_root / "train", per_class=TRAIN_PER_CLASS)
    vx, vy, _ = embed_folder(encoder, cifar_root / "val", per_class=VAL_PER_CLASS)
    if fashion_mnist_dir() is None:
        pytest.fail("Fashion-MNIST is needed for the new-class experiment: apt-get install dataset-fashion-mnist")
    fx, fy = fashion_mnist_subset(NEW_CLASSES, split="train", per_class=100)
    fqx, fqy = fashion_mnist_subset(NEW_CLASSES, split="test", per_class=50)
    data = EvalData(tx, ty, vx, vy, new_x=embed_arrays(encoder, fx), new_y=fy,
                    new_val_x=embed_arrays(encoder, fqx), new_val_y=fqy, new_name="Fashion-MNIST")
    results = run_experiments(data, sizes=(1, 10, 100), noise_levels=(0.0, 0.1, 0.3, 0.6))
    return {"data": data, "results": results, "train_paths": tp}


def test_rank_vote_holds_up_at_k_100(cifar_eval):
    r = cifar_eval["results"]
    assert r["k_max"] == 100
    assert r["at_k_max"]["rank"] >= r["at_k_max"]["plurality"]
    acc = r["accuracy_vs_k"]
    # plurality loses accuracy as k grows past its best; rank stays near its best
    assert acc["plurality"][-1] < r["best"]["plurality"]["accuracy"]
    assert r["best"]["rank"]["accuracy"] - acc["rank"][-1] < r["best"]["plurality"]["accuracy"] - acc["plurality"][-1]
    assert r["best"]["rank"]["accuracy"] > 0.5  # far above the 10% of chance


def test_distinct_new_classes_leave_old_accuracy_within_one_point(cifar_eval):
    nc = cifar_eval["results"]["new_classes"]
    assert nc["classes"] == sorted(NEW_CLASSES)
    assert abs(nc["old_change"]) <= 0.01
    assert nc["new_before"] == 0.0 and nc["new_after"] > 0.9
    assert nc["far_ood_auroc"] > 0.9


def test_held_out_near_classes_compete_when_added_back(cifar_eval):
    h = cifar_eval["results"]["holdout"]
    assert h["classes"] == ["cat", "truck"]
    assert h["new_after"] > 0.3  # learned from records alone
    assert h["old_after"] <= h["old_before"]  # they now compete with dog, automobile...
    assert h["ood_auroc"]["100"] > 0.5


def test_soft_pruning_does_not_hurt_under_label_noise(cifar_eval):
    rows = {r["noise"]: r for r in cifar_eval["results"]["label_noise"]["rows"]}
    for p in (0.0, 0.1, 0.3):
        assert rows[p]["soft_best"]["accuracy"] >= rows[p]["rank_best"]["accuracy"] - 1e-9, p
    assert rows[0.0]["rank_best"]["accuracy"] > rows[0.6]["rank_best"]["accuracy"]


def test_label_issue_precision_far_above_chance(cifar_eval):
    rows = {r["noise"]: r for r in cifar_eval["results"]["label_noise"]["rows"]}
    assert rows[0.1]["issue_precision"] >= 3 * rows[0.1]["issue_chance"]
    assert rows[0.3]["issue_precision"] >= 1.8 * rows[0.3]["issue_chance"]


def test_scaling_ith_neighbor_and_calibration_directions(cifar_eval):
    r = cifar_eval["results"]
    errors = [row["error"] for row in r["scaling"]["rows"]]
    assert [row["size"] for row in r["scaling"]["rows"]] == [10, 100, 1000]
    assert errors[0] > errors[1] > errors[2]
    assert r["scaling"]["fit"]["slope"] < 0
    assert r["ith_neighbor"]["fit"]["a"] < 0  # accuracy of the i-th neighbour falls with i
    assert r["ith_neighbor"]["accuracy"][0] > r["ith_neighbor"]["accuracy"][-1]
    pc = [b for b in r["calibration"]["by_plurality_count"] if b["n"] >= 10]
    assert pc[-1]["accuracy"] > pc[0]["accuracy"]  # more agreeing neighbours, more often right
    assert 0 <= r["calibration"]["ece"] < 0.2
    # sweeps cover all three parameters
    assert {s["param"] for s in r["sweeps"].values()} == {"alpha", "tau", "xi"}


def test_eval_report_cli_end_to_end(cifar_eval, cifar_root, encoder, tmp_path):
    d = cifar_eval["data"]
    mem = vm.create(tmp_path / "mem", encoder=encoder)
    mem.add_embeddings(d.train_x, d.train_y, ids=[file_sha256(p) for p in cifar_eval["train_paths"]], encoder=encoder)
    out = tmp_path / "report"
    r = CliRunner().invoke(vm_cli(), ["eval", str(mem.path), str(cifar_root / "val"), "--per-class", "10", "--k", "1,50",
                                      "--report", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["n_train"] == 10 * TRAIN_PER_CLASS and res["n_val"] == 100
    assert res["new_classes"]["classes"] == sorted(NEW_CLASSES)
    assert res["meta"]["memory_version"] == mem.version
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 8
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    for name in ("accuracy_vs_k", "sweeps", "ith_neighbor", "calibration", "scaling", "new_classes", "label_noise", "ood"):
        assert (out / f"{name}.png").stat().st_size > 5000
    # the memory itself is untouched by the evaluations (self-neighbours are only cached)
    assert mem.history()[-1]["op"] == "add_embeddings"


def vm_cli():
    from visual_memory.cli import app

    return app
