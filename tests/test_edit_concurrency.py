"""One writer at a time across processes; readers see a consistent version and move on refresh()."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import visual_memory as vm
from visual_memory.errors import MemoryLockedError

HOLD = r"""
import sys, time, visual_memory as vm
mem = vm.open(sys.argv[1])
with mem._store.writing():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""

WRITE = r"""
import sys, visual_memory as vm
mem = vm.open(sys.argv[1])
mem.remove(ids=["conc-0000", "conc-0001"])
mem.relabel(["conc-0002"], "changed")
print(mem.version, flush=True)
"""


@pytest.fixture
def mem(memory_dir, unit_vectors):
    m = vm.create(memory_dir, encoder=None, dim=8)
    m.add_embeddings(unit_vectors(40, 8, seed=5), labels="a", ids=[f"conc-{i:04d}" for i in range(40)])
    return m


def test_second_writer_gets_locked_error_or_waits(mem):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(mem.path), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        v = mem.version
        with pytest.raises(MemoryLockedError, match="another writer holds the lock"):
            mem.remove(ids=["conc-0005"])
        with pytest.raises(MemoryLockedError):
            mem.forget(ids=["conc-0005"])
        assert mem.version == v and "conc-0005" in mem
        t0 = time.monotonic()
        r = mem.remove(ids=["conc-0005"], lock_timeout=30)  # waits for the holder to finish
        assert r.removed == 1 and time.monotonic() - t0 > 0.5
    finally:
        holder.wait(timeout=30)


def test_reader_sees_consistent_version_until_refresh(mem, unit_vectors):
    reader = vm.open(mem.path, read_only=True)
    q = unit_vectors(40, 8, seed=5)[:3]
    before = [[n.id for n in p.neighbors] for p in reader.classify(q, k=3)]
    v0 = reader.version
    out = subprocess.run([sys.executable, "-c", WRITE, str(mem.path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    new_version = int(out.stdout.strip())
    # the reader still answers from its version, unchanged
    assert reader.version == v0 and "conc-0000" in reader
    assert [[n.id for n in p.neighbors] for p in reader.classify(q, k=3)] == before
    assert reader.refresh() is True
    assert reader.version == new_version and "conc-0000" not in reader and "conc-0001" not in reader
    assert reader.get(["conc-0002"])[0]["label"] == "changed"
    assert reader.classify(q[2], k=1)[0].label == "changed"
    # the writer's own handle catches up before its next write
    assert mem.remove(ids=["conc-0003"]).version == new_version + 1 and len(mem) == 37


FORGET = r"""
import sys, visual_memory as vm
r = vm.open(sys.argv[1]).forget(ids=["conc-0007"])
print(r.version_after, flush=True)
"""


def test_reader_moves_past_a_forget_on_refresh(mem, unit_vectors):
    reader = vm.open(mem.path, read_only=True)
    out = subprocess.run([sys.executable, "-c", FORGET, str(mem.path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the reader's version was erased under it; refresh moves it to the new one
    assert reader.refresh() is True and reader.version == int(out.stdout.strip())
    assert "conc-0007" not in reader and len(reader) == 39
    q = unit_vectors(40, 8, seed=5)[7]
    assert reader.classify(q, k=1)[0].neighbors[0].id != "conc-0007"
    assert reader.get(["conc-0008"])[0]["id"] == "conc-0008"


# -- another process erases versions under a reader (forget, optimize) ----------------------

ERASE = r"""
import sys, visual_memory as vm
from datetime import timedelta
m = vm.open(sys.argv[1])
if sys.argv[2] == "forget":
    print(m.forget(ids=sys.argv[3:]).version_after, flush=True)
else:
    m.remove(ids=sys.argv[3:])
    print(m.optimize(cleanup_older_than=timedelta(0)).version, flush=True)
"""


def _erase(path, how, *ids):
    import os

    out = subprocess.run([sys.executable, "-c", ERASE, str(path), how, *ids], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH="src"))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_no_read_returns_a_record_forgotten_by_another_process(mem, unit_vectors):
    from visual_memory.errors import UnknownIdError

    q = unit_vectors(40, 8, seed=5)
    reader = vm.open(mem.path, read_only=True)
    assert reader.classify(q[7], k=1)[0].neighbors[0].id == "conc-0007"
    v = _erase(mem.path, "forget", "conc-0007")
    # no refresh() call: every read notices the erasure itself and moves on first
    assert reader.classify(q[7], k=1)[0].neighbors[0].id != "conc-0007"
    assert reader.version == v
    assert "conc-0007" not in reader.ids() and "conc-0007" not in {r["id"] for r in reader.records(limit=None)}
    with pytest.raises(UnknownIdError):
        reader.get(["conc-0007"])
    assert reader.get(["conc-0008"])[0]["id"] == "conc-0008" and reader.info()["count"] == 39
    v2 = _erase(mem.path, "optimize", "conc-0009")  # optimize's cleanup erases versions too
    assert len(reader.records(limit=None)) == 38 and reader.version == v2


def test_a_read_already_past_the_check_falls_back_to_the_newest_version(mem):
    reader = vm.open(mem.path, read_only=True)
    reader.auto_follow_erasures = False  # as in the server: this reader does not move by itself
    _erase(mem.path, "forget", "conc-0011")
    assert reader.erased_since_loaded() and "conc-0011" in reader  # still on its erased version, in RAM
    rows = reader.records(limit=None)  # its version's files are gone: the read uses the newest version
    assert len(rows) == 39 and "conc-0011" not in {r["id"] for r in rows}
    assert reader.follow_erasures() and "conc-0011" not in reader and not reader.erased_since_loaded()


def test_server_never_fails_or_shows_forgotten_records_after_another_process_forgets(tmp_path, cifar_root, encoder):
    import httpx

    from server_support import LiveServer
    from visual_memory.server import create_app

    paths = sorted((cifar_root / "train" / "horse").glob("*.jpg"))[:4] + sorted((cifar_root / "train" / "frog").glob("*.jpg"))[:4]
    m = vm.create(tmp_path / "m", encoder=encoder)
    m.add(paths, labels=["horse"] * 4 + ["frog"] * 4)
    gone, kept = vm.images.sha256_of(paths[0]), vm.images.sha256_of(paths[1])
    with LiveServer(create_app(vm.open(m.path), refresh_every=3600)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        def classify_ids():
            r = c.post("/classify?k=8", files={"file": ("q.jpg", paths[0].read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            return [n["id"] for n in r.json()["neighbors"]]

        assert classify_ids()[0] == gone and c.get(f"/records/{gone}/thumbnail").status_code == 200
        _erase(m.path, "forget", gone)
        assert gone not in classify_ids()
        listed = c.get("/records", params={"limit": 100})
        assert listed.status_code == 200 and gone not in {r["id"] for r in listed.json()["records"]}
        assert c.get(f"/records/{gone}").status_code == 404
        assert c.get(f"/records/{gone}/thumbnail").status_code == 404
        assert c.get(f"/records/{kept}/thumbnail").status_code == 200 and c.get("/stats").status_code == 200
        _erase(m.path, "optimize", kept)
        assert c.get("/records", params={"limit": 100}).status_code == 200
        assert c.get(f"/records/{vm.images.sha256_of(paths[2])}/thumbnail").status_code == 200
        assert c.get("/healthz").json()["records"] == 6
