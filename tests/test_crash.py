"""Crash safety: kill -9 a real process in the middle of adding a folder of real images.

A child process adds a 2,500-image CIFAR-10 ImageFolder with a commit every 64
records; the parent watches the Lance table from outside and SIGKILLs the child
soon after the first commit is visible. The reopened memory must hold exactly
the committed records (whole commits, in folder order, each intact), and once a
writer has opened it the audit log must account for every one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import lance
import numpy as np
import pytest

import visual_memory as vm
from visual_memory.images import scan_folder

PER_CLASS = 250
COMMIT = 64

CHILD = textwrap.dedent(
    f"""
    import sys
    import visual_memory as vm
    import visual_memory.memory

    visual_memory.memory.adding.COMMIT_EVERY = {COMMIT}
    vm.open(sys.argv[1]).add(sys.argv[2])
    print("finished", flush=True)
    """
)


@pytest.fixture
def folder(cifar_root, tmp_path):
    """An ImageFolder of 2,500 symlinked CIFAR-10 training images."""
    root = tmp_path / "images"
    for class_dir in sorted((cifar_root / "train").iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for src in sorted(class_dir.glob("*.jpg"))[:PER_CLASS]:
            (root / class_dir.name / src.name).symlink_to(src)
    return root


def _committed(records_path) -> int:
    try:
        return lance.dataset(str(records_path)).count_rows()
    except Exception:  # not yet readable
        return 0


def test_kill_9_mid_folder_add_keeps_exactly_the_committed_records(folder, memory_dir, encoder):
    mem = vm.create(memory_dir, encoder=encoder)
    create_version = mem.version
    paths, labels = scan_folder(folder)
    assert len(paths) == 10 * PER_CLASS

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(memory_dir), str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while _committed(memory_dir / "records.lance") == 0:
            if child.poll() is not None:
                pytest.fail(f"the adding process exited early: {child.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no commit became visible within 120 s")
            time.sleep(0.05)
        time.sleep(0.3)  # let it get on with the next batch, so the kill lands mid-work
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # What Lance committed is the truth; read it independently of visual_memory.
    ds = lance.dataset(str(memory_dir / "records.lance"))
    n = ds.count_rows()
    assert 0 < n < len(paths), n
    n_commits = ds.version - create_version
    assert n == COMMIT * n_commits, (n, n_commits)  # whole commits only, nothing partial

    # Reopening works and holds exactly those records: the first n of the folder, in order.
    again = vm.open(memory_dir)
    assert len(again) == n and again.version == ds.version
    want_ids = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:n]]
    assert again.ids() == want_ids
    recs = again.get(want_ids, columns=["id", "label", "source", "vector"])
    assert [r["label"] for r in recs] == labels[:n]
    assert [r["source"] for r in recs] == [str(p) for p in paths[:n]]
    # Spot-check that vectors are intact: first and last committed image.
    for i in (0, n - 1):
        np.testing.assert_allclose(recs[i]["vector"], encoder.embed(paths[i])[0], atol=1e-5)
    queries = encoder.embed(paths[:2])
    assert [p.neighbors[0].id for p in again.classify(queries, k=1)] == want_ids[:2]

    # Reopen as a writer (resume the add for a few more images), which reconciles the audit log.
    extra = n + 5
    res = again.add(paths[:extra], labels=labels[:extra], skip_existing=True)
    assert res.skipped == want_ids and res.added == 5
    assert again.ids() == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:extra]]

    lines = [json.loads(line) for line in (memory_dir / "audit.jsonl").read_text().splitlines()]
    assert lines[0]["op"] == "create"
    adds = [e for e in lines if e["op"] == "add"]
    # One audit line per committed version, in order, with no gaps or repeats.
    assert [e["version"] for e in lines] == list(range(create_version, again.version + 1))
    audited_ids = [i for e in adds for i in e["ids"]]
    assert sorted(audited_ids) == sorted(again.ids())
    assert len(audited_ids) == len(set(audited_ids)) == extra
    assert sum(e["n"] for e in adds) == extra
