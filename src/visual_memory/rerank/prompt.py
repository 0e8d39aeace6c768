"""The re-rank prompt (versioned) and the parser of the model's answer.

The protocol follows the paper's best result (Gemini given the query and its
50 nearest neighbours with their labels: 88.5% ImageNet top-1, against 83.6%
for the rank vote and 69.6% for Gemini without neighbours):

1. a system instruction: classify the query image; choose exactly one of the
   candidate labels; answer with one JSON object
   ``{"label": "<candidate>", "rationale": "<one sentence>"}``;
2. the query image (a JPEG whose longer side is at most `QUERY_MAX_SIDE` px;
   smaller images are sent at their own size, never upscaled);
3. the top-n voting neighbours, nearest first, each as ``Neighbour i: "label"``
   followed by its stored 64 px thumbnail (records stored without one are
   marked "(no image stored)"); with ``labels_only`` the neighbours are one
   numbered list of labels and no neighbour image is sent;
4. the candidate labels: the distinct labels among the shown neighbours, in
   order of first appearance (nearest first), as a JSON list.

Records with weight 0 (hard-pruned, or reweighted to 0) cast no vote, so they
are not shown either. Labels are quoted with JSON escaping, so a label holding
quotes or newlines cannot break the format. Any change to the text or layout
bumps `PROMPT_VERSION`, which is part of every cache key.

`QUERY_MAX_SIDE` = 384 because Gemini bills an image whose sides are both at
most 384 px as one 258-token tile, OpenAI's low-detail mode works at 512 px,
and Qwen2-VL tokenises 28 px patches (384 px is ~190 tokens): enough detail to
tell fine-grained classes apart, without paying for tiles the neighbours'
64 px thumbnails could not be compared with anyway.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from ..memory import Memory
    from ..results import Prediction

PROMPT_VERSION = "vm-rerank-1"
QUERY_MAX_SIDE = 384
QUERY_JPEG_QUALITY = 90
MAX_RATIONALE = 500

SYSTEM = (
    "You classify images. You are given a query image and reference images retrieved from a labelled visual "
    "memory: the query's nearest neighbours by embedding similarity, nearest first, each with its label. "
    "Neighbour labels can be wrong, and the nearest neighbour is not always the right answer. Decide which of "
    "the candidate labels the query image shows. Answer with one JSON object and nothing else: "
    '{"label": "<one candidate label, copied exactly>", "rationale": "<one short sentence>"}'
)

Part = tuple  # ("text", str) or ("image", bytes): JPEG bytes


@dataclass(frozen=True)
class ShownNeighbor:
    """One neighbour as the model sees it."""

    rank: int
    id: str
    label: str
    thumbnail: Optional[bytes]


@dataclass(frozen=True)
class Prompt:
    """A backend-neutral prompt: a system text and an ordered list of text and image parts.

    Attributes
    ----------
    system : str
    parts : tuple of ("text", str) or ("image", bytes)
        In order: the query, then the neighbours, then the candidate list.
        Images are JPEG bytes (backends encode them as data URLs or inline data).
    candidates : tuple of str
        The labels the answer must be one of.
    n_shown : int
        Neighbours shown.
    neighbors_digest : str
        SHA-256 over the shown neighbours' ids and labels (part of the cache key;
        the cache stores this hash, never an id).
    """

    system: str
    parts: tuple
    candidates: tuple
    n_shown: int
    neighbors_digest: str

    @property
    def images(self) -> list[bytes]:
        return [p[1] for p in self.parts if p[0] == "image"]


def query_jpeg(image, *, max_side: int = QUERY_MAX_SIDE) -> tuple[bytes, str]:
    """The query as sent: a JPEG with longer side <= ``max_side`` (never upscaled).

    Returns
    -------
    jpeg : bytes
    sha256 : str
        The content hash of the input (file bytes for paths and bytes, pixels
        for arrays and PIL images): the cache key's query part.
    """
    from PIL import Image

    from ..images import load_image

    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise ValueError(f"query max_side must be an integer >= 16 pixels; got {max_side!r}")
    loaded = load_image(image)
    img = loaded.image.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)  # shrinks only
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUERY_JPEG_QUALITY)
    return buf.getvalue(), loaded.sha256


def shown_neighbors(memory: "Memory", prediction: "Prediction", n: int, *, labels_only: bool = False) -> list[ShownNeighbor]:
    """The first ``n`` voting neighbours of ``prediction`` with their stored thumbnails.

    Reads the memory (one `Memory.get` of at most ``n`` ids), so call it under
    the same lock or version as the prediction. ``labels_only`` reads nothing.
    """
    nbs = [nb for nb in prediction.neighbors if nb.weight > 0][:n]
    if labels_only or not nbs:
        return [ShownNeighbor(nb.rank, nb.id, nb.label, None) for nb in nbs]
    rows = memory.get([nb.id for nb in nbs], columns=["thumbnail"])
    return [ShownNeighbor(nb.rank, nb.id, nb.label, row["thumbnail"]) for nb, row in zip(nbs, rows)]


def build_prompt(query: bytes, neighbors: Sequence[ShownNeighbor], *, labels_only: bool = False) -> Prompt:
    """The prompt for one query (JPEG bytes) and its shown neighbours (see the module docstring)."""
    candidates = tuple(dict.fromkeys(nb.label for nb in neighbors))
    parts: list[Part] = [("text", "Query image:"), ("image", query)]
    n = len(neighbors)
    if labels_only:
        listing = "\n".join(f"{i}. {json.dumps(nb.label, ensure_ascii=False)}" for i, nb in enumerate(neighbors, 1))
        parts.append(("text", f"Labels of its {n} nearest neighbours in the memory, nearest first:\n{listing}"))
    else:
        parts.append(("text", f"Its {n} nearest neighbours in the memory, nearest first, each with its label:"))
        for i, nb in enumerate(neighbors, 1):
            label = json.dumps(nb.label, ensure_ascii=False)
            if nb.thumbnail:
                parts += [("text", f"Neighbour {i}: {label}"), ("image", nb.thumbnail)]
            else:
                parts.append(("text", f"Neighbour {i}: {label} (no image stored)"))
    parts.append(("text", "Candidate labels (choose exactly one): " + json.dumps(list(candidates), ensure_ascii=False)
                  + '\nReply with the JSON object only: {"label": ..., "rationale": ...}'))
    digest = hashlib.sha256("\n".join(f"{nb.id}\0{nb.label}" for nb in neighbors).encode()).hexdigest()
    return Prompt(SYSTEM, tuple(parts), candidates, n, digest)


# -- parsing the answer --------------------------------------------------------------

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_STRIP = " \t\r\n\"'`*_“”‘’«».,;:!?()[]{}<>"
_LABEL_KEYS = ("label", "answer", "class", "category", "prediction")
_REASON_KEYS = ("rationale", "reason", "explanation", "reasoning")
_LABEL_LINE = re.compile(r"(?im)^[\s*_#>-]*(?:final\s+)?(?:label|answer|class|category|prediction)[\s*_]*[:=]\s*(.+?)\s*$")


@dataclass(frozen=True)
class Parsed:
    """The parser's verdict: a candidate label, or a fallback reason with detail."""

    label: Optional[str]
    rationale: Optional[str]
    fallback: Optional[str] = None
    detail: Optional[str] = None


def _key(text: str) -> str:
    """Comparison key: case-folded, underscores/hyphens as spaces, whitespace collapsed, quotes and end punctuation off."""
    text = re.sub(r"[_\-\s]+", " ", text.casefold()).strip(_STRIP)
    return re.sub(r"\s+", " ", text)


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _Matcher:
    def __init__(self, candidates: Sequence[str]) -> None:
        self.candidates = list(candidates)
        self.by_key: dict[str, list[str]] = {}
        for c in self.candidates:
            self.by_key.setdefault(_key(c), []).append(c)

    def exact(self, answer: str) -> Union[str, None, list]:
        """The candidate ``answer`` names; a list when the key fits several; None when none."""
        stripped = answer.strip(_STRIP)
        if stripped in self.candidates:
            return stripped
        hits = self.by_key.get(_key(answer), [])
        return hits[0] if len(hits) == 1 else (hits or None)

    def mentioned(self, text: str) -> list[str]:
        """Distinct candidates named as whole words in ``text`` (a name inside a longer named one does not count)."""
        body = " " + _key(text) + " "
        spans = []
        for key, cands in self.by_key.items():
            if not key:
                continue
            for m in re.finditer(r"(?<!\w)" + re.escape(key) + r"(?!\w)", body):
                spans.append((m.start(), m.end(), key))
        kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0]) for o in spans)]
        keys = list(dict.fromkeys(k for _, _, k in kept))
        return [c for k in keys for c in self.by_key[k]]


def parse_answer(text: Optional[str], candidates: Sequence[str]) -> Parsed:
    """Read the label out of a model's reply; anything not among ``candidates`` is rejected.

    Accepted, in order: a JSON object (in a code fence or a sentence, too)
    with a ``label`` (or ``answer``/``class``) field; a ``Label: ...`` /
    ``Answer: ...`` line; the bare label; a sentence that names exactly one
    candidate ("The query shows a Cat."). Case, whitespace, quotes,
    underscores-vs-spaces and end punctuation are ignored.

    Returns
    -------
    Parsed
        ``label`` set, or ``fallback`` one of "unparseable" (nothing that
        reads as a label), "ambiguous" (several candidates named),
        "not_a_candidate" (a label no neighbour carries).

    Examples
    --------
    >>> parse_answer('{"label": "Cat", "rationale": "pointed ears"}', ["dog", "cat"]).label
    'cat'
    >>> parse_answer("I think this is a dog.", ["dog", "cat"]).label
    'dog'
    >>> parse_answer("tiger", ["dog", "cat"]).fallback
    'not_a_candidate'
    """
    if text is None or not text.strip():
        return Parsed(None, None, "unparseable", "the model returned no text")
    match = _Matcher(candidates)
    body = _FENCE.sub("", text.strip()).strip()
    rationale = None
    from_line = False  # the label came from a "Label: ..." line
    obj = _json_object(body)
    if obj is not None:
        lowered = {str(k).casefold(): v for k, v in obj.items()}
        reason = next((lowered[k] for k in _REASON_KEYS if isinstance(lowered.get(k), str)), None)
        rationale = _short(reason, MAX_RATIONALE) if reason else None
        value = next((lowered[k] for k in _LABEL_KEYS if k in lowered), None)
        if not isinstance(value, str):
            return Parsed(None, rationale, "unparseable", f"JSON answer without a string label: {_short(body)}")
        stated = value
    else:
        line = _LABEL_LINE.search(body)
        from_line = line is not None
        stated = line.group(1) if from_line else body
        rationale = _short(body, MAX_RATIONALE) if len(body.split()) > 4 else None
    hit = match.exact(stated)
    if isinstance(hit, str):
        return Parsed(hit, rationale)
    if isinstance(hit, list):
        return Parsed(None, rationale, "ambiguous", f"{_short(stated)!r} matches several candidates {hit}")
    named = match.mentioned(stated)
    if len(named) == 1:
        return Parsed(named[0], rationale)
    if len(named) > 1:
        return Parsed(None, rationale, "ambiguous", f"the answer names several candidates {named[:5]}: {_short(stated)!r}")
    if obj is not None or from_line or len(body.split()) <= 3:
        return Parsed(None, rationale, "not_a_candidate",
                      f"answered {_short(stated, 60)!r}, which is not among the {len(match.candidates)} candidate labels")
    return Parsed(None, rationale, "unparseable", f"no candidate label in the answer: {_short(body)!r}")


def _json_object(text: str) -> Optional[dict]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
