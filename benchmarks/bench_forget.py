"""Cost of `forget` and of its verification scan, on local disk and on S3 (moto).

A vectors-only memory of N records of d=1280 (EfficientNet-Lite0's width,
and its sparsity: 41% of the floats exactly zero, as measured on its CIFAR-10
embeddings; the old scan keyed vectors by zero words and slowed to a crawl),
added in commits of 1,024 (as `vismem add` commits a folder), each record with
its own source path; then 300 random records are forgotten. Two id styles:
``sha256`` (content hashes, the default id) and ``prefixed`` (caller ids
such as ``photos/2024/IMG_0000123.jpg`` that share long prefixes, where the
old scan degenerated).

Reported per (N, ids): the whole forget, and the scan kernel's throughput on
the memory's own files after the forget (same needles, same bytes):

- ``window``: `erasure._WindowFilter` (this code: one vectorised pass per word
  width, one set lookup per (offset, length) group);
- ``window_8a802f1``: the filter as it was before (frozen copy below),
  measured on at most ``--old-bytes`` of the files;
- ``find``: one ``bytes.find`` pass per needle (the naive baseline), on
  at most ``--old-bytes``.

``--s3`` also times the same forget on an ``s3://`` memory served by
``moto_server`` on 127.0.0.1 against the same memory on local disk.

    python benchmarks/bench_forget.py --sizes 3000 100000 --s3

Writes benchmarks/results/forget.json. Run it with another checkout's
``PYTHONPATH`` (e.g. main's) for the whole forget before a change: the
memory-building and forget calls use only the public API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import visual_memory as vm
from visual_memory import erasure

D = 1280


def cpu_flags() -> dict:
    """CPU model and SIMD flags (`visual_memory.cpu` where this checkout has it)."""
    try:
        from visual_memory import cpu

        return {"summary": cpu.summary(), "features": cpu.features()}
    except ImportError:  # an older checkout (the "before" run)
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        return {"summary": platform.processor() + " " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))}


class OldWindowFilter:
    """The scan filter as of commit 8a802f1 (baseline): one list entry per (needle, offset) per key."""

    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, needles):
        self.keys = {}
        self.short = any(len(n) < 15 for n in needles)
        for n in needles:
            for o in (range(8) if len(n) >= 15 else [len(n) - 8]):
                self.keys.setdefault(int(np.frombuffer(n[o:o + 8], dtype="<u8")[0]), []).append((n, o))
        self.bits = int(min(26, max(16, np.ceil(np.log2(max(1, len(self.keys)))) + 8)))
        self.bitmap = np.zeros(1 << self.bits, dtype=bool)
        self.bitmap[self._bucket(np.fromiter(self.keys, dtype=np.uint64, count=len(self.keys)))] = True

    def _bucket(self, w):
        return (w * self._GOLDEN) >> np.uint64(64 - self.bits)

    def find(self, buf, found):
        for a in range(8) if self.short else (0,):
            count = (len(buf) - a) // 8
            if count <= 0:
                continue
            words = np.frombuffer(buf, dtype="<u8", count=count, offset=a)
            cand = np.flatnonzero(self.bitmap[self._bucket(words)])
            for j, w in zip(cand.tolist(), words[cand].tolist()):
                for n, o in self.keys.get(w, ()):
                    if a and len(n) >= 15:
                        continue
                    start = a + 8 * j - o
                    if n not in found and start >= 0 and buf[start:start + len(n)] == n:
                        found.add(n)


ZERO_SHARE = 0.41  # exact zeros in EfficientNet-Lite0 embeddings of CIFAR-10 (ReLU6 then pooling), measured


def sparse_unit(n: int, seed: int) -> np.ndarray:
    """Unit vectors as sparse as real embeddings: 41% exact zeros (rectified Gaussians)."""
    g = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    x = np.maximum(g - np.float32(np.quantile(g[:64], ZERO_SHARE)), 0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_ids(n: int, style: str) -> list[str]:
    if style == "sha256":
        return [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(n)]
    return [f"photos/2024/IMG_{i:07d}.jpg" for i in range(n)]  # caller ids sharing a long prefix


def build(uri, n: int, ids: list[str], *, storage_options=None) -> tuple[vm.Memory, np.ndarray]:
    x = sparse_unit(n, seed=n)
    kwargs = {"storage_options": storage_options} if storage_options else {}
    m = vm.create(uri, encoder=None, dim=D, **kwargs)
    for lo in range(0, n, 1024):
        hi = min(n, lo + 1024)
        m.add_embeddings(x[lo:hi], labels=[f"class-{i % 10}" for i in range(lo, hi)], ids=ids[lo:hi])
    return m, x


def kernel_rates(root: Path, needles: list[bytes], old_bytes: int, reps: int = 3) -> dict:
    """Scan throughput of each kernel on the same bytes (best of ``reps``, interleaved: the machine is shared)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    blobs = [f.read_bytes() for f in files]
    sample, size = [], 0
    for b in blobs:  # the slow baselines scan a prefix of the files, up to the budget
        if size >= old_bytes:
            break
        sample.append(b[: old_bytes - size])
        size += len(sample[-1])

    def window(cls, data):
        t = time.perf_counter()
        w, found = cls(needles), set()
        for b in data:
            w.find(b, found)
        return time.perf_counter() - t, found

    def per_needle(data):
        t = time.perf_counter()
        found = {n for b in data for n in needles if n in b}
        return time.perf_counter() - t, found

    total = sum(len(b) for b in blobs)
    best = {"window": [], "window_8a802f1": [], "find": []}
    for _ in range(reps):
        t_new, f_new = window(erasure._WindowFilter, blobs)
        t_old, f_old = window(OldWindowFilter, sample)
        t_find, f_find = per_needle(sample)
        best["window"].append(t_new)
        best["window_8a802f1"].append(t_old)
        best["find"].append(t_find)
    _, f_new_sample = window(erasure._WindowFilter, sample)
    if not (f_new_sample == f_old == f_find):
        raise SystemExit("kernels disagree on what they found")
    out = {"bytes": total, "files": len(files), "needles": len(needles), "sample_bytes": size,
           "window_MBps": round(total / 1e6 / min(best["window"]), 1),
           "window_8a802f1_MBps": round(size / 1e6 / min(best["window_8a802f1"]), 1),
           "find_per_needle_MBps": round(size / 1e6 / min(best["find"]), 1)}
    out["speedup_vs_8a802f1"] = round(out["window_MBps"] / out["window_8a802f1_MBps"], 2)
    out["speedup_vs_find"] = round(out["window_MBps"] / out["find_per_needle_MBps"], 1)
    return out


def forget_once(m: vm.Memory, ids: list[str], x: np.ndarray, n_forget: int) -> dict:
    pick = np.random.default_rng(1).choice(len(ids), n_forget, replace=False)
    gone = [ids[i] for i in pick]
    t = time.perf_counter()
    r = m.forget(ids=gone)
    out = {"forget_s": round(time.perf_counter() - t, 3), "verified": r.verification["ok"],
           "scanned_bytes": r.verification["bytes_scanned"], "scanned_files": r.verification["files_scanned"]}
    out["needles"] = [g.encode() for g in gone] + [x[i].tobytes() for i in pick]
    return out


def run_local(n: int, style: str, root: Path, args) -> dict:
    ids = make_ids(n, style)
    t = time.perf_counter()
    m, x = build(root / f"m{n}{style}", n, ids)
    res = {"n": n, "ids": style, "dim": D, "build_s": round(time.perf_counter() - t, 1), "size_bytes": m._store.size_bytes()}
    f = forget_once(m, ids, x, args.forget)
    needles = f.pop("needles")
    res.update(f)
    if hasattr(erasure, "_WindowFilter") and "passes" in erasure._WindowFilter.__init__.__code__.co_names:
        res["kernel"] = kernel_rates(root / f"m{n}{style}", needles, args.old_bytes)
    shutil.rmtree(root / f"m{n}{style}", ignore_errors=True)
    print(json.dumps(res), file=sys.stderr)
    return res


def run_s3(n: int, root: Path, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from moto_support import MotoServer

    server = MotoServer()
    try:
        server.bucket("bench")
        ids = make_ids(n, "sha256")
        out = {"n": n, "ids": "sha256", "dim": D}
        for where, uri, opts in (("local", root / "s3cmp", None), ("s3", "s3://bench/m", server.options)):
            t = time.perf_counter()
            m, x = build(uri, n, ids, storage_options=opts)
            build_s = time.perf_counter() - t
            f = forget_once(m, ids, x, args.forget)
            f.pop("needles")
            out[where] = {"build_s": round(build_s, 2), **f}
        out["forget_ratio_s3_vs_local"] = round(out["s3"]["forget_s"] / out["local"]["forget_s"], 2)
        print(json.dumps(out), file=sys.stderr)
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 100_000])
    ap.add_argument("--ids", nargs="+", default=["sha256", "prefixed"], choices=["sha256", "prefixed"])
    ap.add_argument("--forget", type=int, default=300)
    ap.add_argument("--old-bytes", type=int, default=32 << 20, help="bytes the slow baselines scan (their MB/s is what counts)")
    ap.add_argument("--s3", action="store_true", help="also compare forget on moto S3 vs local disk (smallest size)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forget.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    cpu = cpu_flags()
    print(f"cpu: {cpu['summary']}; visual_memory from {vm.__file__}")
    results, s3 = [], None
    try:
        for n in args.sizes:
            for style in args.ids:
                results.append(run_local(n, style, root, args))
        if args.s3:
            s3 = run_s3(min(args.sizes), root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'N':>7} {'ids':>9} {'MB':>7} {'forget s':>9} {'scan MB/s':>10} {'8a802f1 MB/s':>13} {'find MB/s':>10} {'x old':>6} {'x find':>7}")
    for r in results:
        k = r.get("kernel", {})
        print(f"{r['n']:>7} {r['ids']:>9} {r['size_bytes'] / 1e6:>7.0f} {r['forget_s']:>9} {k.get('window_MBps', '-'):>10} "
              f"{k.get('window_8a802f1_MBps', '-'):>13} {k.get('find_per_needle_MBps', '-'):>10} "
              f"{k.get('speedup_vs_8a802f1', '-'):>6} {k.get('speedup_vs_find', '-'):>7}")
    if s3:
        print(f"forget of {args.forget} of {s3['n']}: local {s3['local']['forget_s']} s, S3 (moto) {s3['s3']['forget_s']} s "
              f"(x{s3['forget_ratio_s3_vs_local']}); scanned {s3['s3']['scanned_bytes'] / 1e6:.0f} MB in {s3['s3']['scanned_files']} objects")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "visual_memory": vm.__file__, "forget": args.forget,
                                    "results": results, "s3_vs_local": s3}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
