"""Distributed ingest and sharded search on a real multi-node Ray cluster, on loopback only.

One `ray.cluster_utils.Cluster` for the module: a head and a worker node (and,
for the kill test, a second worker that is killed), every node and the driver
pinned to 127.0.0.1. The module checks which address each really uses, that
no socket of this process or its children touches anything but loopback, and
that no Ray process is left when it ends. Images are small CIFAR-10 subsets,
embedded for real by the actors; reference vectors come from the embedding cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray  # the `ray` extra; CI installs it (setup.sh installs .[all,ray])

import visual_memory as vm
from visual_memory.distributed import cluster as vcluster
from visual_memory.distributed.ingest import JOURNAL
from visual_memory.errors import ImageError

REPO = Path(__file__).resolve().parents[1]


def _ray_pids() -> set[int]:
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True)}


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + worker (1 CPU), pinned to 127.0.0.1; the driver is this process."""
    from ray.cluster_utils import Cluster

    vcluster.pin_loopback()
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, logging_level="warning")
    pids = _ray_pids()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        deadline = time.time() + 30
        while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                             for p in pids | _ray_pids()):
            time.sleep(0.5)
        left = [p for p in pids | _ray_pids() if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"Ray processes left behind: {left}"


def _subset(root: Path, dest: Path, per_class: int, classes: int = 10, offset: int = 0) -> list[Path]:
    """Copy the first ``per_class`` images of the first ``classes`` classes into an ImageFolder."""
    paths = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir())[:classes]:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((root / cls).iterdir())[offset : offset + per_class]:
            shutil.copy(f, dest / cls / f.name)
            paths.append(dest / cls / f.name)
    return paths


def _records(mem) -> dict[str, tuple]:
    vecs = mem.vectors()
    return {r["id"]: (r["label"], r["source"], v) for r, v in zip(mem.get(mem.ids()), vecs)}


def _assert_loopback_only() -> None:
    me = psutil.Process()
    seen = set()
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            for addr in (c.laddr, c.raddr):
                if addr:
                    seen.add(addr.ip.removeprefix("::ffff:"))
    bad = {a for a in seen if not vcluster.is_loopback(a)}
    assert seen and not bad, f"sockets on non-loopback addresses: {bad}"


def test_cluster_is_multi_node_and_loopback_only(cluster):
    nodes = vcluster.check_loopback()
    assert len(nodes) - 1 == 2  # head + worker, plus the driver entry
    assert set(nodes.values()) == {"127.0.0.1"}
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    _assert_loopback_only()


def test_ray_add_stores_exactly_what_vismem_add_stores(cluster, cifar_root, tmp_path):
    from typer.testing import CliRunner

    from visual_memory.cli import app

    folder = tmp_path / "imgs"
    _subset(cifar_root / "train", folder, per_class=4)
    runner = CliRunner()
    for name in ("one", "ray"):
        assert runner.invoke(app, ["create", str(tmp_path / name)]).exit_code == 0
    one = runner.invoke(app, ["add", str(tmp_path / "one"), str(folder)])
    assert one.exit_code == 0, one.output
    out = runner.invoke(app, ["add", str(tmp_path / "ray"), str(folder), "--ray", cluster.address, "--batch-size", "10"])
    assert out.exit_code == 0, out.output
    a, b = vm.open(tmp_path / "one"), vm.open(tmp_path / "ray")
    ra, rb = _records(a), _records(b)
    assert len(ra) == 40 and set(ra) == set(rb)
    for rid, (label, source, vec) in ra.items():
        assert rb[rid][:2] == (label, source)
        np.testing.assert_allclose(rb[rid][2], vec, atol=1e-4)
    assert b.ids() == a.ids()  # fragments are committed in input order
    adds = [e for e in b.history() if e["op"] == "add"]
    assert len(adds) == 1 and adds[0]["n"] == 40 and adds[0]["version"] == b.version == 2
    assert adds[0]["ray"]["nodes"] == 2 and adds[0]["ray"]["fragments"] == 4
    assert not (tmp_path / "ray" / JOURNAL).exists()
    _assert_loopback_only()


def test_bad_image_names_the_file_and_commits_nothing(cluster, cifar_root, tmp_path):
    folder = tmp_path / "imgs"
    _subset(cifar_root / "train", folder, per_class=2, classes=3)
    bad = folder / "cat" / "broken.jpg"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    mem = vm.create(tmp_path / "m")
    files_before = sorted(p.name for p in (tmp_path / "m").rglob("*"))
    with pytest.raises(ImageError, match="broken.jpg"):
        mem.add(folder, ray=cluster.address, batch_size=3)
    assert mem.version == 1 and len(mem) == 0 and len(vm.open(tmp_path / "m")) == 0
    assert sorted(p.name for p in (tmp_path / "m").rglob("*")) == files_before  # not one data file written


def test_ray_add_reads_webdataset_tars_and_path_tables_in_one_version(cluster, cifar_root, tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.csv as pacsv

    files = _subset(cifar_root / "train", tmp_path / "imgs", per_class=2, classes=4, offset=50)
    tar_files, csv_files = files[:4], files[4:]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, f in enumerate(tar_files):
            for name, data in ((f"{i:05d}.jpg", f.read_bytes()), (f"{i:05d}.cls", f.parent.name.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pacsv.write_csv(pa.table({"path": [str(f) for f in csv_files], "label": [f.parent.name for f in csv_files]}),
                    tmp_path / "paths.csv")
    mem = vm.create(tmp_path / "m")
    r = mem.add([tmp_path / "shard-000.tar", tmp_path / "paths.csv"], ray=cluster.address, batch_size=3)
    assert r.added == 8 and mem.version == 2
    ref = vm.create(tmp_path / "ref")
    ref.add(files, labels=[f.parent.name for f in files])
    assert _records(mem).keys() == _records(ref).keys()
    for rid, (label, source, vec) in _records(ref).items():
        got = _records(mem)[rid]
        assert got[0] == label
        np.testing.assert_allclose(got[2], vec, atol=1e-4)
    sources = [x["source"] for x in mem.get(mem.ids())]
    assert sum(s.startswith(str(tmp_path / "shard-000.tar") + ":") for s in sources) == 4


def _fragment_nodes(journal: Path) -> list[str]:
    """Nodes that wrote each journaled (uncommitted) fragment, as the driver last checkpointed them."""
    try:
        doc = json.loads(journal.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [e.get("node") for e in doc.get("fragments", [])]


def _assert_each_once(mem, paths, encoder) -> None:
    from visual_memory.cache import embed_paths, file_sha256

    want = {file_sha256(p): p for p in paths}
    ids = mem.ids()
    assert len(ids) == len(set(ids)) == len(want) and set(ids) == set(want)
    assert mem._store.count() == len(want)  # on disk too: no duplicate row
    ref = dict(zip(want, embed_paths(encoder, list(want.values()))))
    got = dict(zip(ids, mem.vectors()))
    assert max(float(np.abs(got[i] - ref[i]).max()) for i in want) < 1e-4
    data = mem.path / "records.lance" / "data"
    referenced = mem._store.data_files()
    assert {p.name for p in data.iterdir()} == referenced  # no orphan file of a killed attempt left


def test_killed_worker_node_mid_ingest_loses_nothing_and_duplicates_nothing(cluster, cifar_root, tmp_path, encoder):
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # a third node, so two remain after the kill
    cluster.wait_for_nodes()
    workers = {n.node_id: n for n in cluster.worker_nodes}
    folder = tmp_path / "imgs"
    paths = _subset(cifar_root / "train", folder, per_class=10, offset=10)
    mem = vm.create(tmp_path / "m")
    result, error = {}, {}

    def run():
        try:  # 50 blocks of 2 images: a window of several seconds to kill a node in
            result["r"] = mem.add(folder, ray=cluster.address, batch_size=2, workers=3)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            error["e"] = exc

    t = threading.Thread(target=run)
    t.start()
    journal = tmp_path / "m" / JOURNAL

    def busy_worker():
        return next((n for n in _fragment_nodes(journal) if n in workers), None)

    deadline = time.time() + 150
    while time.time() < deadline and t.is_alive() and busy_worker() is None:
        time.sleep(0.1)
    assert not error, error
    victim = busy_worker()
    assert victim is not None, "no worker node wrote a fragment before the ingest ended"
    assert len(_fragment_nodes(journal)) < 50, "the ingest finished before the node could be killed"
    cluster.remove_node(workers[victim], allow_graceful=False)
    t.join(timeout=240)
    assert not t.is_alive(), "the ingest did not finish after its worker node was killed"
    assert not error, error
    assert victim not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert result["r"].added == 100 and len([e for e in mem.history() if e["op"] == "add"]) == 1
    _assert_each_once(mem, paths, encoder)
    _assert_loopback_only()


def test_killed_driver_resumes_with_no_loss_and_no_duplicates(cluster, cifar_root, tmp_path, encoder):
    folder = tmp_path / "imgs"
    paths = _subset(cifar_root / "train", folder, per_class=5, offset=30)
    vm.create(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VISMEM_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", "from visual_memory.cli import app; app()", "add", str(tmp_path / "m"), str(folder),
                             "--ray", cluster.address, "--batch-size", "2", "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = tmp_path / "m" / JOURNAL
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and len(_fragment_nodes(journal)) < 3:
            time.sleep(0.1)
        assert proc.poll() is None, "the add finished (or failed) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    journaled = len(_fragment_nodes(journal))
    assert journaled >= 3
    mem = vm.open(tmp_path / "m")
    assert len(mem) == 0 and mem.version == 1  # nothing was committed
    r = mem.add(folder, ray=cluster.address, batch_size=2, workers=2)
    assert r.added == 50
    (add,) = [e for e in mem.history() if e["op"] == "add"]
    assert add["ray"]["resumed"] >= 2 * 3  # journaled fragments were reused, not re-embedded
    _assert_each_once(mem, paths, encoder)


@pytest.fixture
def open_sharded(cluster):
    """`vm.open(..., ray=cluster, shards=n)`, closed at the end of the test (its actors hold cluster CPUs)."""
    opened = []

    def open_(path, shards=2, **kw):
        mem = vm.open(path, ray=cluster.address, shards=shards, **kw)
        opened.append(mem)
        return mem

    yield open_
    cpus = ray.cluster_resources().get("CPU", 0.0)
    for mem in opened:
        mem.close()
    deadline = time.time() + 30
    while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < cpus:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == cpus, "closed shard actors still hold CPUs"


# -- sharded search ----------------------------------------------------------------


@pytest.fixture
def cifar_memory(tmp_path, cifar_small):
    mem = vm.create(tmp_path / "m", encoder=None, dim=cifar_small["train_x"].shape[1])
    ids = [p.stem + "-" + p.parent.name for p in cifar_small["train_paths"]]
    mem.add_embeddings(cifar_small["train_x"], labels=cifar_small["train_y"], ids=ids)
    return tmp_path / "m"


def _predictions(mem, queries, k=10):
    return [(p.label, [n.id for n in p.neighbors]) for p in mem.classify(queries, k=k)]


def test_two_shards_classify_like_one_process(cluster, cifar_memory, cifar_small, open_sharded):
    q = cifar_small["val_x"]
    one = vm.open(cifar_memory)
    sharded = open_sharded(cifar_memory)
    stats = sharded.index["shards"]
    assert [s["ntotal"] for s in stats] and sum(s["ntotal"] for s in stats) == len(one) == 200
    assert all(s["ntotal"] > 0 for s in stats) and {s["node"] for s in stats} == {"127.0.0.1"}
    assert len({s["node_id"] for s in stats}) == 2  # one shard per node (SPREAD)
    assert _predictions(sharded, q) == _predictions(one, q)
    s1, r1 = one.search(q, k=20)
    s2, r2 = sharded.search(q, k=20)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    assert one.rows.id_lists(r1) == sharded.rows.id_lists(r2)

    # Edits through the sharded memory reach the shard holding the record and match one process.
    ids = sharded.ids()
    sharded.remove(ids=ids[:7])
    sharded.relabel(ids[10:15], "ship")
    sharded.reweight(ids[20:30], 0.0)
    sharded.add_embeddings(cifar_small["val_x"][:5], labels="novel", ids=[f"new{i}" for i in range(5)])
    assert sum(sharded.index["shards"][i]["alive"] for i in range(2)) == 198
    assert _predictions(sharded, q) == _predictions(vm.open(cifar_memory), q)
    _assert_loopback_only()


def test_forget_on_a_sharded_memory_leaves_no_byte_on_any_shard(cluster, cifar_memory, cifar_small, open_sharded):
    mem = open_sharded(cifar_memory)
    ids = mem.ids()
    # one record from each shard
    owner = mem._state.index._owner
    pick = [int(np.flatnonzero(owner == s)[0]) for s in range(2)]
    gone = [ids[r] for r in pick]
    needles = [v.tobytes() for v in mem.vectors(np.asarray(pick))]
    before = mem._state.index.scan(needles)
    assert sum(s["found"] for s in before) == 2  # the check can fail: the bytes are there before
    receipt = mem.forget(ids=gone)
    assert receipt.verification["ok"] and receipt.verification["vectors_scanned"] == 2
    after = mem._state.index.scan(needles)
    assert len(after) == 2 and all(s["found"] == 0 and s["bytes_scanned"] > 0 for s in after)
    assert {r["shard"] for r in mem.index["last_erase"]} == {0, 1}
    assert all(r["found"] == 0 for r in mem.index["last_erase"])
    assert not set(gone) & set(mem.ids()) and not set(gone) & set(vm.open(cifar_memory).ids())
    assert _predictions(mem, cifar_small["val_x"]) == _predictions(vm.open(cifar_memory), cifar_small["val_x"])


def test_sharded_ivf_is_trained_once_and_answers_like_one_process(cluster, tmp_path, cifar_small, open_sharded):
    """An approximate spec: the driver trains the quantiser once; the shards fill their lists in parallel.

    Trained on the same vectors, the two shards' inverted lists together are the
    one-process index's lists, so with the same nprobe the merged top-k is the same.
    """
    x = cifar_small["train_x"]
    mem = vm.create(tmp_path / "m", encoder=None, dim=x.shape[1], index="IVF4,Flat")  # trainable from 156 records
    mem.add_embeddings(x, labels=cifar_small["train_y"], ids=[f"r{i}" for i in range(len(x))])
    one = vm.open(tmp_path / "m")
    sharded = open_sharded(tmp_path / "m")
    stats = sharded.index["shards"]
    assert one.index["spec"] == "IVF4,Flat"
    assert [s["spec"] for s in stats] == ["IVF4,Flat"] * 2 and all(s["trained"] and s["ntotal"] == 100 for s in stats)
    q = cifar_small["val_x"]
    exact_ids = vm.open(tmp_path / "m").rows.id_lists(np.argsort(-(q @ x.T), axis=1)[:, :10])
    for nprobe in (1, 3):
        s1, r1 = one.search(q, k=10, params={"nprobe": nprobe})
        s2, r2 = sharded.search(q, k=10, params={"nprobe": nprobe})
        assert sharded.rows.id_lists(r2) == one.rows.id_lists(r1)
        np.testing.assert_allclose(s2, s1, atol=1e-6)
    assert one.rows.id_lists(one.search(q, k=10, params={"nprobe": 1})[1]) != exact_ids  # really approximate

    # Forget: the FAISS shards erase the rows from their lists; still the same answers
    # as one process that forgets the same records from a copy of the memory.
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    one_copy = vm.open(tmp_path / "copy")
    gone = [f"r{i}" for i in (0, 1, 150)]
    needles = [v.tobytes() for v in one.vectors(np.array([0, 1, 150]))]  # as stored
    assert sum(r["found"] for r in sharded._state.index.scan(needles)) == 3  # IVF,Flat keeps raw vectors
    assert sharded.forget(ids=gone).verification["ok"] and one_copy.forget(ids=gone).verification["ok"]
    assert sum(r["found"] for r in sharded.index["last_erase"]) == 0
    assert sum(r["found"] for r in sharded._state.index.scan(needles)) == 0
    # IVF removal is real (the codes leave the lists); row numbers stay until a compaction.
    assert [s["alive"] for s in sharded.index["shards"]] in ([98, 99], [99, 98])
    for nprobe in (1, 3):
        a = one_copy.rows.id_lists(one_copy.search(q, k=10, params={"nprobe": nprobe})[1])
        assert sharded.rows.id_lists(sharded.search(q, k=10, params={"nprobe": nprobe})[1]) == a

    # Saved with the memory like a local index: the next sharded open restores each shard's part
    # (no retraining, no vector read), and answers as before.
    assert sharded._state.load_note.startswith("2 shard actor(s), built from the records")
    before = sharded.rows.id_lists(sharded.search(q, k=10, params={"nprobe": 1})[1])
    meta = json.loads((tmp_path / "m" / "index" / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["version"] == sharded.version and meta["alive"] == 197
    sharded.close()
    again = open_sharded(tmp_path / "m")
    assert again._state.load_note.startswith("2 shard actor(s), loaded the saved index"), again._state.load_note
    assert len(again) == 197 and again.rows.id_lists(again.search(q, k=10, params={"nprobe": 1})[1]) == before
    again.add_embeddings(x[:1] * 0.5 + x[1:2] * 0.5, labels=["new"], ids=["new0"])
    assert again.classify(x[:1] * 0.5 + x[1:2] * 0.5, k=1, search_params={"nprobe": 4})[0].label == "new"
    # `vismem index check` works on a sharded memory: all four lists probed = exact.
    checked = again.check_index(queries=20, k=5, params={"nprobe": 4})
    assert checked["recall_at_k"] == 1.0 and checked["agreement"] == 1.0 and checked["index"] == "IVF4,Flat"
    assert again.check_index(queries=20, k=5, params={"nprobe": 1})["recall_at_k"] < 1.0
    # `vismem index build` on a sharded memory retrains once and refills fresh shards.
    built = again.build_index("IVF2,Flat")
    assert built["resolved"] == "IVF2,Flat" and [s["spec"] for s in again.index["shards"]] == ["IVF2,Flat"] * 2
    assert again.check_index(queries=20, k=5, params={"nprobe": 2})["recall_at_k"] == 1.0


def test_server_serves_a_sharded_memory(cluster, cifar_root, tmp_path, open_sharded):
    """`vismem serve --ray --shards` hands `create_app` a sharded memory: classify and edits over HTTP."""
    from fastapi.testclient import TestClient

    from visual_memory.server import create_app

    folder = tmp_path / "imgs"
    _subset(cifar_root / "train", folder, per_class=2)
    mem = vm.create(tmp_path / "m")
    mem.add(folder)
    query = sorted((cifar_root / "val" / "cat").iterdir())[0]
    want = vm.open(tmp_path / "m").classify([query], k=5)[0]
    sharded = open_sharded(tmp_path / "m")
    with TestClient(create_app(sharded, token="t"), base_url="http://127.0.0.1") as c:
        r = c.post("/classify?k=5", files={"file": (query.name, query.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["label"] == want.label and [n["id"] for n in r.json()["neighbors"]] == [n.id for n in want.neighbors]
        top = want.neighbors[0].id
        r = c.post("/relabel", json={"ids": [top], "label": "zebra"}, headers={"Authorization": "Bearer t"})
        assert r.status_code == 200, r.text
        r = c.post("/classify?k=1", files={"file": (query.name, query.read_bytes(), "image/jpeg")})
        assert r.json()["label"] == "zebra"


def test_ray_add_and_shards_on_an_s3_memory(cluster, cifar_root, tmp_path, open_sharded):
    """The memory on object storage (moto's S3 server on 127.0.0.1): workers write, the driver commits, shards read."""
    sys.path.insert(0, str(Path(__file__).parent))
    from moto_support import moto_server

    server = moto_server()
    s3 = next(server)
    try:
        uri = f"s3://{s3.bucket('ray-mem')}/m"
        folder = tmp_path / "imgs"
        _subset(cifar_root / "train", folder, per_class=2, classes=5, offset=70)
        mem = vm.create(uri, storage_options=s3.options)
        r = mem.add(folder, ray=cluster.address, batch_size=4)
        assert r.added == 10 and mem.version == 2
        assert not any(k.endswith(JOURNAL) for k in s3.objects("ray-mem", "m/"))
        local = vm.create(tmp_path / "local")
        local.add(folder)
        assert sorted(mem.ids()) == sorted(local.ids())
        sharded = open_sharded(uri, storage_options=s3.options)
        q = local.vectors()[:4]
        assert _predictions(sharded, q, k=3) == _predictions(vm.open(uri, storage_options=s3.options), q, k=3)
        gone = sharded.ids()[0]
        needle = sharded.vectors(np.array([0])).tobytes()
        assert sharded.forget(ids=[gone]).verification["ok"]
        assert not any(needle in data for data in s3.objects("ray-mem", "m/").values())
        assert all(s["found"] == 0 for s in sharded._state.index.scan([needle]))
        _assert_loopback_only()
    finally:
        next(server, None)
