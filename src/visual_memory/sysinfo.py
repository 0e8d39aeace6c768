"""What machine a measurement ran on: CPU model, cores and the SIMD flags that decide kernel speed.

Benchmarks print this with every table (machines of the same kind differ:
AVX-512 with BF16/VNNI on one, AVX2 only on another).

>>> sorted(cpu_summary())
['cores', 'flags', 'model']
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that change which GEMM / distance kernels run.
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve")


def cpu_summary() -> dict:
    """CPU model, usable cores and which of `FLAGS` the CPU has (Linux ``/proc/cpuinfo``; else the model only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": [f for f in FLAGS if f in flags]}


def cpu_line() -> str:
    """One line for a benchmark header: ``CPU: <model>, <n> cores, flags: avx2 fma ...``."""
    c = cpu_summary()
    return f"CPU: {c['model']}, {c['cores']} cores, flags: {' '.join(c['flags']) or '(none of ' + '/'.join(FLAGS[:4]) + '...)'}"
