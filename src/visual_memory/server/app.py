"""The HTTP API and web UI over one memory (FastAPI).

Thin: every endpoint validates its input at the edge, then calls one
`Memory` verb under the service lock and returns that verb's result as JSON.

Safety rules, all enforced here or in `guard` / `errors`:

* before any body is read (`guard.RequestGuard`): the ``Host`` must be one this
  server answers to (localhost, an IP literal, or ``allowed_hosts``: no DNS
  rebinding), a browser request must come from the UI's own origin (or
  ``allowed_origins``), and a protected route needs ``Authorization: Bearer
  <token>`` (401 before a byte of an upload is read);
* mutations (add, remove, forget, relabel, reweight) need the token; it is
  fixed when the app is made (random and printed by `vismem serve` if not given);
* reads are open unless ``protect_reads`` (then they need the token too);
* every body is bounded while it streams, chunked or not (`guard`: one image
  plus form overhead for classify/explain, ``max_files`` images for an add,
  1 MiB for the rest), 413 past it;
* uploads must be images (a declared non-image content type gets 415, a
  missing one is sniffed) and stay under the byte, pixel and aspect-ratio
  limits (413), checked from the header before decoding;
* clients never name files: images arrive as bytes, records are named by id;
* every error is JSON ``{"detail": message, "error": kind}`` with a 4xx code,
  and every response is standard JSON (an undefined score is ``null``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional, Sequence, Union
from urllib.parse import quote

import numpy as np
from fastapi import Depends, File, Query, Request, Security, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline as FastAPI  # /docs assets served locally, no CDN
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema, field_validator
from starlette.convertors import PathConvertor, register_url_convertor

from .. import memory as vm_memory
from ..errors import ImageError
from ..images import check_size
from ..memory import Memory
from ..vote import VOTES
from . import errors
from .errors import ApiError, StandardJSONResponse, responses
from .guard import RequestGuard, token_problem
from .service import MemoryService

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_FILES = 64
MAX_K = 1000
MAX_OFFSET = 2**63 - 1  # Lance pages with int64 offsets
MAX_JSON_BYTES = 1024 * 1024  # every body but uploads (an edit of ~10,000 ids fits)
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the text fields of an upload
# An uploaded image as the schema describes it. `format: binary` (OpenAPI 3.0's spelling, beside 3.1's
# contentMediaType) tells clients and fuzzers to send a file part.
IMAGE_SCHEMA = {
    "type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
    "description": "An image (JPEG, PNG, GIF, WebP, BMP, TIFF, ...: what Pillow decodes). A part that declares a "
    "Content-Type must declare image/* (or application/octet-stream); one without is judged by its bytes.",
}
ImageFile = Annotated[UploadFile, WithJsonSchema(IMAGE_SCHEMA)]


def _query_bool(value: Any) -> Any:
    # true/false/1/0 in any case, as a boolean reads in a query string; pydantic would also take
    # "yes", "on", "t", ...: values the schema calls invalid.
    if isinstance(value, str) and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
# A label holds a character that Python's str.strip() keeps (`Memory` refuses blank labels). Spelled
# out because JSON Schema's \S (Unicode White_Space) keeps \x1c-\x1f, which Python strips.
NON_BLANK = "[^\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
# Weights are stored as float32: 0, or a normal float32 (a larger one would be inf, a smaller one
# would lose its precision or become 0). `Memory.reweight` applies the same rule.
_F32 = np.finfo(np.float32)
MIN_WEIGHT, MAX_WEIGHT = float(_F32.tiny), float(_F32.max)

Vote = Literal[VOTES]  # type: ignore[valid-type]
NonEmpty = Annotated[str, Field(min_length=1)]


# -- request bodies -----------------------------------------------------------------


Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


class DryRun(BaseModel):
    """A preview that also reports which probe predictions would change."""

    probe: List[Sha256] = Field(..., min_length=1, max_length=MAX_FILES, description="SHA-256 of images this server "
                                "classified recently (`image.sha256` of /classify).")
    k: int = Field(50, ge=1, le=MAX_K, description="k of the probe predictions.")
    vote: Vote = Field("rank", description="Vote of the probe predictions.")


class IdsBody(BaseModel):
    ids: List[NonEmpty] = Field(..., min_length=1, description="Record ids (at least one; none empty).")
    dry_run: Union[bool, DryRun] = Field(
        False, description="true: only preview (an EditPreview: what would change; nothing is written). An object "
        "`{\"probe\": [sha256, ...], \"k\": 50, \"vote\": \"rank\"}` previews and also lists the probes whose "
        "prediction would change.")


class RelabelBody(IdsBody):
    label: str = Field(..., pattern=NON_BLANK, description="The new label (not blank).")


class ReweightBody(IdsBody):
    weight: float = Field(
        ..., strict=True, ge=0, le=MAX_WEIGHT, allow_inf_nan=False,
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_WEIGHT, "maximum": MAX_WEIGHT}]},
        description=f"New vote weight: 0 (never votes, still retrieved), or between {MIN_WEIGHT:.9g} and {MAX_WEIGHT:.9g} "
        "(stored as float32).",
    )

    @field_validator("weight")
    @classmethod
    def _representable(cls, w: float) -> float:
        if 0 < w < MIN_WEIGHT:
            raise ValueError(f"a nonzero weight must be at least {MIN_WEIGHT:.9g} (float32 would store it imprecisely or as 0)")
        return w


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
    """The bytes of one uploaded image, or an ApiError (415 / 413 / 400).

    A part that declares a non-image content type is refused; one that declares
    none (or ``application/octet-stream``) is judged by its bytes.
    """
    name = upload.filename or "upload"
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/") and ctype != "application/octet-stream":
        raise ApiError(415, f"{name}: content type {ctype!r} is not an image; upload image/jpeg, image/png, ...", "unsupported_media_type")
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
        raise ApiError(415, f"{name}: {'declared ' + ctype + ' but ' if ctype else ''}not a recognised image format", "unsupported_media_type") from None
    except Exception as exc:
        raise ApiError(400, f"{name}: unreadable image ({exc})", "bad_image") from None
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel limit", "too_many_pixels")
    try:
        check_size(w, h, name)  # the aspect ratio bounds what the encoder's resize allocates
    except ImageError as exc:
        raise ApiError(413, str(exc), "too_many_pixels") from None
    return data


class _RecordIdConvertor(PathConvertor):
    """A record id in a path: any string (ids may hold "/"), except one ending in "/thumbnail",
    which names the thumbnail route (so GET and DELETE agree on what a path means)."""

    regex = "(?:(?!/thumbnail$).)*"


register_url_convertor("record_id", _RecordIdConvertor())


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
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
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
    allowed_hosts : sequence of str, default ()
        Host names the server answers to besides ``localhost``, ``*.localhost``
        and IP literals (which are always allowed): the public name behind a
        reverse proxy, ``*.example.com`` for sub-domains, ``*`` for any. Any
        other ``Host`` gets 400 (a DNS-rebinding page names its own host).
    allowed_origins : sequence of str, default ()
        Browser origins allowed to call the API besides the served one (which
        is the UI's), e.g. ``https://vm.example.com`` when a TLS proxy serves
        the UI; ``*`` for any. Other origins, and ``Origin: null`` (file://
        pages), get 403.

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
            "need `Authorization: Bearer <token>`. Browser requests must come from this server's own "
            "page (other origins get 403), and the Host header must name this server (400)."
        ),
        default_response_class=StandardJSONResponse,
    )
    app.state.token = token
    app.state.service = service
    limits = {"max_bytes": max_upload_bytes, "max_pixels": max_upload_pixels}
    one_image_body = max_upload_bytes + FORM_OVERHEAD
    errors.install(app)

    # -- auth ----------------------------------------------------------------------

    bearer = HTTPBearer(auto_error=False, scheme_name="token", description="The token `vismem serve` prints at start.")

    def require_token(request: Request, _: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> None:
        # `RequestGuard` already refused a bad token before the body was read; this keeps the
        # route safe on its own and puts the security scheme in the schema.
        why = token_problem(request.headers.get("authorization"), token)
        if why is not None:
            raise ApiError(401, why, "unauthorized")

    write_dep = [Depends(require_token)]
    read_dep = write_dep if protect_reads else []
    reads_401 = (401,) if protect_reads else ()

    # -- UI ------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    # -- reads ---------------------------------------------------------------------

    @app.get("/healthz", tags=["status"], summary="Liveness: the memory is open", responses=responses())
    def healthz() -> dict:
        with service.reading() as m:
            return {"status": "ok", "records": len(m), "version": m.version}

    @app.get("/stats", tags=["status"], summary="Records, labels with counts, encoder, version, size",
             dependencies=read_dep, responses=responses(*reads_401))
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
        "`neighbors` (id, label, similarity, rank, weight, contribution, thumbnail_url), plus the memory `version`. "
        "`ood_score` is null when no neighbour was found (an empty memory).",
        dependencies=read_dep,
        responses=responses(*reads_401, 413, 415, 422),
    )
    def classify(
        file: UploadFile = File(..., json_schema_extra=IMAGE_SCHEMA),
        k: int = Query(50, ge=1, le=MAX_K, description="Neighbours that vote."),
        vote: Vote = Query("rank", description="How the neighbours vote."),
        rerank: QueryBool = Query(False, include_in_schema=reranker is not None,  # documented where it works
                             description="Re-rank with the server's vision-language model (`vismem serve --rerank`)."),
    ) -> dict:
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
        responses={200: {"content": {"application/json": {}, "text/html": {}}}, **responses(*reads_401, 413, 415, 422)},
    )
    def explain(
        file: UploadFile = File(..., json_schema_extra=IMAGE_SCHEMA),
        k: int = Query(10, ge=1, le=MAX_K),
        vote: Vote = Query("rank"),
        format: Literal["json", "html"] = Query("json"),
    ):
        from ..explain import QUERY_THUMBNAIL_SIZE, _jpeg, explain_prediction

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

    @app.get("/records", tags=["records"], summary="Browse records, paged, optionally one label",
             dependencies=read_dep, responses=responses(*reads_401, 422))
    def list_records(
        label: Optional[str] = Query(None, description="Only records with this label."),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict:
        with service.reading() as m:
            total = m.labels.get(label, 0) if label is not None else len(m)
            rows = m.records(label=label, offset=offset, limit=limit, columns=["id", "label", "source", "weight", "added_at", "metadata", "thumbnail"])
            version = m.version
        for r in rows:
            r["thumbnail_url"] = thumbnail_url(r["id"]) if r.pop("thumbnail") is not None else None
        return {"total": total, "offset": offset, "limit": limit, "version": version, "records": jsonable(rows)}

    @app.get(
        "/records/{record_id:path}/thumbnail",
        tags=["records"],
        summary="A record's stored thumbnail (JPEG)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **responses(*reads_401, 404, 422)},
        dependencies=read_dep,
    )
    def record_thumbnail(record_id: str) -> Response:
        with service.reading() as m:
            (rec,) = m.get([record_id], columns=["thumbnail"])
        if rec["thumbnail"] is None:
            raise ApiError(404, f"record {record_id!r} has no stored thumbnail (added as a vector)", "no_thumbnail")
        return Response(rec["thumbnail"], media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/records/{record_id:record_id}", tags=["records"], summary="One record by id",
             dependencies=read_dep, responses=responses(*reads_401, 404, 422))
    def get_record(record_id: str) -> dict:
        with service.reading() as m:
            (rec,) = m.get([record_id], columns=["id", "label", "source", "weight", "added_at", "metadata", "thumbnail"])
        rec["thumbnail_url"] = thumbnail_url(record_id) if rec.pop("thumbnail") is not None else None
        return jsonable(rec)

    @app.get("/history", tags=["status"], summary="The audit trail, newest first",
             dependencies=read_dep, responses=responses(*reads_401, 422))
    def history(offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(100, ge=1, le=1000)) -> dict:
        with service.reading() as m:
            entries = m.history()
        entries.reverse()
        return {"total": len(entries), "offset": offset, "entries": jsonable(entries[offset : offset + limit])}

    # -- writes --------------------------------------------------------------------

    @app.post(
        "/records",
        tags=["records"],
        summary="Add labelled images",
        description=f"Multipart: one to {max_files} `files` (images); the query names the `label` they all get (to add "
        "images of several labels, send one request per label). Ids are the SHA-256 of each image's bytes. "
        "`skip_existing=true` skips images already in the memory instead of refusing the whole batch (409).",
        dependencies=write_dep,
        status_code=201,
        responses=responses(401, 409, 413, 415, 422, 503),
    )
    def add_records(
        files: List[ImageFile] = File(..., min_length=1, max_length=max_files, description="Images to add."),
        # The text fields are in the query, not the form: a query parameter is text by definition (a
        # label "7" is the string "7"), which clients and schema checkers agree on; a form part is not.
        label: str = Query(..., pattern=NON_BLANK, description="The label of every file (not blank)."),
        skip_existing: QueryBool = Query(False, description="Skip images already in the memory instead of refusing all (409)."),
    ) -> dict:
        datas = [_read_image_upload(f, **limits) for f in files]
        names = [os.path.basename(f.filename or "image") for f in files]
        # Embed before taking the write lock, so classify requests keep running meanwhile.
        vectors = service.memory.encoder.embed(datas)
        with service.writing() as m:
            result = m.add(datas, vectors=vectors, labels=label, metadata=[{"filename": n} for n in names],
                           source="upload", skip_existing=skip_existing)
        return {"version": result.version, "added": result.added, "skipped": result.skipped, "ids": result.ids}

    def _edit(body: IdsBody, verb) -> dict:
        """Run a verb, or with ``dry_run`` its preview, probed with recently classified uploads."""
        probe = body.dry_run if isinstance(body.dry_run, DryRun) else None
        vectors = service.recent_queries(probe.probe) if probe is not None else None
        with service.writing() as m:
            result = verb(m, dry_run=probe is not None or body.dry_run is True)
            if probe is not None:
                result = result.with_probe(vectors, names=probe.probe, k=probe.k, vote=probe.vote)
        return _to_json(result)

    @app.delete("/records/{record_id:record_id}", tags=["edit"], summary="Remove one record",
                dependencies=write_dep, responses=responses(401, 404, 422, 503))
    def delete_record(record_id: str, dry_run: bool = Query(False, description="Only preview the removal.")) -> dict:
        with service.writing() as m:
            return _to_json(m.remove(ids=[record_id], dry_run=dry_run))

    @app.post(
        "/forget",
        tags=["edit"],
        summary="Forget records: physical erasure, returns the receipt",
        description="Body `{\"ids\": [...]}`. The records' vectors, thumbnails, sources and metadata are erased from "
        "disk and from the index; the receipt says what was erased, when, and the verification result. "
        "`dry_run: true` returns the preview instead and erases nothing.",
        dependencies=write_dep,
        responses=responses(401, 404, 413, 422, 503),
    )
    def forget(body: IdsBody) -> dict:
        out = _edit(body, lambda m, **kw: m.forget(ids=body.ids, **kw))
        if body.dry_run is False:
            service.forget_recent()  # a forgotten image may have been a recent query: keep nothing of it
        return out

    @app.post("/relabel", tags=["edit"], summary="Give records a new label",
              dependencies=write_dep, responses=responses(401, 404, 413, 422, 503))
    def relabel(body: RelabelBody) -> dict:
        return _edit(body, lambda m, **kw: m.relabel(body.ids, body.label, **kw))

    @app.post("/reweight", tags=["edit"], summary="Set records' vote weight (0 = never votes)",
              dependencies=write_dep, responses=responses(401, 404, 413, 422, 503))
    def reweight(body: ReweightBody) -> dict:
        return _edit(body, lambda m, **kw: m.reweight(body.ids, body.weight, **kw))

    routes = {getattr(r, "endpoint", None): r for r in app.router.routes}
    protected = [r for r in app.router.routes if any(d.dependency is require_token for d in getattr(r, "dependencies", ()))]
    body_limits = [(routes[classify], one_image_body), (routes[explain], one_image_body),
                   (routes[add_records], max_files * max_upload_bytes + FORM_OVERHEAD)]
    app.add_middleware(RequestGuard, token=token, protected=protected, body_limits=body_limits, max_body=MAX_JSON_BYTES,
                       allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    return app


def jsonable(obj: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(obj, custom_encoder={bytes: lambda b: None})
