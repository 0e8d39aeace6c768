"""One `Memory` per server process, shared safely between request threads.

`Memory` is not thread-safe: a mutation updates the store and several in-RAM
arrays one after another. The server therefore guards it with a
readers-writer lock: any number of classify/browse requests run together,
a mutation runs alone, and a reader sees the memory either wholly before or
wholly after a mutation, never half-way.

Another process's `forget` (or `optimize` with cleanup) deletes old versions:
every request first checks the memory's erasure marker (one small read) and,
when it changed, moves the memory to the newest version under the write lock
before reading, so no request started after a forget returned sees the
forgotten records, and none reads files that are gone (a read already running
when they go falls back to the newest version: `Store.read_table`). The expensive part of a classify,
embedding the uploaded image, happens *outside* the lock, so readers queue
behind a writer only for the search itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from ..errors import UnknownIdError
from ..images import load_image
from ..memory import Memory

RECENT_QUERIES = 256  # embeddings of recently classified uploads, by SHA-256, for edit previews


class RWLock:
    """Many readers or one writer. A waiting writer stops new readers from
    entering, so a steady stream of classify requests cannot starve edits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class MemoryService:
    """The served memory plus its lock.

    Parameters
    ----------
    memory : Memory
    refresh_every : float, default 1.0
        Seconds between checks for versions committed by *other* processes
        (e.g. `vismem add` while the server runs); a changed version is
        loaded under the write lock before the next read.
    """

    def __init__(self, memory: Memory, *, refresh_every: float = 1.0) -> None:
        self.memory = memory
        memory.auto_follow_erasures = False  # moved here, under the write lock, never inside a shared read
        self.lock = RWLock()
        self._refresh_every = refresh_every
        self._checked = time.monotonic()
        self._check_mutex = threading.Lock()
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._recent_mutex = threading.Lock()

    def _follow_erasures(self) -> None:
        if self.memory.erased_since_loaded():
            with self.lock.write():
                self.memory.follow_erasures()

    def _maybe_refresh(self) -> None:
        # The check itself touches the shared Lance dataset object, which must
        # not be used while a write moves it (pylance raises "Already mutably
        # borrowed"), so it runs under the write lock: once per interval,
        # by whichever request first notices the interval has passed.
        with self._check_mutex:
            now = time.monotonic()
            if now - self._checked < self._refresh_every:
                return
            self._checked = now
        with self.lock.write():
            mem = self.memory
            if mem.latest_version() != mem.version:
                mem.refresh()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Memory]:
        self._follow_erasures()
        self._maybe_refresh()
        with self.lock.read():
            yield self.memory

    @contextlib.contextmanager
    def writing(self) -> Iterator[Memory]:
        with self.lock.write():
            yield self.memory

    def embed(self, data: bytes):
        """Decode and embed one uploaded image, outside any lock.

        Returns
        -------
        vector : float32 array of shape (1, dim)
        loaded : LoadedImage (for the content hash and a thumbnail)
        """
        loaded = load_image(data)
        vec = np.asarray(self.memory.encoder.embed(loaded.image), np.float32)
        with self._recent_mutex:  # bounded: the oldest goes first
            self._recent[loaded.sha256] = vec[0]
            self._recent.move_to_end(loaded.sha256)
            while len(self._recent) > RECENT_QUERIES:
                self._recent.popitem(last=False)
        return vec, loaded

    def forget_recent(self) -> None:
        """Drop every remembered upload embedding (after a forget: one of them may be the forgotten image's)."""
        with self._recent_mutex:
            self._recent.clear()

    def recent_queries(self, hashes: Sequence[str]) -> np.ndarray:
        """Embeddings (n, dim) of uploads this server embedded recently, by their SHA-256 (edit previews)."""
        with self._recent_mutex:
            missing = [h for h in hashes if h not in self._recent]
            if missing:
                raise UnknownIdError(f"{len(missing)} probe image(s) were not classified by this server recently "
                                     f"(e.g. sha256 {missing[0][:12]}...): classify them first")
            return np.stack([self._recent[h] for h in hashes])
