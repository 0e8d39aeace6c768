"""The HTTP API and web UI over one memory (FastAPI).

Thin: every endpoint validates its input at the edge, then calls one
`Memory` verb under the service lock and returns that verb's result as JSON.

Safety rules, all enforced here:

* mutations (add, remove, forget, relabel, reweight) need
  ``Authorization: Bearer <token>``; the token is fixed when the app is made
  (random and printed by `vismem serve` if not given);
* reads are open unless ``protect_reads`` (then they need the token too);
* uploads must declare an ``image/*`` content type and decode as an image
  (415 otherwise), and stay under the byte and pixel limits (413);
* clients never name files: images arrive as bytes, records are named by id;
* every error is JSON ``{"detail": message, "error": kind}`` with a 4xx code.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import secrets
from pathlib import Path
from typing import Any, List, Optional, Union
from urllib.parse import quote

from fastapi import Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline as FastAPI  # /docs assets served locally, no CDN
from pydantic import BaseModel, Field, field_validator

from .. import memory as vm_memory
from ..errors import (
    DuplicateIdError,
    ImageError,
    MemoryLockedError,
    SelectorError,
    UnknownIdError,
    VisualMemoryError,
)
from ..memory import Memory
from ..vote import VOTES
from .service import MemoryService

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_FILES = 64
MAX_K = 1000


class ApiError(Exception):
    """An error with an HTTP status, raised by the edge checks."""

    def __init__(self, status: int, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# Library errors -> HTTP status. Order matters: the first matching class wins.
_STATUS = [
    (UnknownIdError, 404),
    (DuplicateIdError, 409),
    (MemoryLockedError, 503),
    (SelectorError, 400),
    (ImageError, 400),
    (VisualMemoryError, 400),
    (ValueError, 400),
]


# -- request bodies -----------------------------------------------------------------


class IdsBody(BaseModel):
    ids: List[str] = Field(..., min_length=1, description="Record ids (at least one).")

    @field_validator("ids")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if any(not i for i in v):
            raise ValueError("ids must be non-empty strings")
        return v


class RelabelBody(IdsBody):
    label: str = Field(..., min_length=1, description="The new label.")


class ReweightBody(IdsBody):
    weight: float = Field(..., ge=0, allow_inf_nan=False, description="New vote weight (>= 0; 0 = never votes).")


# -- helpers ------------------------------------------------------------------------


def _to_json(result: Any) -> Any:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    return result


def thumbnail_url(record_id: str) -> str:
    return f"/records/{quote(record_id, safe='')}/thumbnail"


def _read_image_upload(upload: UploadFile, *, max_bytes: int, max_pixels: int) -> bytes:
    """The bytes of one uploaded image, or an ApiError (415 / 413 / 400)."""
    name = upload.filename or "upload"
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise ApiError(415, f"{name}: content type {ctype or 'none'!r} is not an image; upload image/jpeg, image/png, ...", "unsupported_media_type")
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"{name}: larger than the {max_bytes}-byte upload limit", "too_large")
    if not data:
        raise ApiError(400, f"{name}: file is empty", "bad_image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except UnidentifiedImageError:
        raise ApiError(415, f"{name}: declared {ctype} but is not a recognised image format", "unsupported_media_type") from None
    except Exception as exc:
        raise ApiError(400, f"{name}: unreadable image ({exc})", "bad_image") from None
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel limit", "too_many_pixels")
    return data


def _check_vote(vote: str) -> None:
    if vote not in VOTES:
        raise ApiError(400, f"vote must be one of {sorted(VOTES)}; got {vote!r}")


# -- the app ------------------------------------------------------------------------


def create_app(
    memory: Union[str, os.PathLike, Memory],
    *,
    token: Optional[str] = None,
    protect_reads: bool = False,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    max_files: int = MAX_FILES,
    refresh_every: float = 1.0,
    reranker=None,
) -> FastAPI:
    """Build the FastAPI app serving one memory (API + web UI).

    Parameters
    ----------
    memory : path or Memory
        The memory directory (opened here) or an open `Memory`.
    token : str, optional
        Bearer token for mutating endpoints. Default: a random one, readable
        as ``app.state.token``.
    protect_reads : bool, default False
        Also require the token for reads (use when listening beyond localhost).
    max_upload_bytes : int, default 10 MiB
        Per-image upload limit (413 above it).
    max_upload_pixels : int, default 40 million
        Per-image width x height limit, checked from the header before decoding (413).
    max_files : int, default 64
        Images per add request; a batch add holds the write lock while it embeds.
    refresh_every : float, default 1.0
        Seconds between checks for commits made by other processes.
    reranker : visual_memory.rerank.VLMReranker, optional
        Enables ``POST /classify?rerank=true``: the model chooses among the
        neighbours' labels; the response gains a ``rerank`` object.

    Returns
    -------
    fastapi.FastAPI
    """
    mem = memory if isinstance(memory, Memory) else vm_memory.open(memory)
    if mem.encoder_spec is not None:
        mem.encoder  # load the model now, not on (and racing within) the first request
    service = MemoryService(mem, refresh_every=refresh_every)
    token = token or secrets.token_urlsafe(24)

    app = FastAPI(
        title="visual-memory",
        version="0.1.0",
        description=(
            "An image classifier you can edit like a database. Classify images by their nearest "
            "labelled memories, see why, and correct the memory record by record. Mutating endpoints "
            "need `Authorization: Bearer <token>`."
        ),
    )
    app.state.token = token
    app.state.service = service
    limits = {"max_bytes": max_upload_bytes, "max_pixels": max_upload_pixels}

    # -- errors --------------------------------------------------------------------

    def _error(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"detail": message, "error": kind}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.message, exc.kind, headers)

    @app.exception_handler(VisualMemoryError)
    @app.exception_handler(ValueError)
    async def _library_error(request: Request, exc: Exception):
        status = next(s for cls, s in _STATUS if isinstance(exc, cls))
        headers = {"Retry-After": "1"} if status == 503 else None
        return _error(status, str(exc), type(exc).__name__, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return JSONResponse(
            {"detail": "; ".join(parts) or "invalid request", "error": "validation", "errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in exc.errors()]},
            status_code=422,
        )

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        # Refuse oversized bodies before the multipart parser spools them to disk.
        length = request.headers.get("content-length")
        cap = max_upload_bytes * max_files + 1024 * 1024
        if length is not None and length.isdigit() and int(length) > cap:
            return _error(413, f"request body of {length} bytes exceeds the {cap}-byte limit", "too_large")
        return await call_next(request)

    # -- auth ----------------------------------------------------------------------

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "missing token: send 'Authorization: Bearer <token>' (printed by `vismem serve` at start)", "unauthorized")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "bad token", "unauthorized")

    def reads(request: Request) -> None:
        if protect_reads:
            require_token(request)

    read_dep = [Depends(reads)]
    write_dep = [Depends(require_token)]

    # -- UI ------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    # -- reads ---------------------------------------------------------------------

    @app.get("/healthz", tags=["status"], summary="Liveness: the memory is open")
    def healthz() -> dict:
        with service.reading() as m:
            return {"status": "ok", "records": len(m), "version": m.version}

    @app.get("/stats", tags=["status"], summary="Records, labels with counts, encoder, version, size", dependencies=read_dep)
    def stats() -> dict:
        with service.reading() as m:
            info = m.info()
        info["path"] = Path(info["path"]).name  # the server's directory layout is none of the client's business
        info["protect_reads"] = protect_reads
        info["limits"] = {"max_upload_bytes": max_upload_bytes, "max_upload_pixels": max_upload_pixels, "max_files": max_files}
        return info

    @app.post(
        "/classify",
        tags=["classify"],
        summary="Classify an uploaded image",
        description="Multipart `file` (an image). Returns `label`, `confidence`, `scores` per label and the k "
        "`neighbors` (id, label, similarity, rank, weight, contribution, thumbnail_url), plus the memory `version`.",
        dependencies=read_dep,
    )
    def classify(
        file: UploadFile = File(..., description="The image to classify."),
        k: int = Query(50, ge=1, le=MAX_K, description="Neighbours that vote."),
        vote: str = Query("rank", description=f"One of {', '.join(VOTES)}."),
        rerank: bool = Query(False, description="Re-rank with the server's vision-language model (`vismem serve --rerank`)."),
    ) -> dict:
        _check_vote(vote)
        if rerank and reranker is None:
            raise ApiError(400, "this server has no re-ranker: start it with `vismem serve MEMORY --rerank URL --rerank-model NAME`", "no_reranker")
        data = _read_image_upload(file, **limits)
        vec, loaded = _embed(data, file.filename)
        with service.reading() as m:
            pred = m.classify(vec, k=k, vote=vote)[0]
            request = reranker.prepare(data, pred, memory=m) if rerank else None
        if request is not None:  # the model call runs outside the lock: edits need not wait for it
            from ..rerank import attach

            attach(pred, reranker.complete(request))
        out = pred.to_dict()
        for n in out["neighbors"]:
            n["thumbnail_url"] = thumbnail_url(n["id"])
        out["image"] = {"filename": file.filename, "sha256": loaded.sha256}
        return out

    def _embed(data: bytes, filename: Optional[str]):
        try:
            return service.embed(data)
        except ImageError as exc:
            raise ApiError(400, f"{filename or 'upload'}: {exc}", "bad_image") from None

    @app.post(
        "/explain",
        tags=["classify"],
        summary="Explain the decision for an uploaded image",
        description="Like /classify, plus each neighbour's source and the query thumbnail. `format=html` returns "
        "one self-contained HTML page (inline thumbnails and vote bars).",
        dependencies=read_dep,
        responses={200: {"content": {"application/json": {}, "text/html": {}}}},
    )
    def explain(
        file: UploadFile = File(...),
        k: int = Query(10, ge=1, le=MAX_K),
        vote: str = Query("rank"),
        format: str = Query("json", pattern="^(json|html)$"),
    ):
        from ..explain import QUERY_THUMBNAIL_SIZE, _jpeg, explain_prediction

        _check_vote(vote)
        data = _read_image_upload(file, **limits)
        vec, loaded = _embed(data, file.filename)
        with service.reading() as m:
            pred = m.classify(vec, k=k, vote=vote)[0]
            e = explain_prediction(
                m, pred, query_thumbnail=_jpeg(loaded.image, QUERY_THUMBNAIL_SIZE), query_name=file.filename or "upload", read_sources=False
            )
        if format == "html":
            return HTMLResponse(e.to_html())
        out = e.to_dict(thumbnails=False)
        out["query"]["thumbnail"] = e.to_dict()["query"]["thumbnail"]
        for n in out["neighbors"]:
            n["thumbnail_url"] = thumbnail_url(n["id"])
        return out

    @app.get("/records", tags=["records"], summary="Browse records, paged, optionally one label", dependencies=read_dep)
    def list_records(
        label: Optional[str] = Query(None, description="Only records with this label."),
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict:
        with service.reading() as m:
            total = m.labels.get(label, 0) if label is not None else len(m)
            rows = m.records(label=label, offset=offset, limit=limit, columns=["id", "label", "source", "weight", "added_at", "metadata", "thumbnail"])
            version = m.version
        for r in rows:
            r["thumbnail_url"] = thumbnail_url(r["id"]) if r.pop("thumbnail") is not None else None
        return {"total": total, "offset": offset, "limit": limit, "version": version, "records": jsonable(rows)}

    # Registered before /records/{id} so that the path converter does not swallow "/thumbnail".
    @app.get(
        "/records/{record_id:path}/thumbnail",
        tags=["records"],
        summary="A record's stored thumbnail (JPEG)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id, or no thumbnail stored"}},
        dependencies=read_dep,
    )
    def record_thumbnail(record_id: str) -> Response:
        with service.reading() as m:
            (rec,) = m.get([record_id], columns=["thumbnail"])
        if rec["thumbnail"] is None:
            raise ApiError(404, f"record {record_id!r} has no stored thumbnail (added as a vector)", "no_thumbnail")
        return Response(rec["thumbnail"], media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/records/{record_id:path}", tags=["records"], summary="One record by id", dependencies=read_dep)
    def get_record(record_id: str) -> dict:
        with service.reading() as m:
            (rec,) = m.get([record_id], columns=["id", "label", "source", "weight", "added_at", "metadata", "thumbnail"])
        rec["thumbnail_url"] = thumbnail_url(record_id) if rec.pop("thumbnail") is not None else None
        return jsonable(rec)

    @app.get("/history", tags=["status"], summary="The audit trail, newest first", dependencies=read_dep)
    def history(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict:
        with service.reading() as m:
            entries = m.history()
        entries.reverse()
        return {"total": len(entries), "offset": offset, "entries": jsonable(entries[offset : offset + limit])}

    # -- writes --------------------------------------------------------------------

    @app.post(
        "/records",
        tags=["records"],
        summary="Add one or many labelled images",
        description=f"Multipart: one or more `files` (images, at most {max_files}) and either one `label` for all or "
        "one `labels` field per file, in order. Ids are the SHA-256 of each image's bytes. "
        "`skip_existing=true` skips images already in the memory instead of refusing the whole batch (409).",
        dependencies=write_dep,
        status_code=201,
    )
    def add_records(
        files: List[UploadFile] = File(..., description="Images to add."),
        label: Optional[str] = Form(None, description="One label for every file."),
        labels: Optional[List[str]] = Form(None, description="One label per file, in order."),
        skip_existing: bool = Form(False),
    ) -> dict:
        if len(files) > max_files:
            raise ApiError(413, f"{len(files)} files in one request; the limit is {max_files}", "too_many_files")
        if (label is None) == (labels is None):
            raise ApiError(400, "give either `label` (one for all files) or `labels` (one per file), not both or neither")
        if labels is not None and len(labels) != len(files):
            raise ApiError(400, f"got {len(files)} files but {len(labels)} labels")
        datas = [_read_image_upload(f, **limits) for f in files]
        names = [os.path.basename(f.filename or "image") for f in files]
        # Embed before taking the write lock, so classify requests keep running meanwhile.
        vectors = service.memory.encoder.embed(datas)
        with service.writing() as m:
            result = m.add(
                datas,
                vectors=vectors,
                labels=label if label is not None else labels,
                metadata=[{"filename": n} for n in names],
                source="upload",
                skip_existing=skip_existing,
            )
        return {"version": result.version, "added": result.added, "skipped": result.skipped, "ids": result.ids}

    @app.delete("/records/{record_id:path}", tags=["edit"], summary="Remove one record", dependencies=write_dep)
    def delete_record(record_id: str) -> dict:
        with service.writing() as m:
            return _to_json(m.remove(ids=[record_id]))

    @app.post(
        "/forget",
        tags=["edit"],
        summary="Forget records: physical erasure, returns the receipt",
        description="Body `{\"ids\": [...]}`. The records' vectors, thumbnails, sources and metadata are erased from "
        "disk and from the index; the receipt says what was erased, when, and the verification result.",
        dependencies=write_dep,
    )
    def forget(body: IdsBody) -> dict:
        with service.writing() as m:
            return _to_json(m.forget(ids=body.ids))

    @app.post("/relabel", tags=["edit"], summary="Give records a new label", dependencies=write_dep)
    def relabel(body: RelabelBody) -> dict:
        with service.writing() as m:
            return _to_json(m.relabel(body.ids, body.label))

    @app.post("/reweight", tags=["edit"], summary="Set records' vote weight (0 = never votes)", dependencies=write_dep)
    def reweight(body: ReweightBody) -> dict:
        with service.writing() as m:
            return _to_json(m.reweight(body.ids, body.weight))

    return app


def jsonable(obj: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(obj, custom_encoder={bytes: lambda b: None})
