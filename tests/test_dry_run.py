"""Dry runs: every mutation previews exactly what it would change, and writes nothing.

A real memory of CIFAR-10 embeddings (cached) and real images; for each verb the
memory directory is hashed file by file before and after the dry run, the
preview's list is compared with what the real edit then changes, and the
preview's probe predictions with `classify` after the real edit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import visual_memory as vm
from visual_memory import erasure
from visual_memory.errors import DuplicateIdError, MemoryLockedError, SelectorError, UnknownIdError
from visual_memory.memory import preview as preview_module

K = 10  # probes are classified with k=10 (small memory), rank vote


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (the tests' own, independent of the library)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, cifar_root, cifar_small, encoder):
    """200 cached CIFAR-10 train embeddings + 6 real train images (added through the encoder)."""
    path = tmp_path_factory.mktemp("dry") / "base"
    mem = vm.create(path, encoder=encoder)
    tx, ty = cifar_small["train_x"], list(cifar_small["train_y"])
    mem.add_embeddings(tx, ty, ids=[f"emb-{i:03d}" for i in range(len(tx))], source="cifar10", encoder=encoder)
    images = [sorted((cifar_root / "train" / c).glob("*.jpg"))[-1] for c in ("cat", "dog", "ship", "truck", "frog", "bird")]
    mem.add(images, labels=[p.parent.name for p in images])
    return path, images


@pytest.fixture
def mem(base, tmp_path, encoder):
    path, _ = base
    shutil.copytree(path, tmp_path / "mem")
    return vm.open(tmp_path / "mem", encoder=encoder)


@pytest.fixture(scope="module")
def probes(cifar_small):
    return cifar_small["val_x"]  # 100 real val embeddings


def labels_now(mem, probes) -> list:
    return [p.label for p in mem.classify(probes, k=K)]


def check_dry(mem, call):
    """Run ``call`` (a dry run) and assert that nothing under the memory changed; return its preview."""
    before, version, n_hist = tree_digest(mem.path), mem.version, len(mem.history())
    p = call()
    assert isinstance(p, vm.EditPreview) and p.dry_run
    assert p.version == version == mem.version
    assert tree_digest(mem.path) == before, "a dry run wrote to the memory directory"
    assert len(mem.history()) == n_hist
    assert vm.open(mem.path).version == version
    return p


def check_probe_matches(p, before: list, after: list, names=None):
    """The preview's probe changes are exactly the probes whose classify label changed."""
    want = [(i, b, a) for i, (b, a) in enumerate(zip(before, after)) if b != a]
    assert [(c.probe, c.before, c.after) for c in p.probe.changes] == want
    assert p.probe.n_changed == len(want) and p.probe.n_probes == len(before)
    if names is not None:
        assert [c.name for c in p.probe.changes] == [names[i] for i, _, _ in want]


def with_k(p, mem, probes):
    """Probe a preview at k=K (the verbs' own probe= uses k=50)."""
    return p.with_probe(probes, k=K)


def test_relabel_preview_equals_the_relabel(mem, probes):
    # A whole neighbourhood: the 20 records nearest to the first probes, to flip some predictions.
    _, ids = mem.kneighbors(probes[:5], k=4)
    targets = sorted({i for row in ids for i in row})
    before = labels_now(mem, probes)
    p = check_dry(mem, lambda: mem.relabel(targets, "zeppelin", dry_run=True))
    p = with_k(p, mem, probes)
    assert p.op == "relabel" and sorted(p.ids) == targets
    assert all(c.label_after == "zeppelin" and c.label_before != "zeppelin" and c.weight_before == c.weight_after
               for c in p.changes)
    r = mem.relabel(targets, "zeppelin")
    assert r.changed == len(p.ids)
    assert sorted(mem.history()[-1]["ids"]) == sorted(p.ids)
    assert {c.id: c.label_before for c in p.changes}.keys() == set(targets)
    after = labels_now(mem, probes)
    assert p.probe.n_changed > 0  # the test really flips predictions
    check_probe_matches(p, before, after)
    # Relabelling to the same label again would change nothing: the preview says so too.
    assert mem.relabel(targets, "zeppelin", dry_run=True).ids == []


def test_reweight_preview_equals_the_reweight(mem, probes):
    _, ids = mem.kneighbors(probes[:8], k=3)
    targets = sorted({i for row in ids for i in row})
    mem.reweight(targets[:2], 0.0)  # already 0: not a change
    before = labels_now(mem, probes)
    p = check_dry(mem, lambda: mem.reweight(targets, 0.0, dry_run=True))
    p = with_k(p, mem, probes)
    assert sorted(p.ids) == targets[2:]
    assert all(c.weight_before == 1.0 and c.weight_after == 0.0 for c in p.changes)
    mem.reweight(targets, 0.0)
    assert sorted(mem.history()[-1]["ids"]) == sorted(p.ids)
    check_probe_matches(p, before, labels_now(mem, probes))
    assert p.probe.n_changed > 0


def test_remove_preview_equals_the_remove(mem, probes, monkeypatch):
    monkeypatch.setattr(preview_module, "PROBE_BATCH", 7)  # several probe blocks
    before = labels_now(mem, probes)
    p = check_dry(mem, lambda: mem.remove(label="cat", dry_run=True))
    p = with_k(p, mem, probes)
    assert len(p.ids) == 21 and all(c.label_before == "cat" and c.label_after is None for c in p.changes)
    r = mem.remove(label="cat")
    assert r.ids == p.ids
    check_probe_matches(p, before, labels_now(mem, probes))
    assert p.probe.n_changed > 0
    # Selector errors are the edit's own.
    with pytest.raises(UnknownIdError):
        mem.remove(ids=["no-such-id"], dry_run=True)
    with pytest.raises(SelectorError):
        mem.remove(dry_run=True)


def test_forget_preview_equals_the_forget(mem, probes):
    mem.remove(ids=["emb-001"])  # removed earlier, bytes still on disk: forget erases it too
    before = labels_now(mem, probes)
    p = check_dry(mem, lambda: mem.forget(ids=["emb-000", "emb-001", "emb-002"], dry_run=True))
    assert p.ids == ["emb-000", "emb-002", "emb-001"] and p.historic == ["emb-001"]
    p = check_dry(mem, lambda: mem.forget(label="dog", dry_run=True))
    p = with_k(p, mem, probes)
    receipt = mem.forget(label="dog")
    salt = mem._store.salt()
    assert receipt.id_hashes == sorted(erasure.salted_hash(salt, i) for i in p.ids)
    check_probe_matches(p, before, labels_now(mem, probes))


def test_prune_preview_equals_the_prune_and_writes_no_cache(mem, probes):
    before = labels_now(mem, probes)
    weights_before = dict(zip(mem.rows.ids, mem.rows.weights.tolist()))
    p = check_dry(mem, lambda: mem.prune(mode="soft", dry_run=True))  # the self-neighbour cache is not written either
    p = with_k(p, mem, probes)
    assert p.op == "prune" and len(p.ids) > 0
    assert all(c.weight_after < 1.0 and c.weight_before == 1.0 for c in p.changes)
    res = mem.prune(mode="soft")
    assert res.changed == len(p.ids)
    weights_after = dict(zip(mem.rows.ids, mem.rows.weights.tolist()))
    changed = sorted(i for i in weights_after if weights_after[i] != weights_before[i])
    assert changed == sorted(p.ids)
    assert all(weights_after[c.id] == pytest.approx(c.weight_after) for c in p.changes)
    check_probe_matches(p, before, labels_now(mem, probes))
    # Pruning again changes nothing: an empty preview, still written nowhere.
    assert check_dry(mem, lambda: mem.prune(mode="soft", dry_run=True)).ids == []


def test_add_images_preview_equals_the_add(mem, cifar_root, encoder):
    new = sorted((cifar_root / "val" / "horse").glob("*.jpg"))[:3]
    names = [str(p) for p in new]
    q = encoder.embed(new)
    before = [p.label for p in mem.classify(q, k=1)]
    p = check_dry(mem, lambda: mem.add(new, labels="pegasus", dry_run=True))
    assert [c.label_after for c in p.changes] == ["pegasus"] * 3 and p.skipped == []
    p = p.with_probe(q, names=names, k=1)  # the images to add are embedded now, not before
    r = mem.add(new, labels="pegasus")
    assert r.ids == p.ids
    after = [p.label for p in mem.classify(q, k=1)]
    assert after == ["pegasus"] * 3  # each image is now its own nearest record
    check_probe_matches(p, before, after, names=names)
    # Adding them again: refused as the add would be, or previewed as skipped.
    with pytest.raises(DuplicateIdError):
        mem.add(new, labels="pegasus", dry_run=True)
    again = check_dry(mem, lambda: mem.add(new, labels="pegasus", skip_existing=True, dry_run=True))
    assert again.skipped == r.ids and again.ids == []


def test_add_embeddings_preview_with_probe_equals_the_add(mem, probes):
    x = probes[:20]
    before = labels_now(mem, probes)
    p = check_dry(mem, lambda: mem.add_embeddings(x, labels="zeppelin", ids=[f"z{i}" for i in range(20)], dry_run=True))
    p = with_k(p, mem, probes)
    mem.add_embeddings(x, labels="zeppelin", ids=[f"z{i}" for i in range(20)])
    check_probe_matches(p, before, labels_now(mem, probes))
    assert p.probe.n_changed > 0  # each of the 20 is now its own nearest record, and others shift down a rank


def test_probe_folder_names_files_and_uses_k50(mem, cifar_root, tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    for c in ("cat", "dog"):
        for f in sorted((cifar_root / "val" / c).glob("*.jpg"))[:2]:
            shutil.copy(f, folder / f"{c}-{f.name}")
    files = sorted(str(p) for p in folder.iterdir())
    before = [q.label for q in mem.classify(files, k=50)]
    p = check_dry(mem, lambda: mem.relabel([i for i in mem.ids() if i.startswith("emb-")], "everything", dry_run=True,
                                           probe=folder))
    assert p.probe.k == 50 and p.probe.n_probes == 4
    check_probe_matches(p, before, ["everything"] * 4, names=files)


def test_dry_run_needs_no_lock_and_probe_needs_dry_run(mem, probes):
    other = vm.open(mem.path)
    with other._store.writing():  # another writer holds the lock
        with pytest.raises(MemoryLockedError):
            mem.relabel(["emb-000"], "x")
        assert mem.relabel(["emb-000"], "x", dry_run=True).ids == ["emb-000"]
    with pytest.raises(ValueError, match="dry_run"):
        mem.relabel(["emb-000"], "x", probe=probes)
    p = mem.relabel(["emb-000"], "x", dry_run=True)
    mem.relabel(["emb-001"], "y")
    with pytest.raises(ValueError, match="preview the edit again"):
        p.with_probe(probes)


def test_preview_to_dict_is_json(mem, probes):
    p = mem.remove(ids=["emb-000"], dry_run=True, probe=probes[:3])
    d = json.loads(json.dumps(p.to_dict()))
    assert d["dry_run"] is True and d["count"] == 1 and d["changes"][0]["id"] == "emb-000"
    assert d["probe"]["n_probes"] == 3 and "n_changed" in d["probe"]


def test_http_dry_run_fields(mem, cifar_root):
    """The server's edit endpoints take dry_run (and probe: recently classified uploads) and write nothing."""
    from server_support import local_client

    from visual_memory.server import create_app

    client = local_client(create_app(mem, token="t"))
    auth = {"Authorization": "Bearer t"}
    image = (cifar_root / "val" / "ship" / "4500.jpg").read_bytes()
    pred = client.post("/classify?k=10", files={"file": ("q.jpg", image, "image/jpeg")}).json()
    nearest = pred["neighbors"][0]
    before = tree_digest(mem.path)
    body = {"ids": [nearest["id"]], "label": "zeppelin", "dry_run": {"probe": [pred["image"]["sha256"]], "k": 10, "vote": "rank"}}
    dry = client.post("/relabel", json=body, headers=auth).json()
    assert dry["dry_run"] is True and dry["changes"][0]["label_after"] == "zeppelin"
    assert dry["probe"]["n_probes"] == 1 and dry["version"] == pred["version"]
    assert client.post("/forget", json={"ids": [nearest["id"]], "dry_run": True}, headers=auth).json()["count"] == 1
    assert client.post("/reweight", json={"ids": [nearest["id"]], "weight": 0, "dry_run": True}, headers=auth).json()["op"] == "reweight"
    assert client.delete(f"/records/{nearest['id']}?dry_run=true", headers=auth).json()["changes"][0]["id"] == nearest["id"]
    assert tree_digest(mem.path) == before
    r = client.post("/relabel", json={**body, "dry_run": {"probe": ["0" * 64]}}, headers=auth)
    assert r.status_code == 404 and "classify them first" in r.json()["detail"]
    assert tree_digest(mem.path) == before
    applied = client.post("/relabel", json={"ids": [nearest["id"]], "label": "zeppelin"}, headers=auth).json()
    assert applied == {"version": pred["version"] + 1, "changed": 1}
    after = client.post("/classify?k=10", files={"file": ("q.jpg", image, "image/jpeg")}).json()["label"]
    assert after == (dry["probe"]["changes"][0]["after"] if dry["probe"]["changes"] else pred["label"])
    # A real forget drops the server's remembered upload embeddings (one could be the forgotten image's).
    assert client.post("/forget", json={"ids": [nearest["id"]]}, headers=auth).status_code == 200
    r = client.post("/relabel", json={**body, "ids": [pred["neighbors"][1]["id"]]}, headers=auth)
    assert r.status_code == 404 and "classify them first" in r.json()["detail"]


def test_cli_dry_run_for_every_verb(mem, cifar_root, tmp_path):
    from typer.testing import CliRunner

    from visual_memory.cli import app

    folder = tmp_path / "probe"
    folder.mkdir()
    for f in sorted((cifar_root / "val" / "cat").glob("*.jpg"))[:3]:
        shutil.copy(f, folder / f.name)
    runner = CliRunner()
    m = str(mem.path)
    before, version = tree_digest(mem.path), mem.version
    calls = {
        "relabel": ["relabel", m, "zeppelin", "--id", "emb-000", "--id", "emb-001"],
        "reweight": ["reweight", m, "0", "--id", "emb-000"],
        "remove": ["remove", m, "--label", "cat"],
        "forget": ["forget", m, "--id", "emb-002"],
        "prune": ["prune", m, "--soft"],
        "add": ["add", m, str(folder), "--label", "kitten"],
    }
    for op, args in calls.items():
        res = runner.invoke(app, [*args, "--dry-run", "--probe", str(folder), "--json"])
        assert res.exit_code == 0, (op, res.output)
        d = json.loads(res.output)
        assert d["dry_run"] is True and d["op"] == op and d["version"] == version and d["probe"]["n_probes"] == 3
        want = {"relabel": 2, "reweight": 1, "remove": 21, "forget": 1, "add": 3}.get(op)
        assert want is None or d["count"] == want, (op, d["count"])
    res = runner.invoke(app, [*calls["relabel"], "--dry-run", "--probe", str(folder)])
    assert res.exit_code == 0 and "would change 2 record(s); nothing was written" in res.output
    assert "probe: " in res.output and "prediction(s) would change" in res.output
    assert tree_digest(mem.path) == before and vm.open(mem.path).version == version
