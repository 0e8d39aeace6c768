"""What this CPU can do, detected at run time (never assumed).

Machines of the same kind differ: one has AVX-512 with BF16 (where a bfloat16
matrix product runs ~2.4x faster than float32), another AVX2 only (where it
runs ~3x slower). Kernels consult `features()`; every benchmark prints
`summary()`.

>>> sorted(features()) == sorted(FLAGS)
True
"""

from __future__ import annotations

import functools
import os
import platform

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: fall back to what torch's dispatcher reports
        try:
            import torch

            cap = torch.backends.cpu.get_cpu_capability().lower()
            flags = {"avx2", "fma"} if cap.startswith("avx") else set()
            if cap == "avx512":
                flags.add("avx512f")
        except Exception:
            pass
    return model, flags


def features() -> dict[str, bool]:
    """The instruction-set extensions kernels care about: name -> present."""
    flags = _cpuinfo()[1]
    return {f: f in flags for f in FLAGS}


def native_bf16() -> bool:
    """True if bfloat16 matrix products run in hardware (AVX-512 BF16 or AMX), so they beat float32.

    ``VISMEM_BF16=0`` or ``=1`` overrides the detection (for measurements).
    """
    forced = os.environ.get("VISMEM_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    f = features()
    return f["avx512_bf16"] or f["amx_bf16"]


def summary() -> str:
    """One line for benchmark output: model, cores, and the flags above that are present."""
    model, _ = _cpuinfo()
    present = [f for f, on in features().items() if on]
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"
