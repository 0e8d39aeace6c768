"""Search structures over the memory's vectors: one protocol, a factory string per backend.

``make_index(spec, dim)`` builds an index from a FAISS-style factory string:
``"Flat"`` is exact search (`ExactIndex`, the default and the reference);
anything else is a FAISS factory index (`FaissIndex`: ``"IVF1024,Flat"``,
``"IVF1024,PQ48np"``, ``"HNSW32"``...); ``"auto"`` lets the memory choose by
its size and a RAM budget (`auto`). Every backend implements `Index`; a
trained approximate index is saved beside the records (`saved`).
"""

from __future__ import annotations

from .base import MAX_K, Index, LocalIndex, as_queries, check_k
from .exact import ExactIndex, drop_self, exact_knn, exact_self_knn
from .auto import AUTO
from .faiss_ann import FaissIndex, build_faiss, min_train_size

EXACT = "Flat"

__all__ = ["AUTO", "EXACT", "MAX_K", "ExactIndex", "FaissIndex", "Index", "LocalIndex", "as_queries", "check_k", "drop_self", "exact_knn",
           "exact_self_knn", "index_from_bytes", "make_index", "min_train_size", "validate_spec"]


def validate_spec(spec: str, dim: int) -> str:
    """Check a factory string at the memory's real dimension; returns it (stripped). ``"auto"`` passes."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index must be a non-empty FAISS factory string such as 'Flat' or 'IVF1024,PQ48np'; got {spec!r}")
    spec = spec.strip()
    if spec == AUTO:
        return spec
    if spec != EXACT:
        build_faiss(spec, dim)
    return spec


def make_index(spec: str, dim: int) -> LocalIndex:
    """An empty index of this kind for ``dim``-d vectors."""
    spec = validate_spec(spec, dim)
    if spec == AUTO:
        raise ValueError("'auto' is resolved by the memory (visual_memory.index.auto.resolve) before an index is made")
    return ExactIndex(dim, spec) if spec == EXACT else FaissIndex(dim, spec)


def index_from_bytes(blob: bytes, dim: int, spec: str) -> LocalIndex:
    """An index of this spec read back from `LocalIndex.to_bytes`."""
    return (ExactIndex if spec == EXACT else FaissIndex).from_bytes(blob, dim, spec)
