"""``index="auto"``: pick the index by the memory's size and a RAM budget.

The rules follow autofaiss's: exact search while it is cheap; an IVF over
the full vectors while they fit the budget (candidates then carry exact
distances); IVF-PQ beyond, with PQ codes of at most 64 bytes (+ 8 for the
row id), whose candidates the memory re-ranks with the stored vectors.
HNSW is never chosen: it cannot remove records, and a memory must forget.

>>> resolve(5_000, 384)
'Flat'
>>> resolve(200_000, 384, budget=8 << 30)
'IVF2048,Flat'
>>> resolve(10_000_000, 384, budget=4 << 30)
'IVF16384,PQ48np'
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Union

AUTO = "auto"
EXACT_BELOW = 10_000  # records; below this exact search takes < 2 ms per query
MAX_PQ_BYTES = 64
BUDGET_SHARE = 0.5  # default budget: this share of the machine's RAM


def default_budget() -> int:
    try:
        return int(BUDGET_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: Union[str, int, None]) -> Optional[int]:
    """``"4GB"`` -> 4_000_000_000, ``"512MiB"`` -> 536_870_912; an int passes through; None stays None.

    >>> parse_bytes("4GB"), parse_bytes("1.5 GiB"), parse_bytes(1024)
    (4000000000, 1610612736, 1024)
    """
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        if text is not None and text <= 0:
            raise ValueError(f"a memory budget must be positive; got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (examples: 4GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4 sqrt(n), trainable from n (39 per list)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(4, round(math.log2(target)))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return min(nlist, 65_536)


def pq_bytes(dim: int) -> int:
    """PQ sub-quantisers: dim/8 (8 dims each) capped at `MAX_PQ_BYTES`, dividing ``dim``."""
    m = min(MAX_PQ_BYTES, max(1, dim // 8))
    while dim % m:
        m -= 1
    return m


def resolve(n: int, dim: int, *, budget: Optional[int] = None) -> str:
    """The factory string ``auto`` means for ``n`` records of ``dim`` floats within ``budget`` bytes of RAM."""
    if n < EXACT_BELOW:
        return "Flat"
    budget = default_budget() if budget is None else budget
    nlist = nlist_for(n)
    if n * (4 * dim + 8) <= budget:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{pq_bytes(dim)}np"
