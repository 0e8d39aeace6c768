"""What a distributed add reads (folders, path tables, webdataset tars) and how it connects: no cluster needed."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from visual_memory.distributed import cluster
from visual_memory.distributed.ingest import check_block, check_fragments
from visual_memory.distributed.sources import locators, read_bytes
from visual_memory.errors import ImageError, VisualMemoryError


@pytest.fixture
def folder(tmp_path, cifar_root):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for f in sorted((cifar_root / "train" / cls).iterdir())[:3]:
            (root / cls / f.name).write_bytes(f.read_bytes())
    return root


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_locators_match_a_local_add(folder):
    t = locators(folder)
    assert t.num_rows == 6 and t.column("label").to_pylist() == ["cat"] * 3 + ["dog"] * 3
    assert t.column("pos").to_pylist() == list(range(6)) and set(t.column("offset").to_pylist()) == {-1}
    assert t.column("source").to_pylist() == t.column("path").to_pylist()
    assert locators(folder, labels="pet").column("label").to_pylist() == ["pet"] * 6


def test_webdataset_tar_members_are_byte_ranges_with_their_labels(folder, tmp_path):
    files = sorted(folder.rglob("*.jpg"))
    members = {}
    for i, f in enumerate(files):
        members[f"s/{i:04d}.jpg"] = f.read_bytes()
        members[f"s/{i:04d}.cls"] = f.parent.name.encode()
    _tar(tmp_path / "shard-0.tar", members)
    t = locators(tmp_path / "shard-0.tar")
    assert t.num_rows == 6 and t.column("label").to_pylist() == [f.parent.name for f in files]
    for row, f in zip(t.to_pylist(), files):
        data = read_bytes(row["path"], row["offset"], row["size"])
        assert data == f.read_bytes() and row["source"].endswith(".jpg")
    # The check pass hashes the member bytes: the same id as the loose file.
    out = check_block(t.select(["pos", "path", "offset", "size"]))
    assert out.column("sha256").to_pylist() == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    _tar(tmp_path / "nolabels.tar", {"a.jpg": files[0].read_bytes()})
    with pytest.raises(ImageError, match="no label member"):
        locators(tmp_path / "nolabels.tar")
    assert locators(tmp_path / "nolabels.tar", labels="x").column("label").to_pylist() == ["x"]


def test_tables_of_paths(folder, tmp_path):
    files = sorted(folder.rglob("*.jpg"))
    rel = [os.path.relpath(f, tmp_path) for f in files]
    pq.write_table(pa.table({"path": rel, "label": ["a"] * 6, "id": [f"i{k}" for k in range(6)]}), tmp_path / "p.parquet")
    t = locators(tmp_path / "p.parquet")
    assert t.column("path").to_pylist() == [str(f) for f in files]  # relative to the table's folder
    assert t.column("id").to_pylist() == [f"i{k}" for k in range(6)]
    pacsv.write_csv(pa.table({"image": [str(f) for f in files]}), tmp_path / "p.csv")
    with pytest.raises(ImageError, match="no 'label' column"):
        locators(tmp_path / "p.csv")
    assert locators(tmp_path / "p.csv", labels="b").num_rows == 6
    pacsv.write_csv(pa.table({"file": ["x.jpg"]}), tmp_path / "bad.csv")
    with pytest.raises(ImageError, match="'path'"):
        locators(tmp_path / "bad.csv")


def test_bad_inputs_are_named(folder, tmp_path):
    with pytest.raises(ImageError, match="nope"):
        locators(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ImageError, match="notes.txt"):
        locators(tmp_path / "notes.txt")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    out = check_block(locators(tmp_path / "broken.jpg", labels="x").select(["pos", "path", "offset", "size"]))
    assert out.column("sha256").to_pylist() == [None] and "broken.jpg" in out.column("error")[0].as_py()


def test_fragments_are_committed_only_if_every_id_is_there_once():
    check_fragments([("f", ["a", "b"], 0), ("g", ["c"], 2)], ["a", "b", "c"])
    with pytest.raises(VisualMemoryError, match="1 twice"):
        check_fragments([("f", ["a", "b"], 0), ("g", ["b", "c"], 1)], ["a", "b", "c"])
    with pytest.raises(VisualMemoryError, match="1 missing"):
        check_fragments([("f", ["a"], 0)], ["a", "b"])


def test_addresses(monkeypatch):
    assert cluster.resolve("local") is None and cluster.resolve("127.0.0.1:6379") == "127.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1234")
    assert cluster.resolve("auto") == "127.0.0.1:1234"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(cluster.ClusterError, match="RAY_ADDRESS"):
        cluster.resolve("auto")
    for bad in ("nohost", "host:99999", "ray://h:10001"):
        with pytest.raises(cluster.ClusterError):
            cluster.resolve(bad)
    assert cluster.is_loopback("127.0.0.2") and not cluster.is_loopback("192.0.2.2")


def test_ray_add_refuses_vectors(tmp_path, unit_vectors):
    import visual_memory as vm

    mem = vm.create(tmp_path / "m", encoder=None, dim=4)
    with pytest.raises(ValueError, match="vectors="):
        mem.add(tmp_path, ray="local", vectors=unit_vectors(1, 4))
