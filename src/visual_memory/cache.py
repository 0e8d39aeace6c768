"""A content-addressed embedding cache, so evaluations never re-embed an image.

Vectors are keyed by (encoder fingerprint, SHA-256 of the image bytes) and kept
in ``$VISMEM_CACHE_DIR/embeddings/<fingerprint>/*.npz`` shards (default
``~/.cache/visual-memory``). Any subset of a dataset reuses what an earlier run
embedded. Shards are written atomically; concurrent processes at worst embed
the same image twice.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .encoders import Encoder
from .encoders.runtime import cache_dir
from .images import scan_folder


class EmbeddingCache:
    def __init__(self, fingerprint: str, root: Optional[Path] = None) -> None:
        self.dir = (root or cache_dir() / "embeddings") / fingerprint
        self._index: dict[str, tuple[Path, int]] = {}
        self._shards: dict[Path, np.ndarray] = {}
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("*.npz")):
                try:
                    with np.load(shard) as z:
                        for i, key in enumerate(z["keys"].tolist()):
                            self._index[key] = (shard, i)
                except Exception:
                    continue  # a damaged shard is just a cache miss

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors for the found keys in order)."""
        found = np.array([k in self._index for k in keys], dtype=bool)
        vecs = []
        for k, ok in zip(keys, found):
            if ok:
                shard, i = self._index[k]
                if shard not in self._shards:
                    with np.load(shard) as z:
                        self._shards[shard] = z["vectors"]
                vecs.append(self._shards[shard][i])
        return found, (np.stack(vecs) if vecs else np.zeros((0, 0), np.float32))

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = self.dir / f"{uuid.uuid4().hex}.npz"
        tmp = shard.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(keys)), vectors=np.asarray(vectors, np.float32))
        os.replace(tmp, shard)
        self._shards[shard] = np.asarray(vectors, np.float32)
        for i, k in enumerate(keys):
            self._index[k] = (shard, i)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def embed_cached(encoder: Encoder, items: Sequence, keys: Sequence[str], *, progress: bool | str = False) -> np.ndarray:
    """Embed ``items`` (any image inputs) through the cache under their content ``keys``.

    Returns (n, dim) float32, rows in input order. Misses are embedded and saved
    chunk by chunk, so an interrupted run keeps what it embedded.
    """
    from .progress import progress_bar

    cache = EmbeddingCache(encoder.spec.fingerprint)
    found, cached = cache.get(keys)
    out = np.zeros((len(keys), encoder.dim), dtype=np.float32)
    if found.any():
        out[found] = cached
    missing = np.flatnonzero(~found)
    chunk = 2048
    with progress_bar(progress if len(missing) else False, total=len(missing), unit="img") as bar:
        for start in range(0, len(missing), chunk):
            sel = missing[start : start + chunk]
            fresh = encoder.embed([items[i] for i in sel])
            out[sel] = fresh
            cache.put([keys[i] for i in sel], fresh)
            bar.advance(len(sel))
    return out


def embed_paths(encoder: Encoder, paths: Sequence[Path], *, progress: bool | str = False) -> np.ndarray:
    """Embed image files through the cache: (n, dim) float32, rows in input order."""
    paths = [Path(p) for p in paths]
    return embed_cached(encoder, paths, [file_sha256(p) for p in paths], progress=progress)


def select_per_class(paths: Sequence[Path], labels: Sequence[str], per_class: Optional[int]) -> tuple[list[Path], list[str]]:
    """The first ``per_class`` images of each class (all if None), order kept."""
    if per_class is None:
        return list(paths), list(labels)
    seen: dict[str, int] = {}
    out_p, out_l = [], []
    for p, lab in zip(paths, labels):
        if seen.get(lab, 0) < per_class:
            seen[lab] = seen.get(lab, 0) + 1
            out_p.append(p)
            out_l.append(lab)
    return out_p, out_l


def embed_folder(
    encoder: Encoder, root, *, per_class: Optional[int] = None, progress: bool | str = False
) -> tuple[np.ndarray, list[str], list[Path]]:
    """Embed an ImageFolder (optionally its first ``per_class`` images per class) through the cache."""
    paths, labels = select_per_class(*scan_folder(root), per_class)
    return embed_paths(encoder, paths, progress=progress), labels, paths
