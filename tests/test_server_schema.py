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


def test_schema_documents_errors_and_methods_as_served(tmp_path):
    """The problems schemathesis found on the old server, each checked directly (fast, no fuzzing)."""
    import numpy as np

    from server_support import local_client
    from visual_memory.server import create_app

    m = vm.create(tmp_path / "v", encoder=None, dim=4)
    m.add_embeddings(np.eye(4, dtype=np.float32), list("abcd"), ids=["a", "b", "c", "d/thumb"])
    with local_client(create_app(m, token=TOKEN)) as c:
        spec = c.get("/openapi.json").json()
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                for status, response in op["responses"].items():
                    if status.startswith("4"):  # every error is documented as what it is: {detail: str, error: str}
                        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
        assert spec["components"]["schemas"]["ErrorBody"]["properties"]["detail"]["type"] == "string"
        r = c.post("/forget", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 422 and isinstance(r.json()["detail"], str) and r.json()["errors"][0]["loc"] == ["body", "ids"]
        # Allow names every method of the path, as the schema does (DELETE was missing).
        for url, allow in (("/records/a", "DELETE, GET"), ("/records/d/thumb", "DELETE, GET"), ("/records/a/thumbnail", "GET"), ("/records", "GET, POST")):
            r = c.options(url)
            assert r.status_code == 405 and r.headers["allow"] == allow, (url, r.headers.get("allow"))
        # Schema-valid ids are served: any non-empty text (an unknown one is 404), one holding "/".
        assert c.post("/forget", json={"ids": [" "]}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        assert c.get("/records/d/thumb").json()["id"] == "d/thumb"


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
