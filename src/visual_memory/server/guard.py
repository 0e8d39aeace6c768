"""The server's front door: checks that run before any route reads a request.

`RequestGuard` is an ASGI middleware in front of FastAPI's routing. FastAPI
reads and parses a request's body (spooling uploads to disk) *before* it runs
a route's dependencies, so a token checked there is checked too late: an
unauthenticated client could make the server spool hundreds of megabytes first.
The guard refuses, reading nothing of the body:

* a ``Host`` header naming a host this server does not answer to (400): a
  DNS-rebinding page reaches 127.0.0.1 under its own name;
* a browser request from another origin (403): ``Origin`` other than the
  served one, ``Origin: null`` (file:// pages, sandboxed frames), or a
  cross-site ``Sec-Fetch-Site`` on anything but a top-level GET navigation;
* a request to a token-protected route without the right
  ``Authorization: Bearer <token>`` (401);
* a declared ``Content-Length`` above the route's body limit (413).

Then it counts the body while the route reads it, chunked or not, and stops
the read with 413 the moment it passes the limit, so no more than the limit is
ever parsed or spooled. Every refusal is JSON ``{"detail", "error"}``; one
that leaves a body unread closes the connection (else the server would read
and discard the rest of it).

Which hosts are allowed: ``localhost``, ``*.localhost``, every IP literal
(a DNS-rebinding attack needs a name it controls; a page served from an IP
address cannot be re-pointed), and the names given in ``allowed_hosts``
(``*.example.com`` matches sub-domains; ``*`` turns the check off, for a proxy
that checks Host itself). This is the rule of Vite's ``server.allowedHosts``.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Iterable, Optional, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

# Methods a browser may send cross-site as a plain navigation (a link, a typed URL).
_NAVIGATION_METHODS = frozenset({"GET", "HEAD"})


def token_problem(authorization: Optional[str], token: str) -> Optional[str]:
    """Why an ``Authorization`` header does not carry ``token`` (None when it does)."""
    if not authorization:
        return "missing token: send 'Authorization: Bearer <token>' (printed by `vismem serve` at start)"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
        return "bad token"
    return None


def split_host(host: str) -> str:
    """The host name of a ``Host`` header value, lower-case, without port or brackets.

    >>> split_host("[::1]:8000"), split_host("LocalHost.:80"), split_host("127.0.0.1")
    ('::1', 'localhost', '127.0.0.1')
    """
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: Optional[str], allowed: Iterable[str] = ()) -> bool:
    """Whether a ``Host`` header value names a host this server answers to (rule in the module docstring).

    >>> host_allowed("127.0.0.1:8000"), host_allowed("localhost"), host_allowed("evil.example:8000")
    (True, True, False)
    >>> host_allowed("vm.example.com", ["*.example.com"]), host_allowed("example.com", ["*.example.com"])
    (True, False)
    """
    if not host:
        return False
    name = split_host(host)
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
        return True
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, for comparing origins."""
    parts = urlsplit(origin.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def origin_problem(headers: Headers, method: str, allowed_origins: Iterable[str] = ()) -> Optional[str]:
    """Why a request comes from a browser page of another origin (None when it does not).

    Same origin means the ``Origin`` header names the host and port the
    request was sent to (its ``Host``): that is the web UI's own page.
    Non-browser clients send neither ``Origin`` nor ``Sec-Fetch-Site`` and pass.
    """
    origin = headers.get("origin")
    if origin is not None:
        if origin.strip().lower() == "null":
            return "requests from pages without an origin (Origin: null: file:// pages, sandboxed frames) are refused"
        if urlsplit(origin.strip()).netloc.lower() == (headers.get("host") or "").strip().lower():
            return None
        allowed = {o.strip() for o in allowed_origins}
        if "*" in allowed or normalize_origin(origin) in {normalize_origin(o) for o in allowed}:
            return None
        return f"cross-origin request from {origin!r} refused (allow it with --allow-origin / allowed_origins)"
    site = (headers.get("sec-fetch-site") or "").lower()
    if site in ("cross-site", "same-site"):
        if method in _NAVIGATION_METHODS and headers.get("sec-fetch-mode", "").lower() == "navigate":
            return None  # following a link to the UI is fine; its own requests are then same-origin
        return f"{site} request refused (Sec-Fetch-Site: {site})"
    return None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its limit. An HTTPException, so that FastAPI's
    body parsing lets it through to the app's handler (which answers 413 and closes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds this endpoint's {limit}-byte limit", headers={"Connection": "close"})


class RequestGuard:
    """ASGI middleware: refuse bad hosts, other origins, missing tokens and oversized bodies.

    Parameters
    ----------
    app : ASGI app
    token : str
        The bearer token of protected routes.
    protected : sequence of starlette routes
        Routes that need the token (matched with ``route.matches(scope)``).
    body_limits : sequence of (route, int)
        Body limits in bytes of the routes that take more than ``max_body``.
    max_body : int
        Body limit of every other request.
    allowed_hosts : iterable of str, default ()
        Host names answered besides localhost and IP literals (see the module docstring).
    allowed_origins : iterable of str, default ()
        Browser origins (``https://vm.example.com``) allowed besides the served one;
        ``*`` allows any.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        protected: Sequence[BaseRoute],
        body_limits: Sequence[tuple[BaseRoute, int]],
        max_body: int,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.token = token
        self.protected = tuple(protected)
        self.body_limits = tuple(body_limits)
        self.max_body = int(max_body)
        self.allowed_hosts = tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)

    @staticmethod
    def _serves(route: BaseRoute, scope: Scope) -> bool:
        methods = getattr(route, "methods", None)  # checked first: a method test is cheaper than the path regex
        return (methods is None or scope["method"] in methods) and route.matches(scope)[0] is Match.FULL

    def _needs_token(self, scope: Scope) -> bool:
        return any(self._serves(route, scope) for route in self.protected)

    def _body_limit(self, scope: Scope) -> int:
        return next((limit for route, limit in self.body_limits if self._serves(route, scope)), self.max_body)

    def _refusal(self, scope: Scope, headers: Headers, limit: int) -> Optional[tuple[int, str, str]]:
        """``(status, message, kind)`` of the refusal this request gets before its body is read, or None."""
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            return 400, (f"Host {headers.get('host')!r} is not a name this server answers to "
                         "(allow it with --allow-host / allowed_hosts)"), "bad_host"
        why = origin_problem(headers, scope["method"], self.allowed_origins)
        if why is not None:
            return 403, why, "cross_origin"
        if self._needs_token(scope):
            why = token_problem(headers.get("authorization"), self.token)
            if why is not None:
                return 401, why, "unauthorized"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return 413, f"request body of {declared} bytes exceeds this endpoint's {limit}-byte limit", "too_large"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self._body_limit(scope)
        refusal = self._refusal(scope, headers, limit)
        if refusal is None:
            await self._limited(scope, receive, send, limit)
            return
        status, message, kind = refusal
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if "content-length" in headers or "transfer-encoding" in headers:
            # The body is left unread; closing stops the server from draining it.
            extra["Connection"] = "close"
        await JSONResponse({"detail": message, "error": kind}, status_code=status, headers=extra)(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a ``receive`` that stops the body at ``limit`` bytes."""
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # read outside a route (the app's handler answers it inside one)
            if started:
                raise
            await JSONResponse({"detail": exc.detail, "error": "too_large"}, status_code=413, headers=exc.headers)(scope, receive, send)
