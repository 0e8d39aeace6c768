"""A content-addressed embedding cache, so evaluations never re-embed an image.

Vectors are keyed by (encoder fingerprint, SHA-256 of the image bytes) and kept
in ``$VISMEM_CACHE_DIR/embeddings/<fingerprint>/*.npz`` shards (default
``~/.cache/visual-memory``). Any subset of a dataset reuses what an earlier run
embedded. Shards are written atomically; concurrent processes at worst embed
the same image twice.

The key is the image's SHA-256, which is also a record's default id, so
`Memory.forget` can `purge` a forgotten image's vectors (under every encoder)
from the cache of the user who runs it.
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
        self.dir = cache_root(root) / fingerprint
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
        """(found mask, vectors for the found keys in order).

        A shard that vanished since it was indexed (a `purge` rewrote it) is a miss.
        """
        found = np.array([k in self._index for k in keys], dtype=bool)
        vecs = []
        for j, k in enumerate(keys):
            if found[j]:
                shard, i = self._index[k]
                if shard not in self._shards:
                    try:
                        with np.load(shard) as z:
                            self._shards[shard] = z["vectors"]
                    except (OSError, ValueError, KeyError):
                        self._shards[shard] = None
                if self._shards[shard] is None:
                    found[j] = False
                else:
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


def cache_root(root: Optional[Path] = None) -> Path:
    """The folder holding one sub-folder of shards per encoder fingerprint."""
    return Path(root) if root is not None else cache_dir() / "embeddings"


def purge(keys: Sequence[str], *, root: Optional[Path] = None) -> dict:
    """Remove every cached vector stored under ``keys`` (under every encoder fingerprint).

    Each shard holding a key is rewritten without it (a new shard, then the old
    one deleted), so no file keeps the key or its vector; other processes that
    indexed the old shard see a cache miss.

    Returns
    -------
    dict
        ``dir`` (the cache root), ``entries_removed``, ``shards_rewritten``,
        ``new_shards`` (paths relative to ``dir`` of the shards written in their place).
    """
    base = cache_root(root)
    want = set(keys)
    removed = rewritten = 0
    new_shards = []
    for shard in sorted(base.glob("*/*.npz")) if want and base.is_dir() else []:
        if shard.name.endswith(".tmp.npz"):
            continue
        try:
            with np.load(shard) as z:
                shard_keys = z["keys"].tolist()
                drop = np.array([k in want for k in shard_keys], dtype=bool)
                if not drop.any():
                    continue
                vectors = z["vectors"][~drop]
        except Exception:  # a damaged shard: it is unreadable anyway, so erase it whole
            shard.unlink(missing_ok=True)
            rewritten += 1
            continue
        kept = [k for k, d in zip(shard_keys, drop.tolist()) if not d]
        if kept:
            new = shard.with_name(f"{uuid.uuid4().hex}.npz")
            tmp = new.with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(kept), vectors=vectors)
            os.replace(tmp, new)
            new_shards.append(new.relative_to(base).as_posix())
        shard.unlink()
        removed += int(drop.sum())
        rewritten += 1
    return {"dir": str(base), "entries_removed": removed, "shards_rewritten": rewritten, "new_shards": new_shards}


def holding(keys: Sequence[str], *, root: Optional[Path] = None) -> list[str]:
    """Shards (relative to the cache root) whose key list holds any of ``keys`` (reads key lists only)."""
    base = cache_root(root)
    want = set(keys)
    out = []
    for shard in sorted(base.glob("*/*.npz")) if want and base.is_dir() else []:
        try:
            with np.load(shard) as z:
                if want.intersection(z["keys"].tolist()):
                    out.append(shard.relative_to(base).as_posix())
        except Exception:
            continue  # unreadable: holds nothing anyone can read back
    return out


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
