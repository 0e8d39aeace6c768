"""Search structures over the memory's vectors: one protocol, a factory string per backend.

``make_index(spec, dim)`` builds an index from a FAISS-style factory string:
``"Flat"`` is exact search (`ExactIndex`, the default and the reference);
anything else is a FAISS factory index (`FaissIndex`: ``"IVF1024,Flat"``,
``"IVF1024,PQ48np"``, ``"HNSW32"``...). Every backend implements `Index`.
"""

from __future__ import annotations

from .base import MAX_K, Index, as_queries, check_k
from .exact import ExactIndex, drop_self, exact_knn, exact_self_knn
from .faiss_ann import FaissIndex, build_faiss

EXACT = "Flat"

__all__ = ["EXACT", "MAX_K", "ExactIndex", "FaissIndex", "Index", "as_queries", "check_k", "drop_self", "exact_knn",
           "exact_self_knn", "make_index", "validate_spec"]


def validate_spec(spec: str, dim: int) -> str:
    """Check a factory string at the memory's real dimension; returns it (stripped)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index must be a non-empty FAISS factory string such as 'Flat' or 'IVF1024,PQ48np'; got {spec!r}")
    spec = spec.strip()
    if spec != EXACT:
        build_faiss(spec, dim)
    return spec


def make_index(spec: str, dim: int) -> Index:
    """An empty index of this kind for ``dim``-d vectors."""
    spec = validate_spec(spec, dim)
    return ExactIndex(dim, spec) if spec == EXACT else FaissIndex(dim, spec)
