"""Neighbour files in the paper authors' JSON format, both ways.

The authors published their retrieval results as one JSON object per query
(PAPER.md, "Interchange format")::

    {"featurizer": "dinov2_vitl14", "image_id": "...", "image_class": "...",
     "neighbor_image_ids": [...], "neighbor_classes": [...], "neighbor_distances": [...]}

`export_neighbors` writes our neighbours that way (a JSON object keyed by
query id, so their notebooks can ``pd.read_json(..., orient="index")`` it);
`import_neighbors` reads such a file (that form, a list of objects, or JSON
Lines), `predict_neighbors` runs the four votes on it (optionally with record
weights: 0 excludes a record, as the authors' exclude sets) and
`evaluate_neighbors` scores them, so their neighbour files run through our
voting and our files through their analysis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np

from . import vote as voting
from .errors import VisualMemoryError
from .index import check_k
from .rows import LabelCodes

if TYPE_CHECKING:  # pragma: no cover
    from .memory import Memory

FIELDS = ("featurizer", "image_id", "image_class", "neighbor_image_ids", "neighbor_classes", "neighbor_distances")


def export_neighbors(
    mem: "Memory",
    queries: np.ndarray,
    *,
    query_ids: Sequence[str],
    query_labels: Optional[Sequence[Optional[str]]] = None,
    k: int = 100,
    featurizer: Optional[str] = None,
    path: Optional[str | os.PathLike] = None,
) -> dict[str, dict]:
    """The k nearest records of each query, in the authors' format.

    Parameters
    ----------
    mem : Memory
    queries : float array of shape (n, dim)
        Query embeddings (from the memory's encoder).
    query_ids : sequence of str, length n
        Unique ids (e.g. file names); the keys of the output.
    query_labels : sequence of str or None, optional
        True classes (``image_class``; null when unknown).
    k : int, default 100
    featurizer : str, optional
        Default: the memory's encoder name.
    path : path, optional
        Also write the result there as JSON.

    Returns
    -------
    dict query id -> record with the six fields; distances are ``1 - cosine``.
    """
    check_k(k)
    ids = [str(i) for i in query_ids]
    n = len(np.atleast_2d(queries))
    if len(ids) != n:
        raise ValueError(f"got {n} queries but {len(ids)} query ids")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise ValueError(f"query ids must be unique (repeated: {dup})")
    if query_labels is not None and len(query_labels) != n:
        raise ValueError(f"got {n} queries but {len(query_labels)} labels")
    feat = featurizer or mem.info()["encoder"]
    sims, rows = mem.search(queries, k=k)
    table = mem.rows
    out = {}
    for q, qid in enumerate(ids):
        present = rows[q] >= 0
        r = rows[q][present]
        out[qid] = {
            "featurizer": feat,
            "image_id": qid,
            "image_class": None if query_labels is None else query_labels[q],
            "neighbor_image_ids": [table.ids[i] for i in r.tolist()],
            "neighbor_classes": table.labels.decode(table.codes[r]).tolist(),
            "neighbor_distances": [float(1.0 - s) for s in sims[q][present]],
        }
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out) + "\n")
    return out


def import_neighbors(path: str | os.PathLike) -> list[dict]:
    """Read and validate a neighbour file in the authors' format.

    Accepts a JSON object keyed by query id, a JSON list of records, or JSON
    Lines (one record per line).

    Returns
    -------
    list of dict (one per query), each with the six fields.

    Raises
    ------
    VisualMemoryError
        Naming the file, the query and the field that is missing or malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such neighbour file")
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise VisualMemoryError(f"{p}: neither JSON nor JSON Lines ({exc})") from None
    records = list(data.values()) if isinstance(data, dict) and "image_id" not in data else data if isinstance(data, list) else [data]
    if not records:
        raise VisualMemoryError(f"{p}: no queries in the file")
    for i, rec in enumerate(records):
        where = f"{p}: query {rec.get('image_id', i)!r}" if isinstance(rec, dict) else f"{p}: entry {i}"
        if not isinstance(rec, dict):
            raise VisualMemoryError(f"{where} is not a JSON object")
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise VisualMemoryError(f"{where} lacks field(s) {missing}; the format needs {list(FIELDS)}")
        lens = {f: len(rec[f]) for f in FIELDS[3:] if isinstance(rec[f], list)}
        if len(lens) != 3 or len(set(lens.values())) != 1:
            raise VisualMemoryError(f"{where}: neighbor_image_ids, neighbor_classes and neighbor_distances must be lists of equal length; got {lens}")
        d = np.asarray(rec["neighbor_distances"], dtype=np.float64)
        if not np.isfinite(d).all() or (len(d) > 1 and (np.diff(d) < -1e-6).any()):
            raise VisualMemoryError(f"{where}: neighbor_distances must be finite and ascending (nearest first)")
    return records


def _coded(records: Sequence[dict], weights: Optional[Mapping[str, float]]):
    """Neighbour records as arrays: label codes, codes (n, K), similarities (n, K), record weights (n, K)."""
    if weights is not None:
        bad = [i for i, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float, np.number))
               or not (np.isfinite(w) and w >= 0)]
        if bad:
            raise VisualMemoryError(f"weights must be finite numbers >= 0 (0 excludes a record); bad for ids {sorted(map(str, bad))[:5]}")
    K = max((len(r["neighbor_classes"]) for r in records), default=0)
    coder = LabelCodes.sorted([c for r in records for c in r["neighbor_classes"]],
                              [r["image_class"] for r in records if r.get("image_class") is not None])
    n = len(records)
    codes = np.full((n, K), -1, dtype=np.int64)
    sims = np.full((n, K), -np.inf)
    rec_w = np.ones((n, K))
    for q, r in enumerate(records):
        m = len(r["neighbor_classes"])
        codes[q, :m] = coder.encode(r["neighbor_classes"], add=False)
        sims[q, :m] = 1.0 - np.asarray(r["neighbor_distances"], dtype=np.float64)
        if weights is not None:
            rec_w[q, :m] = [weights.get(str(i), 1.0) for i in r["neighbor_image_ids"]]
    return coder, codes, sims, rec_w


def predict_neighbors(records: Sequence[dict], *, ks: Sequence[int] = (1, 10, 50, 100), votes: Sequence[str] = voting.VOTES,
                      vote_params: Optional[dict[str, dict]] = None,
                      weights: Optional[Mapping[str, float]] = None) -> dict[str, np.ndarray]:
    """Predicted class of each query at each k, for each vote (the authors' ``prediction_at_k``).

    Parameters
    ----------
    records : sequence of dict
        Neighbour records (`import_neighbors`), nearest first.
    ks : sequence of int, default (1, 10, 50, 100)
        A k larger than a query's neighbour list uses all it has.
    votes : sequence of str, default all four
    vote_params : dict vote -> dict, optional
        E.g. ``{"rank": {"alpha": 4}}``.
    weights : mapping neighbour image id -> weight >= 0, optional
        Record weights (default 1). 0 excludes the record, as the authors'
        ``add_exclude_sets`` (``{i: 0.0 for i in exclude_set}``); a soft weight
        multiplies the vote, as their ``image_id_to_weight``.

    Returns
    -------
    dict vote -> object array of shape (n_queries, len(ks)) of class names
    (as strings), rows in the order of ``records``.
    """
    if not records:
        raise VisualMemoryError("no queries to predict")
    coder, codes, sims, rec_w = _coded(records, weights)
    K = codes.shape[1]
    if K == 0:
        raise VisualMemoryError("no query has any neighbour")
    ks = [min(int(k), K) for k in ks if int(k) >= 1]
    if not ks:
        raise ValueError("ks must hold positive integers")
    out = {}
    for v in votes:
        contrib = voting.contributions(sims, v, rec_w, **(vote_params or {}).get(v, {}))
        out[v] = coder.decode(voting.predict_every_k(codes, contrib, len(coder), ks))
    return out


def evaluate_neighbors(records: Sequence[dict], *, ks: Sequence[int] = (1, 10, 50, 100), votes: Sequence[str] = voting.VOTES,
                       vote_params: Optional[dict[str, dict]] = None,
                       weights: Optional[Mapping[str, float]] = None) -> dict:
    """Top-1 accuracy of each vote at each k on neighbour records (ours or the authors').

    Queries without ``image_class`` are skipped. A k larger than a query's
    neighbour list uses all it has. ``weights`` as in `predict_neighbors`.

    Returns
    -------
    dict with n_queries, featurizer(s) and accuracy[vote][k].
    """
    recs = [r for r in records if r.get("image_class") is not None]
    if not recs:
        raise VisualMemoryError("no query has an image_class to score against")
    K = max(len(r["neighbor_classes"]) for r in recs)
    ks = sorted({min(int(k), K) for k in ks if int(k) >= 1})
    if not ks:
        raise ValueError("ks must hold positive integers")
    coder, codes, sims, rec_w = _coded(recs, weights)
    y = coder.encode([r["image_class"] for r in recs], add=False)
    acc = {}
    for v in votes:
        a = voting.accuracy_every_k(codes, sims, y, len(coder), ks, v, rec_w, **(vote_params or {}).get(v, {}))
        acc[v] = dict(zip(ks, a.tolist()))
    return {"n_queries": len(recs), "featurizer": sorted({str(r["featurizer"]) for r in recs}), "accuracy": acc}
