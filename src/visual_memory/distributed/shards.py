"""Sharded search: one Ray actor per shard, each an `Index` over its rows; exact top-k merge on the driver.

`visual_memory.open(path, ray=ADDRESS, shards=N)` gives a `Memory` whose
`MemoryState` is a `ShardedState`: the driver keeps the row table (ids,
label codes, weights, row addresses: what votes) and never holds a vector;
its index is a `ShardedIndex` that implements the `Index` protocol by
forwarding each verb to the shard that holds the rows:

==========  ==============================================================
load        whole Lance fragments are given to the least-loaded shard; each
            shard reads its fragments' vectors from the store itself
add         new rows go to the shard with the fewest live rows
remove      the owning shards tombstone the rows
erase       the owning shards overwrite them in RAM and then scan their
            serialised index for the vectors' bytes (the report joins the
            forget receipt's check of every file under the memory)
search      queries go to every shard once (``ray.put``); each returns its
            top-k; the driver merges them exactly (similarity descending,
            ties by row) and the memory votes once, with the same vote code
==========  ==============================================================

Relabel and reweight change only the row table: labels and weights are read
where the vote runs, on the driver, so they take effect at once on every shard.

An approximate spec (``"IVF256,PQ48np"``) is trained **once**, on a sample of
the stored vectors drawn by the driver; every shard starts from a copy of the
trained, empty index (`LocalIndex.to_bytes`) and adds its fragments in parallel.
It is then saved with the memory like a local index (`visual_memory.index.saved`:
one part per shard, the row table and the row -> shard map), so the next
``open(path, ray=..., shards=N)`` with the same N restores each shard from its
part instead of retraining and re-reading every vector. An exact sharded
memory saves nothing: its shards read their vectors in parallel.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from ..errors import ErasureError, VisualMemoryError
from ..index import Index, index_from_bytes, make_index, min_train_size
from ..index.base import check_k, checked, merge_topk
from ..index import saved as index_saved
from ..memory.state import MemoryState
from ..rows import RowTable
from ..store import vectors_from_column
from .cluster import ACTOR_CPUS, ensure

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 65_536  # vectors the driver draws to train an approximate index once
START_TIMEOUT_S = 120.0  # shard actors that cannot be placed by then (no free CPUs) are an error, not a hang


def _kill(actors: list) -> None:
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already dead, or Ray already shut down
            pass


class Shard:
    """One shard (a Ray actor): an `Index` over some rows, and their Lance row addresses.

    Local rows 0..n-1 are the order rows were given to this shard; the driver
    maps them to the memory's rows.
    """

    def __init__(self, *, shard: int, uri: str, dim: int, spec: str, trained: Optional[bytes] = None,
                 storage_options: Optional[dict] = None) -> None:
        self.shard, self.uri, self.dim, self.spec = shard, uri, dim, spec
        self.storage_options = storage_options
        self.index = index_from_bytes(trained, dim, spec) if trained is not None else make_index(spec, dim)
        self.addresses = np.zeros(0, np.uint64)

    def where(self) -> dict:
        import ray

        return {"shard": self.shard, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def load(self, chunks: list[tuple[int, int, int]], version: int) -> np.ndarray:
        """Add the live rows ``start .. start + count - 1`` of each ``(fragment id, start, count)``, in order.

        Reads the store at ``version``; returns the rows' Lance addresses (the driver checks them).
        """
        import lance

        if not chunks:
            return np.zeros(0, np.uint64)
        ds = lance.dataset(self.uri, version=version, storage_options=self.storage_options)
        out = []
        for fid, start, count in chunks:
            scan = ds.scanner(columns=["vector"], with_row_address=True, fragments=[ds.get_fragment(int(fid))],
                              offset=int(start), limit=int(count), batch_size=65536)
            for batch in scan.to_batches():
                self.index.add(vectors_from_column(batch.column("vector"), self.dim))
                out.append(batch.column("_rowaddr").to_numpy().astype(np.uint64))
        addrs = np.concatenate(out) if out else np.zeros(0, np.uint64)
        self.addresses = np.concatenate([self.addresses, addrs])
        return addrs

    def codes(self, vectors: np.ndarray) -> list[bytes]:
        """What a compressed index stores for these vectors ([] for one that stores the vectors)."""
        ix = self.index
        return ix.codes(vectors) if getattr(ix, "compressed", False) else []

    def live_codes(self, codes: list[bytes]) -> set[bytes]:
        live = getattr(self.index, "live_codes_among", None)
        return live(codes) if live is not None else set()

    def dump(self) -> bytes:
        """This shard's index and row addresses as bytes (what the memory saves)."""
        blob = self.index.to_bytes()
        return len(blob).to_bytes(8, "little") + blob + self.addresses.tobytes()

    def restore(self, data: bytes) -> int:
        """Take back what `dump` gave; returns the rows restored."""
        n = int.from_bytes(data[:8], "little")
        self.index = index_from_bytes(data[8 : 8 + n], self.dim, self.spec)
        self.addresses = np.frombuffer(data[8 + n :], np.uint64).copy()
        return self.index.ntotal

    def add(self, vectors: np.ndarray, addresses: np.ndarray) -> int:
        """Append rows; returns the local row of the first."""
        first = self.index.ntotal
        self.index.add(vectors)
        self.addresses = np.concatenate([self.addresses, np.asarray(addresses, np.uint64)])
        return first

    def remove(self, rows: np.ndarray) -> None:
        self.index.remove(rows)

    def erase(self, rows: np.ndarray, needles: Optional[list[bytes]] = None) -> dict:
        """Erase rows, then look for their vectors' bytes (``needles``, default: as this index holds them)."""
        rows = np.asarray(rows, np.int64)
        if needles is None:
            held = self.index.vectors(rows)
            needles = [] if held is None else [v.tobytes() for v in held]
        keep = self.index.erase(rows)
        if keep is not None:
            self.addresses = self.addresses[keep]
        else:
            self.addresses[rows] = np.iinfo(np.uint64).max
        report = self.scan(needles)
        report.update(erased=len(rows), keep=keep)
        return report

    def scan(self, needles: list[bytes]) -> dict:
        """How many of these byte strings the shard's index holds.

        An exact index is checked row by row in RAM (a vector can only sit
        in a row); any other is serialised as it saves itself and searched.
        """
        matrix = getattr(self.index, "matrix", None)
        if matrix is not None:
            m = matrix()
            found = 0
            for n in needles:
                v = np.frombuffer(n, np.float32)
                cand = np.flatnonzero(m[:, 0] == v[0]) if len(v) == self.dim else []
                found += bool(len(cand)) and bool((m[cand] == v).all(axis=1).any())
            return {**self.where(), "bytes_scanned": int(m.nbytes), "found": int(found)}
        blob = self.index.to_bytes()
        return {**self.where(), "bytes_scanned": len(blob), "found": sum(1 for n in needles if n in blob)}

    def compact(self) -> np.ndarray:
        keep = self.index.compact()
        self.addresses = self.addresses[keep]
        return keep

    def search(self, queries: np.ndarray, k: int, params: Optional[dict]) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, params=params)

    def stats(self) -> dict:
        return {**self.where(), **self.index.stats()}


def plan_chunks(fragments: list[tuple[int, int]], sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Split new rows into runs that even out the shards.

    Parameters
    ----------
    fragments : list of (fragment id, live rows), in scan order
    sizes : live rows each shard holds now

    Returns
    -------
    list of (shard, fragment id, start, count)
        Runs in scan order; each shard's runs are contiguous in it, so the
        memory's rows stay in table order.

    Examples
    --------
    >>> plan_chunks([(0, 10)], [0, 0])
    [(0, 0, 0, 5), (1, 0, 5, 5)]
    >>> plan_chunks([(3, 4), (4, 4)], [6, 0])
    [(1, 3, 0, 4), (1, 4, 0, 3), (0, 4, 3, 1)]
    """
    new = sum(n for _, n in fragments)
    if not new:
        return []
    target = (sum(sizes) + new) / len(sizes)
    deficit = np.maximum(0.0, target - np.asarray(sizes, np.float64))
    quota = np.floor(deficit * new / deficit.sum()).astype(np.int64)
    for s in np.argsort(-(deficit * new / deficit.sum() - quota), kind="stable")[: new - int(quota.sum())]:
        quota[s] += 1
    shard_order = [int(s) for s in np.argsort(-deficit, kind="stable") if quota[s] > 0]
    out: list[tuple[int, int, int, int]] = []
    it = iter(shard_order)
    shard, left = next(it), 0
    left = int(quota[shard])
    for fid, n in fragments:
        start = 0
        while start < n:
            if left == 0:
                shard = next(it)
                left = int(quota[shard])
            take = min(left, n - start)
            out.append((shard, fid, start, take))
            start += take
            left -= take
    return out


class ShardedIndex(Index):
    """The `Index` protocol over shard actors; rows are the memory's rows.

    Parameters
    ----------
    shards : list of Ray actor handles of `Shard`
    dim : int
    spec : str
    """

    def __init__(self, shards: list, dim: int, spec: str) -> None:
        import weakref

        self.shards, self.dim, self.spec = shards, int(dim), spec
        self._reset()
        self.last_erase: list[dict] = []
        # The actors hold CPUs on the cluster: free them when this index goes (or on `close`).
        self._finalizer = weakref.finalize(self, _kill, list(shards))

    def close(self) -> None:
        """Stop the shard actors (the index cannot search after this)."""
        self._finalizer()
        self.shards = []

    def _reset(self) -> None:
        self._owner = np.zeros(0, np.int32)  # shard of each row
        self._local = np.zeros(0, np.int64)  # row inside its shard
        self._global = [np.zeros(0, np.int64) for _ in self.shards]  # shard's local row -> memory row
        self._alive = np.zeros(0, bool)

    # -- size ----------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return len(self._owner)

    @property
    def n_alive(self) -> int:
        return int(self._alive.sum())

    @property
    def is_exact(self) -> bool:
        return self.spec == "Flat"

    def shard_sizes(self) -> list[int]:
        """Live rows per shard."""
        return np.bincount(self._owner[self._alive], minlength=len(self.shards)).tolist()

    # -- placing rows --------------------------------------------------------------

    def _place(self, shard: int, first_local: int, n: int) -> None:
        start = self.ntotal
        self._owner = np.concatenate([self._owner, np.full(n, shard, np.int32)])
        self._local = np.concatenate([self._local, np.arange(first_local, first_local + n, dtype=np.int64)])
        self._global[shard] = np.concatenate([self._global[shard], np.arange(start, start + n, dtype=np.int64)])
        self._alive = np.concatenate([self._alive, np.ones(n, bool)])

    def load_chunks(self, groups: list[tuple[list[tuple[int, int, int]], np.ndarray]], version: int) -> None:
        """Each shard reads its chunks of fragments in parallel. ``groups[s]`` = (chunks, expected addresses)."""
        import ray

        refs = [sh.load.remote(chunks, version) for sh, (chunks, _) in zip(self.shards, groups)]
        got = ray.get(refs)
        for s, (addrs, (_, expected)) in enumerate(zip(got, groups)):
            if len(addrs) != len(expected) or not np.array_equal(addrs, expected):
                raise VisualMemoryError(f"shard {s} loaded {len(addrs)} rows that disagree with the row table's "
                                        f"{len(expected)} (the records changed while it loaded); reopen the memory")

    def map_bytes(self) -> bytes:
        """Which shard and local row holds each memory row (saved with the shards)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, owner=self._owner, local=self._local, alive=self._alive,
                 **{f"global_{s}": g for s, g in enumerate(self._global)})
        return buf.getvalue()

    def restore_map(self, data: bytes) -> None:
        import io

        with np.load(io.BytesIO(data)) as z:
            self._owner, self._local, self._alive = z["owner"], z["local"], z["alive"].astype(bool)
            self._global = [z[f"global_{s}"] for s in range(len(self.shards))]

    def place_loaded(self, shard: int, n: int, first_local: int) -> None:
        self._place(shard, first_local, n)

    def add(self, vectors: np.ndarray, addresses: Optional[np.ndarray] = None) -> None:
        import ray

        v = checked(vectors, self.dim, "vectors")
        if not len(v):
            return
        shard = int(np.argmin(self.shard_sizes()))
        addrs = np.full(len(v), np.iinfo(np.uint64).max, np.uint64) if addresses is None else addresses
        first = ray.get(self.shards[shard].add.remote(v, addrs))
        self._place(shard, first, len(v))

    def _by_shard(self, rows: np.ndarray):
        rows = np.unique(np.asarray(rows, np.int64))
        for s in range(len(self.shards)):
            mine = rows[self._owner[rows] == s]
            if len(mine):
                yield s, mine

    def remove(self, rows: np.ndarray) -> None:
        import ray

        ray.get([self.shards[s].remove.remote(self._local[mine]) for s, mine in self._by_shard(rows)])
        self._alive[np.asarray(rows, np.int64)] = False

    def erase(self, rows: np.ndarray, *, needles: Optional[dict[int, bytes]] = None) -> Optional[np.ndarray]:
        """`Index.erase` on the owning shards; ``needles`` (row -> the stored vector's bytes) are what they scan for."""
        import ray

        parts = list(self._by_shard(rows))
        reports = ray.get([self.shards[s].erase.remote(
            self._local[mine], None if needles is None else [needles[int(r)] for r in mine.tolist() if int(r) in needles])
            for s, mine in parts])
        self._alive[np.asarray(rows, np.int64)] = False
        self.last_erase = [{k: v for k, v in r.items() if k != "keep"} for r in reports]
        found = [r for r in self.last_erase if r["found"]]
        compacted = {s: r["keep"] for (s, _), r in zip(parts, reports) if r["keep"] is not None}
        keep = self._renumber(compacted) if compacted else None
        if found:
            raise ErasureError(f"shard(s) {[r['shard'] for r in found]} still hold bytes of erased vectors after "
                               "erasing them; the records no longer vote")
        return keep

    def _renumber(self, compacted: dict[int, np.ndarray]) -> np.ndarray:
        """Rows of shards that compacted are dropped where dead; returns the memory rows kept (old positions)."""
        kept = np.ones(self.ntotal, bool)
        for s, local_keep in compacted.items():
            mine = self._global[s]
            drop = np.ones(len(mine), bool)
            drop[local_keep] = False
            kept[mine[drop]] = False
            self._global[s] = mine[local_keep]
        keep = np.flatnonzero(kept)
        new_of_old = np.full(self.ntotal, -1, np.int64)
        new_of_old[keep] = np.arange(len(keep))
        owner, alive = self._owner[keep], self._alive[keep]
        local = np.zeros(len(keep), np.int64)
        for s in range(len(self.shards)):
            g = new_of_old[self._global[s]]
            self._global[s] = g
            local[g] = np.arange(len(g))
        self._owner, self._local, self._alive = owner, local, alive
        return keep

    def compact(self) -> np.ndarray:
        import ray

        keeps = ray.get([sh.compact.remote() for sh in self.shards])
        return self._renumber(dict(enumerate(keeps)))

    # -- searching -----------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        import ray

        q = checked(queries, self.dim, "queries")
        k = check_k(k)
        ref = ray.put(q)
        results = ray.get([sh.search.remote(ref, k, params) for sh in self.shards])
        sims, rows = [], []
        for s, (sm, rw) in enumerate(results):
            table = self._global[s]
            rows.append(np.where(rw >= 0, table[np.clip(rw, 0, max(len(table) - 1, 0))] if len(table) else -1, -1))
            sims.append(sm)
        return merge_topk(sims, rows, k)

    def scan(self, needles: list[bytes]) -> list[dict]:
        """Each shard's count of these byte strings in its serialised index (a check that forget left none)."""
        import ray

        return ray.get([sh.scan.remote(list(needles)) for sh in self.shards])

    def stats(self) -> dict[str, Any]:
        import ray

        shard_stats = ray.get([sh.stats.remote() for sh in self.shards])
        return {**super().stats(), "shards": shard_stats, "last_erase": self.last_erase}


class ShardedState(MemoryState):
    """A `MemoryState` whose index is spread over Ray actors; the driver never loads a vector.

    Parameters
    ----------
    store : Store
    shards : int
    spec : str, optional
        Index factory string per shard (default: the manifest's).
    """

    def __init__(self, store, *, shards: int, spec: Optional[str] = None, train_sample: int = TRAIN_SAMPLE) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer; got {shards!r}")
        self.n_shards = shards
        self.store = store
        self.shard_spec = spec or self.target_spec()  # `auto` resolved by the memory's size
        self.train_sample = int(train_sample)
        make_index(self.shard_spec, store.dim)  # validates the spec before any actor starts
        if spec is None and store.count() < min_train_size(self.shard_spec):
            self.shard_spec = "Flat"  # as in one process: exact until there are enough records to train
        super().__init__(store)

    def _start_shards(self, trained: Optional[bytes]) -> list:
        import ray

        actor = ray.remote(num_cpus=ACTOR_CPUS, max_restarts=0)(Shard)
        uri = self.store.dataset.uri
        trained_ref = ray.put(trained) if trained is not None else None
        actors = [actor.options(scheduling_strategy="SPREAD").remote(shard=s, uri=uri, dim=self.store.dim,
                                                                    spec=self.shard_spec, trained=trained_ref,
                                                                    storage_options=self.store.storage.lance_options)
                  for s in range(self.n_shards)]
        try:
            ray.get([a.where.remote() for a in actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            _kill(actors)
            free = ray.available_resources().get("CPU", 0.0)
            raise VisualMemoryError(
                f"{self.n_shards} shard actor(s) of {ACTOR_CPUS} CPU each did not start within {START_TIMEOUT_S:.0f} s "
                f"(the cluster has {free:g} CPU free): close memories you no longer use (`Memory.close()`), "
                "or give the cluster more CPUs") from None
        return actors

    def _train(self) -> Optional[bytes]:
        """Train an approximate index once, on a sample of stored vectors; its bytes (None for exact)."""
        ix = make_index(self.shard_spec, self.store.dim)
        if self.shard_spec == "Flat" or ix.is_trained:
            return None
        n = self.store.count()
        if n == 0:
            raise VisualMemoryError(f"{self.store.path}: index {self.shard_spec!r} needs training vectors; the memory is empty")
        ix.train(self._training_sample(self.shard_spec, size=self.train_sample))
        return ix.to_bytes()

    @property
    def saves_index(self) -> bool:
        """An approximate sharded index is saved (each shard's part); an exact one reloads its vectors in parallel."""
        return self.shard_spec != "Flat" and isinstance(getattr(self, "index", None), ShardedIndex)

    def _write_index(self) -> bool:
        import ray

        st = self.store
        self.addresses(np.zeros(0, np.int64))
        parts = {f"shard-{i}": b for i, b in enumerate(ray.get([sh.dump.remote() for sh in self.index.shards]))}
        parts["map"] = self.index.map_bytes()
        index_saved.save_parts(st.storage, self.rows, parts, version=self.rows.version, spec=self.shard_spec,
                               dim=st.dim, fingerprint=self._fingerprint(), fragments=sorted(self._known_frags),
                               shards=self.n_shards)
        self._saved_version, self._appended_since_save = self.rows.version, 0
        return True

    def index_codes(self, vectors):
        """Code needles, from one shard: every shard shares the quantiser trained once."""
        import ray

        if not vectors or not self.saves_index:
            return None
        ids = list(vectors)
        codes = ray.get(self.index.shards[0].codes.remote(np.stack([vectors[i] for i in ids])))
        return dict(zip(codes, ids)) if codes else None

    def drop_shared_codes(self, codes) -> None:
        if codes:  # the driver holds no codes: ask each shard which needles it still stores
            import ray

            for held in ray.get([sh.live_codes.remote(list(codes)) for sh in self.index.shards]):
                for code in held:
                    codes.pop(code, None)

    def _load_saved_shards(self) -> bool:
        import ray

        st = self.store
        found, why = index_saved.load_parts(st.storage, spec=self.shard_spec, dim=st.dim,
                                            fingerprint=self._fingerprint(), shards=self.n_shards)
        if found is None:
            self.load_note = why
            return False
        rows, blobs, meta = found
        version = int(meta["version"])
        appended = self._appended_since_saved(version)
        if appended is None:
            return False
        self.index = ShardedIndex(self._start_shards(None), st.dim, self.shard_spec)
        sizes = ray.get([sh.restore.remote(ray.put(blobs[f"shard-{i}"])) for i, sh in enumerate(self.index.shards)])
        self.index.restore_map(blobs["map"])
        if sum(sizes) != len(rows) or self.index.ntotal != len(rows):
            self.close()
            self.load_note = "saved shards and row table disagree in size"
            return False
        self.rows, self._known_frags = rows, set(meta.get("fragments", []))
        self._saved_version, self._appended_since_save = version, 0
        if appended:
            self._load_fragments(appended, st.version)
            self._known_frags |= {f.fragment_id for f in appended}
        self.rows.version = st.version
        self.load_note = f"{self.n_shards} shard actor(s), loaded the saved index of version {version}"
        return True

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None):
        return self.index.search(queries, k, params=params)

    def _rebuild(self, target: str, *, progress=None) -> None:
        """`vismem index build` on a sharded memory: train ``target`` once and refill fresh shards."""
        self.shard_spec = target
        self.load(use_saved=False, progress=progress)

    def load(self, *, use_saved: bool = True, progress=None) -> None:
        st = self.store
        self.close()  # a reload starts fresh actors; free the old ones first
        self._may_hold_stale_index = True
        if self.shard_spec != "Flat" and use_saved and self._load_saved_shards():
            return
        why = self.load_note
        trained = self._train()
        self.rows = RowTable()
        self.index = ShardedIndex(self._start_shards(trained), st.dim, self.shard_spec)
        self._known_frags = set(st.fragment_ids())
        self._load_fragments(list(st.dataset.get_fragments()), st.version)
        self.rows.version = st.version
        self._saved_version, self._appended_since_save = None, 0
        self.load_note = f"{self.n_shards} shard actor(s), built from the records" + (f" ({why})" if why else "")
        self.save_index(force=True, opportunistic=True)

    def _load_fragments(self, frags: list, version: int) -> None:
        """Row table on the driver (no vectors); runs of rows to the shards (`plan_chunks`), read there."""
        st = self.store
        if not frags:
            return
        table = st.dataset.scanner(columns=["id", "label", "weight"], with_row_address=True, fragments=frags).to_table()
        addrs = table.column("_rowaddr").to_numpy().astype(np.uint64)
        frag_of = (addrs >> np.uint64(32)).astype(np.int64)
        # Live rows per fragment, in scan order (a scan lists a fragment's rows together).
        fids, starts, counts = np.unique(frag_of, return_index=True, return_counts=True)
        order = np.argsort(starts)
        runs = [(int(fids[i]), int(starts[i]), int(counts[i])) for i in order]
        plan = plan_chunks([(f, n) for f, _, n in runs], self.index.shard_sizes())
        first_row = {f: st_ for f, st_, _ in runs}
        groups: list[tuple[list, list]] = [([], []) for _ in range(self.n_shards)]
        for shard, fid, start, count in plan:
            lo = first_row[fid] + start
            groups[shard][0].append((fid, start, count))
            groups[shard][1].append(np.arange(lo, lo + count))
        first_local = [len(g) for g in self.index._global]
        self.index.load_chunks([(chunks, addrs[np.concatenate(sel)] if sel else np.zeros(0, np.uint64))
                                for chunks, sel in groups], version)
        # Rows enter the table in scan order, chunk by chunk, as the shards added them.
        for shard, fid, start, count in plan:
            sel = np.arange(first_row[fid] + start, first_row[fid] + start + count)
            self.rows.append(table.column("id").take(sel).to_pylist(), table.column("label").take(sel).to_pylist(),
                             table.column("weight").take(sel).to_numpy(zero_copy_only=False), addrs[sel])
            self.index.place_loaded(shard, count, first_local[shard])
            first_local[shard] += count

    def close(self) -> None:
        """Stop the shard actors."""
        index = getattr(self, "index", None)
        if isinstance(index, ShardedIndex):
            index.close()

    def remove_rows(self, rows: np.ndarray, *, erase: bool = False) -> None:
        if not erase:
            super().remove_rows(rows)
            return
        # The shards scan for the vectors as stored; read them from the version the row table
        # describes (the store has just deleted them from the newest one).
        rows = np.asarray(rows, np.int64)
        ids = [self.rows.ids[r] for r in rows.tolist()]
        from ..erasure import vectors_at

        stored = vectors_at(self.store, ids, self.rows.version)
        needles = {int(r): stored[i].tobytes() for r, i in zip(rows.tolist(), ids) if i in stored}
        keep = self.index.erase(rows, needles=needles)
        self.rows.erase(rows)
        if keep is not None:
            self.rows.keep(keep)

    def append_rows(self, ids, labels, weights, vectors, addresses=None) -> None:
        self.index.add(vectors, addresses)
        self.rows.append(ids, labels, weights, addresses)
        self._appended_since_save += len(ids)

    def sync(self) -> None:
        st = self.store
        if st.version == self.rows.version:
            return
        appended = self._appended_fragments(self.rows.version)
        if appended is None:
            self.load()
            return
        self._load_fragments(appended, st.version)
        self._known_frags |= {f.fragment_id for f in appended}
        self.rows.version = st.version


def sharded_state(store, *, ray: str = "local", shards: int, spec: Optional[str] = None) -> ShardedState:
    """Connect to Ray and start ``shards`` shard actors over ``store`` (what `visual_memory.open` uses)."""
    ensure(ray)
    return ShardedState(store, shards=shards, spec=spec)
