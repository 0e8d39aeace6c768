"""Explanations as pictures: the query, its neighbours and the vote, in one object.

A decision of the memory is fully attributable to its neighbours (paper,
"Interpretability and control"). `explain` classifies one query and gathers
what a person needs to see that: each neighbour's thumbnail, label,
similarity, rank, record weight and contribution to the vote, and the vote
totals per label. `Explanation.to_html` renders it as one self-contained HTML
file (thumbnails inline as base64, the bar chart in plain CSS, no script, no
network), so it can be mailed, archived or opened from a CI artifact.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .images import ImageLike, load_image
from .results import Neighbor, Prediction

if TYPE_CHECKING:  # pragma: no cover
    from .memory import Memory

QUERY_THUMBNAIL_SIZE = 128


def _jpeg(img, size: int) -> bytes:
    from PIL import Image

    t = img.copy()
    t.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _thumbnail_from_source(source: Optional[str], size: int) -> Optional[bytes]:
    """A thumbnail made from the record's source file, if it is still a readable image."""
    if not source or not os.path.isfile(source):
        return None
    try:
        return _jpeg(load_image(source).image, size)
    except Exception:  # a moved, replaced or unreadable file just means no picture
        return None


@dataclass(frozen=True)
class ExplainedNeighbor(Neighbor):
    """A `Neighbor` plus what a person needs to see it: its source and thumbnail."""

    source: Optional[str] = None
    thumbnail: Optional[bytes] = field(default=None, repr=False)

    def to_dict(self, *, thumbnails: bool = True) -> dict[str, Any]:
        out = {**super().to_dict(), "source": self.source}
        if thumbnails:
            out["thumbnail"] = _data_uri(self.thumbnail)
        return out


def _data_uri(jpeg: Optional[bytes]) -> Optional[str]:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii") if jpeg else None


@dataclass
class Explanation:
    """Why the memory decided what it did for one query.

    Attributes
    ----------
    prediction : Prediction
        The decision (label, scores per label, k, vote, memory version).
    neighbors : list of ExplainedNeighbor
        The k retrieved records, nearest first, with thumbnails where the
        memory has them (or their source file still exists).
    query_thumbnail : bytes or None
        JPEG of the query image (None when the query was a vector).
    query_name : str
        Where the query came from (file path, or a description).

    Examples
    --------
    >>> import numpy as np, tempfile, visual_memory as vm
    >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
    >>> _ = mem.add_embeddings(np.array([[1, 0], [0.9, 0.1], [0, 1]]), ["cat", "cat", "dog"], ids=["a", "b", "c"])
    >>> e = explain(mem, np.array([1.0, 0.0]), k=2)
    >>> e.label, [n.id for n in e.neighbors]
    ('cat', ['a', 'b'])
    """

    prediction: Prediction
    neighbors: list[ExplainedNeighbor]
    query_thumbnail: Optional[bytes] = field(default=None, repr=False)
    query_name: str = "query"

    @property
    def label(self) -> Optional[str]:
        return self.prediction.label

    @property
    def scores(self) -> dict[str, float]:
        """Vote total per label, highest first."""
        return self.prediction.scores

    def to_dict(self, *, thumbnails: bool = True) -> dict[str, Any]:
        """JSON-able: the prediction's fields plus neighbours (thumbnails as data URIs if asked)."""
        out = self.prediction.to_dict()
        out["query"] = {"name": self.query_name, "thumbnail": _data_uri(self.query_thumbnail) if thumbnails else None}
        out["neighbors"] = [n.to_dict(thumbnails=thumbnails) for n in self.neighbors]
        return out

    def to_html(self, *, title: Optional[str] = None) -> str:
        """One self-contained HTML page: query, vote bars, neighbour gallery and table."""
        return _render_html(self, title=title)

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write `to_html` to ``path`` (parent folders are created). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"Explanation(label={self.label!r}, neighbors={len(self.neighbors)}, query={self.query_name!r})"


def explain(
    memory: "Memory",
    query: ImageLike | np.ndarray,
    *,
    k: int = 10,
    vote: str = "rank",
    read_sources: bool = True,
    **vote_params: float,
) -> Explanation:
    """Classify one query and gather everything needed to show why.

    Parameters
    ----------
    memory : Memory
    query : image or array of shape (dim,) or (1, dim)
        A path, encoded bytes, PIL image or uint8 array (embedded with the
        memory's encoder), or one float embedding.
    k : int, default 10
        Neighbours that vote (and are shown).
    vote : {"rank", "plurality", "distance", "softmax"}, default "rank"
    read_sources : bool, default True
        For records stored without a thumbnail, make one from their
        ``source`` file if it still exists. The HTTP server passes False so
        it never reads files on behalf of a client.
    **vote_params
        alpha (rank), tau (softmax), xi (distance).

    Returns
    -------
    Explanation
    """
    is_vector = isinstance(query, np.ndarray) and query.dtype.kind == "f"
    if is_vector:
        vec, thumb, name = query, None, f"<vector {tuple(query.shape)}>"
    else:
        loaded = load_image(query)
        vec = memory.embed(loaded.image)
        thumb, name = _jpeg(loaded.image, QUERY_THUMBNAIL_SIZE), loaded.name
    pred = memory.classify(vec, k=k, vote=vote, **vote_params)[0]
    return explain_prediction(memory, pred, query_thumbnail=thumb, query_name=name, read_sources=read_sources)


def explain_prediction(
    memory: "Memory",
    prediction: Prediction,
    *,
    query_thumbnail: Optional[bytes] = None,
    query_name: str = "query",
    read_sources: bool = True,
) -> Explanation:
    """Attach neighbour thumbnails and sources to an existing prediction."""
    nbs = prediction.neighbors
    rows = {r["id"]: r for r in memory.get([n.id for n in nbs], columns=["id", "source", "thumbnail"])} if nbs else {}
    out = []
    for n in nbs:
        row = rows.get(n.id, {})
        thumb = row.get("thumbnail")
        if thumb is None and read_sources:
            thumb = _thumbnail_from_source(row.get("source"), 64)
        out.append(ExplainedNeighbor(n.id, n.label, n.similarity, n.rank, n.weight, n.contribution, row.get("source"), thumb))
    return Explanation(prediction, out, query_thumbnail, query_name)


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2433;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} .muted{color:#6b7385}
.top{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
.query img{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;background:#fff}
.bars{flex:1;min-width:280px} .bar{display:flex;align-items:center;gap:8px;margin:3px 0}
.bar .name{width:120px;text-align:right;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar .track{flex:1;background:#e6e9ef;height:18px;border-radius:3px;overflow:hidden}
.bar .fill{height:100%;background:#8aa0c8} .bar.win .fill{background:#2f6fdb}
.bar .val{width:64px;font-variant-numeric:tabular-nums}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:10px;margin:16px 0}
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:6px;font-size:12px}
.card.win{border-color:#2f6fdb} .card img,.card .noimg{width:100%;aspect-ratio:1;object-fit:contain;image-rendering:pixelated;background:#f0f2f5}
.card .noimg{display:flex;align-items:center;justify-content:center;color:#99a}
.card .lab{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
table{border-collapse:collapse;font-size:12px} td,th{padding:3px 8px;border-bottom:1px solid #e3e6ec;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-size:11px}
"""


def _render_html(e: Explanation, *, title: Optional[str]) -> str:
    esc = html.escape
    p = e.prediction
    total = sum(p.scores.values()) or 1.0
    top = max(p.scores.values(), default=0.0) or 1.0
    bars = "".join(
        f'<div class="bar{" win" if lab == p.label else ""}"><span class="name" title="{esc(lab)}">{esc(lab)}</span>'
        f'<span class="track"><span class="fill" style="display:block;width:{100 * s / top:.1f}%"></span></span>'
        f'<span class="val">{s:.3f}</span><span class="muted">{100 * s / total:.0f}%</span></div>'
        for lab, s in p.scores.items()
    )
    cards = "".join(
        f'<div class="card{" win" if n.label == p.label else ""}">'
        + (f'<img alt="{esc(n.label)}" src="{_data_uri(n.thumbnail)}">' if n.thumbnail else '<div class="noimg">no image</div>')
        + f'<div class="lab" title="{esc(n.label)}">#{n.rank + 1} {esc(n.label)}</div>'
        f'<div>sim {n.similarity:.3f} · w {n.weight:g}</div><div>contrib {n.contribution:.3f}</div></div>'
        for n in e.neighbors
    )
    rows = "".join(
        f"<tr><td class=num>{n.rank + 1}</td><td>{esc(n.label)}</td><td class=num>{n.similarity:.4f}</td>"
        f"<td class=num>{n.distance:.4f}</td><td class=num>{n.weight:g}</td><td class=num>{n.contribution:.4f}</td>"
        f"<td><code>{esc(n.id)}</code></td><td>{esc(n.source or '')}</td></tr>"
        for n in e.neighbors
    )
    query = (
        f'<img alt="query" src="{_data_uri(e.query_thumbnail)}">' if e.query_thumbnail else '<div class="muted">(vector query)</div>'
    )
    heading = title or f"Prediction: {p.label if p.label is not None else '(no vote)'}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(heading)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{esc(heading)}</h1>
<div class="muted">query {esc(e.query_name)} · k={p.k} · vote={esc(p.vote)} · confidence {p.confidence:.2f} · memory version {p.version}</div>
<div class="top" style="margin-top:16px">
<div class="query">{query}</div>
<div class="bars"><h2 style="font-size:15px;margin:0 0 6px">Vote totals per label</h2>{bars or '<div class="muted">no neighbour voted</div>'}</div>
</div>
<h2 style="font-size:15px">Neighbours, nearest first</h2>
<div class="gallery">{cards}</div>
<table><thead><tr><th>rank</th><th>label</th><th>similarity</th><th>distance</th><th>weight</th><th>contribution</th><th>id</th><th>source</th></tr></thead>
<tbody>{rows}</tbody></table>
</body></html>
"""
