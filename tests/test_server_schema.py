"""The OpenAPI schema says what the server does: a bounded schemathesis run (issue 11, item 17).

schemathesis 4, its own CLI as a user runs it: all four phases (examples,
coverage, fuzzing, stateful) and its default checks, none disabled or
relaxed, with the token so that every operation is reached (``ignored_auth``
then also checks that each secured operation refuses requests without it).
The one addition is `schemathesis_hooks`: it tells schemathesis what an image
is, which no schema can say (a generation strategy for ``format: binary``).

Against the real uvicorn server on 127.0.0.1 (`server_support.LiveServer`),
not schemathesis' ASGI transport: requests then cross the HTTP stack clients
hit (uvicorn's parsing, the guard's Host/Origin/token/size checks, connection
handling), and the guard sees the Host a client sends.

Bounded: 25 examples per operation, one worker, a fixed seed (the same cases
each run, so a failure reproduces with ``--seed 1``), no example database,
and a 300 s timeout on the run; it takes 30-40 s on two busy cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import visual_memory as vm
from server_support import TOKEN, LiveServer, build_base_memory

TESTS = Path(__file__).resolve().parent
MAX_FILES = 4  # images per add: keeps each generated add request cheap to embed


@pytest.fixture(scope="module")
def base_memory(tmp_path_factory, cifar_root, cifar_small, encoder):
    return build_base_memory(tmp_path_factory.mktemp("schema") / "base", cifar_root, cifar_small, encoder)


def test_schemathesis_finds_no_problem(base_memory, tmp_path, encoder):
    import shutil

    from visual_memory.server import create_app

    shutil.copytree(base_memory, tmp_path / "mem")
    mem = vm.open(tmp_path / "mem", encoder=encoder)
    edits_before = len(mem.history())
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with LiveServer(create_app(mem, token=TOKEN, max_files=MAX_FILES, refresh_every=0.0)) as server:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", "25", "--workers", "1", "--seed", "1",
             "--generation-database", "none", "--request-timeout", "60", "--no-color"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    assert "Selected: 13/13" in out and "Tested: 13" in out, out[-3000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert phase in out, phase
    mem.refresh()
    assert len(mem.history()) > edits_before  # the token worked: generated edits reached the memory
