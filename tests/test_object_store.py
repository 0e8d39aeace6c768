"""The memory on object storage: the same add / classify / forget / crash behaviour as a local memory.

A real S3 server (``moto_server -H 127.0.0.1``, one per module, see
tests/moto_support.py) holds the ``s3://`` memories; ``file://`` and a plain
path run the same checks. Byte scans read every object of the bucket through
boto3, independently of visual_memory's own storage code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import visual_memory as vm
from visual_memory.errors import MemoryLockedError

from moto_support import moto_server

D = 16
N = 60


@pytest.fixture(scope="module")
def s3():
    yield from moto_server()


def _ids(n):
    return [f"objstore-rec-{i:05d}" for i in range(n)]


@pytest.fixture(params=["local", "file", "s3"])
def where(request, tmp_path, s3):
    """(uri, storage_options, objects(): {name: bytes} of every file/object of the memory)."""
    if request.param == "s3":
        bucket = s3.bucket(f"b-{uuid.uuid4().hex[:12]}")
        return f"s3://{bucket}/memories/m", s3.options, lambda: s3.objects(bucket, "memories/m/")
    path = tmp_path / "m"
    uri = f"file://{path}" if request.param == "file" else str(path)
    return uri, None, lambda: {str(f): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def _holding(objects: dict[str, bytes], needles: list[bytes]) -> set[bytes]:
    return {n for n in needles if any(n in data for data in objects.values())}


def _memory(uri, opts, unit_vectors):
    m = vm.create(uri, encoder=None, dim=D, storage_options=opts)
    x = unit_vectors(N, D, seed=4)
    m.add_embeddings(x[:40], labels=[f"class-{i % 4}" for i in range(40)], ids=_ids(40), source="bulk-source")
    m.add_embeddings(x[40:], labels="label-of-the-private-ones", ids=_ids(N)[40:], source="/private/source/path-001")
    return m, x


def test_add_classify_remove_reopen(where, unit_vectors):
    uri, opts, _ = where
    m, x = _memory(uri, opts, unit_vectors)
    assert m.classify(x[7], k=1)[0].neighbors[0].id == _ids(N)[7]
    assert m.remove(ids=[_ids(N)[7]]).removed == 1
    m.relabel([_ids(N)[8]], "class-new")
    again = vm.open(uri, storage_options=opts)
    assert len(again) == N - 1 and _ids(N)[7] not in again and again.get([_ids(N)[8]])[0]["label"] == "class-new"
    assert [e["op"] for e in again.history()] == ["create", "add_embeddings", "add_embeddings", "remove", "relabel"]
    assert [e["version"] for e in again.history()] == list(range(1, again.version + 1))
    q = x[10:20]
    assert [p.neighbors[0].id for p in again.classify(q, k=1)] == _ids(N)[10:20]
    with pytest.raises(vm.errors.MemoryExistsError):
        vm.create(uri, encoder=None, dim=D, storage_options=opts)


def test_forget_leaves_no_byte_in_any_object(where, unit_vectors):
    uri, opts, objects = where
    m, x = _memory(uri, opts, unit_vectors)
    gone = _ids(N)[40:] + [_ids(N)[3]]
    stored = {r["id"]: r["vector"] for r in m.get(gone, columns=["id", "vector"])}
    m.tag("before")
    needles = [g.encode() for g in gone] + [v.tobytes() for v in stored.values()] \
        + [b"label-of-the-private-ones", b"/private/source/path-001"]
    assert _holding(objects(), needles) == set(needles)  # positive control
    receipt = m.forget(ids=gone)
    assert _holding(objects(), needles) == set()
    v = receipt.verification
    assert v["ok"] and v["ids_scanned"] == len(gone) and v["vectors_scanned"] == len(gone) and v["texts_scanned"] == 2
    assert v["storage"]["kind"] == ("s3" if uri.startswith("s3://") else "local")
    assert v["storage"]["keeps_deleted_versions"] is False and receipt.tags_dropped == ["before"]
    # every object but the lock/lease (and, on S3, the forget's own audit entry, written after the scan)
    assert v["files_scanned"] == len(objects()) - 1 - uri.startswith("s3://")
    again = vm.open(uri, storage_options=opts)
    assert len(again) == N - len(gone) and not set(gone) & set(again.ids())
    assert [p.neighbors[0].id for p in again.classify(x[:3], k=1)] == [_ids(N)[0], _ids(N)[1], _ids(N)[2]]
    assert again.history()[-1]["op"] == "forget"


def test_versioned_bucket_is_reported_in_the_receipt(s3, unit_vectors):
    bucket = s3.bucket(f"v-{uuid.uuid4().hex[:12]}", versioned=True)
    uri = f"s3://{bucket}/m"
    m, _ = _memory(uri, s3.options, unit_vectors)
    receipt = m.forget(ids=[_ids(N)[0]])
    storage = receipt.verification["storage"]
    assert storage["bucket_versioning"] == "enabled" and storage["keeps_deleted_versions"] is True
    assert "lifecycle" in storage["note"]
    # What the receipt warns about is real: the current objects are clean, old versions are not.
    assert not _holding(s3.objects(bucket), [_ids(N)[0].encode()])
    c = s3.client()
    old = [o for o in c.list_object_versions(Bucket=bucket, Prefix="m/").get("Versions", []) if not o["IsLatest"]]
    assert any(_ids(N)[0].encode() in c.get_object(Bucket=bucket, Key=o["Key"], VersionId=o["VersionId"])["Body"].read()
               for o in old)


def test_credentials_from_the_environment(s3, monkeypatch, unit_vectors):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3.bucket(f"e-{uuid.uuid4().hex[:12]}")
    m = vm.create(f"s3://{bucket}/m", encoder=None, dim=D)
    m.add_embeddings(unit_vectors(3, D, seed=1), labels="a", ids=_ids(3))
    assert len(vm.open(f"s3://{bucket}/m")) == 3


def test_audit_log_is_one_object_per_entry_and_fences_a_second_writer(s3, unit_vectors):
    bucket = s3.bucket(f"a-{uuid.uuid4().hex[:12]}")
    m, _ = _memory(f"s3://{bucket}/m", s3.options, unit_vectors)
    keys = sorted(k for k in s3.objects(bucket, "m/audit/"))
    assert keys == [f"m/audit/{i:012d}.json" for i in range(3)]
    assert [json.loads(s3.objects(bucket, k)[k])["op"] for k in keys] == ["create", "add_embeddings", "add_embeddings"]
    # Another writer (one that took an expired lease) wrote the next entry meanwhile: ours is refused, not lost.
    with m._store.writing():
        s3.client().put_object(Bucket=bucket, Key="m/audit/000000000003.json", Body=b'{"op": "intruder", "version": 3}')
        with pytest.raises(MemoryLockedError, match="written by another writer"):
            m._store.audit("late")
    assert json.loads(s3.objects(bucket, "m/audit/000000000003.json")["m/audit/000000000003.json"])["op"] == "intruder"


HOLD = r"""
import sys, time, visual_memory as vm
m = vm.open(sys.argv[1], storage_options=dict(a.split("=", 1) for a in sys.argv[3:]))
with m._store.writing():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lease_excludes_a_second_writer_and_is_taken_over_from_a_dead_one(s3, unit_vectors):
    bucket = s3.bucket(f"l-{uuid.uuid4().hex[:12]}")
    uri = f"s3://{bucket}/m"
    m, _ = _memory(uri, s3.options, unit_vectors)
    args = [f"{k}={v}" for k, v in s3.options.items()]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, uri, "60", *args], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH="src"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        v = m.version
        with pytest.raises(MemoryLockedError, match=rf"another writer holds the lease \(.*:{holder.pid},"):
            m.remove(ids=[_ids(N)[0]])
        assert m.version == v and _ids(N)[0] in m
        holder.send_signal(signal.SIGKILL)  # dies holding the lease
        holder.wait(timeout=30)
        t0 = time.monotonic()
        assert m.remove(ids=[_ids(N)[0]], lock_timeout=30).removed == 1  # a dead local pid: taken over at once
        assert time.monotonic() - t0 < 20
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lease = json.loads(s3.objects(bucket, "m/_lease.json")["m/_lease.json"])
    assert lease["released"] is True and lease["pid"] == os.getpid()


CRASH = r"""
import sys, visual_memory as vm
m = vm.open(sys.argv[1], storage_options=dict(a.split("=", 1) for a in sys.argv[3:]))
m.forget(ids=sys.argv[2].split(","))
"""


@pytest.mark.parametrize("point", ["forget:deleted", "forget:scrubbed"])
def test_forget_killed_mid_way_is_finished_on_reopen(s3, unit_vectors, point):
    bucket = s3.bucket(f"c-{uuid.uuid4().hex[:12]}")
    uri = f"s3://{bucket}/m"
    m, _ = _memory(uri, s3.options, unit_vectors)
    gone = _ids(N)[40:45]
    stored = [r["vector"].tobytes() for r in m.get(gone, columns=["vector"])]
    env = dict(os.environ, PYTHONPATH="src", VISMEM_CRASH_AT=point)
    out = subprocess.run([sys.executable, "-c", CRASH, uri, ",".join(gone), *[f"{k}={v}" for k, v in s3.options.items()]],
                         env=env, capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert "m/.forget-journal.json" in s3.objects(bucket, "m/")
    again = vm.open(uri, storage_options=s3.options)  # takes the dead writer's lease, finishes the forget
    assert not set(gone) & set(again.ids()) and len(again) == N - len(gone)
    objs = s3.objects(bucket, "m/")
    assert "m/.forget-journal.json" not in objs
    assert _holding(objs, [g.encode() for g in gone] + stored) == set()
    forgets = [e for e in again.history() if e["op"] == "forget"]
    assert len(forgets) == 1 and forgets[0]["erased"] == len(gone) and forgets[0]["recovered"] is True


def test_real_images_on_object_storage(s3, cifar_root, encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("VISMEM_CACHE_DIR", str(tmp_path / "cache"))
    bucket = s3.bucket(f"r-{uuid.uuid4().hex[:12]}")
    uri = f"s3://{bucket}/pets"
    paths = sorted((cifar_root / "train" / "cat").glob("*.jpg"))[:3] + sorted((cifar_root / "train" / "ship").glob("*.jpg"))[:3]
    m = vm.create(uri, encoder=encoder, storage_options=s3.options)
    m.add(paths, labels=["cat"] * 3 + ["ship"] * 3)
    assert m.classify(paths[4], k=1)[0].neighbors[0].id == vm.images.sha256_of(paths[4])
    rows = m.get([vm.images.sha256_of(paths[0])], columns=["id", "vector", "thumbnail", "source"])[0]
    needles = [rows["id"].encode(), rows["vector"].tobytes(), rows["thumbnail"], rows["source"].encode()]
    assert _holding(s3.objects(bucket), needles) == set(needles)
    assert m.forget(images=[paths[0]]).verification["ok"]
    assert _holding(s3.objects(bucket), needles) == set()
    assert vm.open(uri, storage_options=s3.options).classify(paths[1], k=1)[0].label == "cat"


def test_bad_locations_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="unsupported location scheme 'ftp'"):
        vm.create("ftp://host/m", encoder=None, dim=4)
    with pytest.raises(ValueError, match="storage_options apply to object storage"):
        vm.create(tmp_path / "m", encoder=None, dim=4, storage_options={"aws_region": "x"})
    assert not (tmp_path / "m").exists()


def test_a_writer_whose_lease_was_taken_over_stops_writing(s3, unit_vectors, monkeypatch):
    from visual_memory import storage

    monkeypatch.setattr(storage, "LEASE_TTL", 0.6)  # heartbeat every 0.2 s
    bucket = s3.bucket(f"t-{uuid.uuid4().hex[:12]}")
    m, _ = _memory(f"s3://{bucket}/m", s3.options, unit_vectors)
    v = m.version
    with m._store.writing():
        # Another process decided this writer was dead and took the lease over.
        s3.client().put_object(Bucket=bucket, Key="m/_lease.json", Body=json.dumps(
            {"owner": "other@host:1", "host": "elsewhere", "pid": 1, "ttl_s": 30, "released": False}).encode())
        deadline = time.monotonic() + 10
        while m._store.storage.lock_lost() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(MemoryLockedError, match="no longer holds the writer lease"):
            m._store.audit("late")
    assert vm.open(f"s3://{bucket}/m", storage_options=s3.options).version == v
    lease = json.loads(s3.objects(bucket, "m/_lease.json")["m/_lease.json"])
    assert lease["owner"] == "other@host:1"  # the release never freed a lease it no longer held
