"""Load test of the HTTP server on loopback: concurrent classify while a writer edits.

Builds a memory from cached CIFAR-10 embeddings plus real images, starts the
real server (uvicorn, 127.0.0.1, free port) in this process, then measures:

1. baseline: the same classify through the library in-process (sequential);
2. HTTP, one client (sequential);
3. HTTP, N concurrent clients;
4. HTTP, N concurrent clients while another client adds and removes records.

Every phase is bounded by a request count and a time limit. It checks no
request failed and no write was lost (the memory ends with exactly the
records the writer's acknowledged requests imply). Prints a table and writes
benchmarks/results/server.json.

    python benchmarks/bench_server.py --clients 8 --requests 200
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

import visual_memory as vm
from visual_memory.cache import embed_folder
from visual_memory.encoders import create_encoder
from visual_memory.server import create_app

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
TOKEN = "bench-token"


def stats(lat: list[float], wall: float) -> dict:
    a = np.array(lat) * 1000
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "rps": len(a) / wall, "wall_s": wall}


def run_clients(url: str, queries: list[bytes], clients: int, requests: int, max_s: float, k: int, stop: threading.Event | None = None):
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_s

    def client(j: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                t = time.perf_counter()
                r = c.post(f"/classify?k={k}", files={"file": ("q.jpg", queries[i % len(queries)], "image/jpeg")})
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if r.status_code == 200 else errors.append(f"{r.status_code} {r.text[:200]}"))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    if stop is not None:
        stop.set()
    return lat, errors, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=100, help="cached train embeddings per class in the memory")
    ap.add_argument("--clients", type=int, default=8, help="concurrent classify clients")
    ap.add_argument("--requests", type=int, default=200, help="classify requests per phase")
    ap.add_argument("--max-seconds", type=float, default=60, help="time limit per phase")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "server.json")
    args = ap.parse_args()

    enc = create_encoder("efficientnet-lite0")
    tx, ty, _ = embed_folder(enc, DATA / "train", per_class=args.per_class, progress="embedding memory (cached)")
    classes = sorted(p.name for p in (DATA / "val").iterdir())
    queries = [(DATA / "val" / c / f"{4500 + i}.jpg").read_bytes() for c in classes for i in range(10)]
    writes = [(DATA / "val" / c / f"{4900 + i}.jpg").read_bytes() for c in classes for i in range(10)]

    with tempfile.TemporaryDirectory() as tmp:
        mem = vm.create(Path(tmp) / "mem", encoder=enc)
        mem.add_embeddings(tx, list(ty), ids=[f"emb-{i}" for i in range(len(tx))], encoder=enc)
        n0 = len(mem)

        # 1. Baseline: the library, in-process, sequential.
        lat = []
        t0 = time.perf_counter()
        for i in range(min(args.requests, 100)):
            t = time.perf_counter()
            mem.classify(queries[i % len(queries)], k=args.k)
            lat.append(time.perf_counter() - t)
        results = {"library_sequential": stats(lat, time.perf_counter() - t0)}

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(mem, token=TOKEN), host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        all_errors: dict[str, list[str]] = {}
        try:
            # 2-3. HTTP, sequential then concurrent.
            lat, errs, wall = run_clients(url, queries, 1, min(args.requests, 100), args.max_seconds, args.k)
            results["http_1_client"] = stats(lat, wall)
            all_errors["http_1_client"] = errs
            lat, errs, wall = run_clients(url, queries, args.clients, args.requests, args.max_seconds, args.k)
            results[f"http_{args.clients}_clients"] = stats(lat, wall)
            all_errors["http_concurrent"] = errs

            # 4. Concurrent classify while a writer adds and removes records.
            stop = threading.Event()
            added, removed, wlat, werr = [], [], [], []

            def writer() -> None:
                with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                    i = 0
                    while not stop.is_set() and i < len(writes):
                        t = time.perf_counter()
                        r = c.post("/records", files={"files": (f"w{i}.jpg", writes[i], "image/jpeg")}, params={"label": "written"})
                        if r.status_code != 201:
                            werr.append(f"add {r.status_code} {r.text[:200]}")
                        else:
                            added.append(r.json()["ids"][0])
                        if i % 2 == 1 and added:
                            victim = added[-2] if len(added) >= 2 else added[-1]
                            if victim not in removed:
                                r = c.delete(f"/records/{victim}")
                                (removed.append(victim) if r.status_code == 200 else werr.append(f"delete {r.status_code} {r.text[:200]}"))
                        wlat.append(time.perf_counter() - t)
                        i += 1

            wt = threading.Thread(target=writer)
            wt.start()
            lat, errs, wall = run_clients(url, queries, args.clients, args.requests, args.max_seconds, args.k, stop)
            wt.join(120)
            key = f"http_{args.clients}_clients_with_writer"
            results[key] = stats(lat, wall)
            results[key]["writes"] = {"added": len(added), "removed": len(removed), "write_p50_ms": float(np.median(wlat) * 1000) if wlat else None}
            all_errors["with_writer"] = errs + werr

            # No lost writes.
            with httpx.Client(base_url=url) as c:
                count = c.get("/healthz").json()["records"]
                present = {r["id"] for r in c.get("/records", params={"label": "written", "limit": 500}).json()["records"]}
            expected = set(added) - set(removed)
            lost_ok = count == n0 + len(expected) and present == expected
        finally:
            server.should_exit = True
            th.join(10)

    base = results["library_sequential"]
    print(f"\nserver load test on loopback: memory {n0} records, k={args.k}, {args.clients} clients, "
          f"{args.requests} requests per phase ({platform.processor() or platform.machine()})")
    print(f"{'phase':<34}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'p50 / library':>15}")
    for name, r in results.items():
        print(f"{name:<34}{r['n']:>6}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['rps']:>8.1f}{r['p50_ms'] / base['p50_ms']:>14.2f}x")
    w = results[key]["writes"]
    n_err = sum(len(v) for v in all_errors.values())
    print(f"writer: {w['added']} adds, {w['removed']} removes (p50 {w['write_p50_ms']:.0f} ms per add+remove step); "
          f"errors: {n_err}; writes all present and removals all gone: {lost_ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "memory_records": n0, "results": results,
                                    "errors": all_errors, "no_lost_writes": lost_ok}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if n_err or not lost_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
