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
