"""How the server's errors become HTTP responses, and how the schema documents them.

Every error is JSON ``{"detail": message, "error": kind}`` (422 adds
``errors``, the list of field problems) with a 4xx status, and every status an
operation can answer is documented in the OpenAPI schema (``ErrorBody``), so
the schema says what the server does (checked by schemathesis in
``tests/test_server_schema.py``).
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import (
    DuplicateIdError,
    ImageError,
    MemoryLockedError,
    SelectorError,
    UnknownIdError,
    VisualMemoryError,
)
from ..results import json_safe


class ApiError(Exception):
    """An error with an HTTP status, raised by the edge checks."""

    def __init__(self, status: int, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ErrorBody(BaseModel):
    """What every error response holds."""

    detail: str
    error: str
    errors: Optional[List[dict]] = None


class StandardJSONResponse(JSONResponse):
    """JSON without NaN or Infinity: an undefined number (no neighbour, no score) is ``null``."""

    def render(self, content: Any) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


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

_WHY = {
    400: "Bad request: a value the schema cannot express is wrong (the message names it), or the Host header "
         "names a host this server does not answer to",
    401: "Missing or wrong `Authorization: Bearer <token>`",
    403: "A browser request from another origin (or from a file:// page)",
    404: "No record with this id (or no thumbnail stored for it)",
    409: "A record with this id already exists",
    413: "The body, an image's bytes or an image's pixels exceed a limit (the message names it)",
    415: "An uploaded file is not an image",
    422: "A parameter or the body does not match the schema (`errors` lists each problem)",
    503: "Another writer holds the memory's write lock; retry (see Retry-After)",
}


def responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries for these error statuses (plus 400 and 403, which any request can get)."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in sorted({400, 403, *statuses})}


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into ``{"detail", "error"}`` JSON."""

    def error(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"detail": message, "error": kind}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, exc.message, exc.kind, headers)

    @app.exception_handler(VisualMemoryError)
    @app.exception_handler(ValueError)
    async def _library_error(request: Request, exc: Exception):
        status = next(s for cls, s in _STATUS if isinstance(exc, cls))
        headers = {"Retry-After": "1"} if status == 503 else None
        return error(status, str(exc), type(exc).__name__, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        message, kind = str(exc.detail), {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        elif exc.status_code == 413:  # `guard.BodyTooLarge`: the rest of the body is never read (its header closes)
            kind = "too_large"
        return error(exc.status_code, message, kind, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            given = e.get("input")
            shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) <= 80 else ""
            parts.append(f"{where}: {e.get('msg')}{shown}")
        return JSONResponse(
            {
                "detail": "; ".join(parts) or "invalid request",
                "error": "validation",
                "errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in exc.errors()],
            },
            status_code=422,
        )
