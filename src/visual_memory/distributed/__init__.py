"""Past one machine: ingest, index builds and sharded search on a Ray cluster.

The Lance records stay the single source of truth; Ray does the heavy work
and the memory's verbs, checks and audit log stay the same:

* `ingest`: ``Memory.add(..., ray=ADDRESS)``: Ray Data decodes and embeds
  with an actor pool, workers write Lance data files, the driver commits them
  as one version (resumable, idempotent by id);
* `shards`: ``visual_memory.open(path, ray=ADDRESS, shards=N)``: one Ray actor
  per shard holds an `visual_memory.index.Index` over its rows; queries are
  scattered, each shard's top-k merged exactly, the vote runs once;
* `cluster`: connecting (``local``, ``auto``, ``host:port``), pinned to
  127.0.0.1 for a loopback cluster.

Ray is an optional extra: ``pip install 'visual-memory[ray]'``.
"""
