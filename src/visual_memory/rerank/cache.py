"""The re-rank cache: a model's answer is paid for once per (query, memory version, model, prompt).

Where: ``<memory>/cache/rerank/`` by default, the memory's directory of
derived data, one small JSON file per answer (``<key[:2]>/<key>.json``,
written atomically). Pass another folder to `VLMReranker(cache=...)`, or
``cache=False`` to turn it off.

The key is the SHA-256 of: the query's content hash, the memory version the
prediction was made against, the backend's provider and model, `PROMPT_VERSION`,
n, the labels-only flag, the query size, and a hash of the shown neighbours'
ids and labels (so two searches that show different neighbours, e.g. with
another k or nprobe, never share an answer). Any edit makes a new memory
version, hence new keys: an answer given before a relabel is never reused
after it.

What an entry holds: the chosen label, the model's rationale, the token
counts and cost of the original call, the model and prompt version, and when.
It holds no record id, no vector, no image, no URL and no API key.

Forget: an entry never names a record (the prompt carries no id, and the
neighbours enter the key only through a one-way hash), and `Memory.forget`
deletes ``<memory>/cache/`` wholesale, re-rank entries included, before its
verification scan. A re-rank still in flight in another process when the
forget runs may write its entry afterwards: it is keyed to the pre-forget
version (so never read again by the new one) and, like every entry, holds no
id, vector or image of the forgotten records. A cache
folder *outside* the memory is not touched by forget; it still holds no id,
but it does keep labels and rationales about past queries: delete it yourself
if that matters.

Only answers that named a candidate are cached; failures are retried next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CACHE_SUBDIR = "rerank"


def cache_key(**fields) -> str:
    """SHA-256 hex of the key fields (sorted JSON, so field order never matters)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RerankCache:
    """A folder of JSON answers keyed by `cache_key`. Thread- and process-safe (atomic renames)."""

    def __init__(self, root: os.PathLike | str) -> None:
        self.root = Path(root)
        self._warned = False

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        try:
            return json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a damaged entry is a miss
            log.warning("re-rank cache entry %s unreadable (%s); asking the model again", key[:12], exc)
            return None

    def put(self, key: str, entry: dict) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(entry, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:  # e.g. a read-only memory directory: caching is best effort
            if not self._warned:
                log.warning("re-rank cache %s not writable (%s); answers will not be cached", self.root, exc)
                self._warned = True

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.is_dir() else 0
