"""The server as an attacker tries it: bodies, tokens, hosts and origins (issue 11, items 6 and 7).

Everything here goes over real HTTP to uvicorn on 127.0.0.1, with raw sockets
where a client library would hide what is sent (chunked bodies, Expect), and
through real headless Chromium for what only a browser does (a file:// page,
another site's page, a DNS-rebinding name). `Recorder`, an ASGI wrapper
outside the app, sees what the app answered and how many body bytes it read;
a counting SpooledTemporaryFile sees what the multipart parser spooled.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import select
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import visual_memory as vm
from server_support import TOKEN, LiveServer, free_port

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = os.environ.get("VISMEM_CHROMIUM", "/usr/bin/chromium")
MAX_UPLOAD = 100_000  # bytes per image in these tests' servers
MAX_FILES = 2


class Recorder:
    """ASGI wrapper: for each request, (method, path, status, body bytes the app read)."""

    def __init__(self, app) -> None:
        self.app = app
        self.events: list[tuple[str, str, int, int]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"read": 0, "status": 0}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["read"] += len(message.get("body", b""))
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, recording_send)
        finally:
            self.events.append((scope["method"], scope["path"], seen["status"], seen["read"]))

    def wait_for(self, path: str, timeout: float = 30) -> tuple[str, str, int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event[1] == path:
                    self.events.remove(event)
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no request to {path} reached the app in {timeout} s")


class CountingSpool(tempfile.SpooledTemporaryFile):
    """What Starlette's multipart parser spools (memory, then disk)."""

    written = 0

    def write(self, data):
        CountingSpool.written += len(data)
        return super().write(data)


@pytest.fixture(scope="module")
def small_memory(tmp_path_factory, cifar_root, encoder) -> Path:
    path = tmp_path_factory.mktemp("guard") / "m.vm"
    mem = vm.create(path, encoder=encoder)
    mem.add([cifar_root / "train" / c / "0000.jpg" for c in ("cat", "dog", "ship")], labels=["cat", "dog", "ship"])
    return path


@pytest.fixture
def server(small_memory, tmp_path, monkeypatch, encoder):
    import shutil

    from visual_memory.server import create_app

    monkeypatch.setattr("starlette.formparsers.SpooledTemporaryFile", CountingSpool)
    CountingSpool.written = 0
    shutil.copytree(small_memory, tmp_path / "m.vm")
    app = Recorder(create_app(vm.open(tmp_path / "m.vm", encoder=encoder), token=TOKEN,
                              max_upload_bytes=MAX_UPLOAD, max_files=MAX_FILES))
    with LiveServer(app) as s:
        s.recorder = app
        yield s


def png(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# -- raw HTTP -----------------------------------------------------------------------


def _response(sock: socket.socket) -> bytes:
    """Whatever response bytes arrive before the server closes or goes quiet (an RST may cut it short)."""
    data = b""
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"}' in data:
                break
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def post_chunked(port: int, path: str, headers: dict, *, total: int, first: bytes = b"") -> int:
    """POST an endless-looking chunked body (no Content-Length) until the server answers; bytes sent."""
    boundary = "b0undary"
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
            f"Content-Type: multipart/form-data; boundary={boundary}", *(f"{k}: {v}" for k, v in headers.items())]
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + first
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        chunk = part + b"\0" * (64 * 1024 - len(part))
        try:
            while sent < total:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                chunk = b"\0" * 64 * 1024
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered: stop, as a client would
        except (BrokenPipeError, ConnectionResetError):
            pass
        _response(sock)
    return sent


def test_unauthenticated_chunked_upload_is_refused_before_reading(server):
    sent = post_chunked(server.port, "/records?label=x", {}, total=64 << 20)
    method, path, status, read = server.recorder.wait_for("/records")
    assert status == 401 and read == 0 and CountingSpool.written == 0, (status, read, CountingSpool.written)
    assert sent < 16 << 20  # the client stopped soon: the server answered and closed, it did not drain 64 MiB


def test_authenticated_chunked_upload_over_the_cap_stops_at_the_cap(server):
    cap = MAX_FILES * MAX_UPLOAD + 64 * 1024
    post_chunked(server.port, "/records?label=x", AUTH, total=64 << 20)
    method, path, status, read = server.recorder.wait_for("/records")
    assert status == 413, status
    # What the app read stops within one receive of the cap (uvicorn hands over what it has buffered).
    assert read <= cap + (1 << 20) and CountingSpool.written <= cap, (read, CountingSpool.written, cap)


def test_open_classify_chunked_over_the_cap_stops_at_the_cap(server):
    cap = MAX_UPLOAD + 64 * 1024
    post_chunked(server.port, "/classify", {}, total=64 << 20)
    method, path, status, read = server.recorder.wait_for("/classify")
    assert status == 413, status
    assert read <= cap + (1 << 20) and CountingSpool.written <= cap, (read, CountingSpool.written, cap)


def test_expect_continue_gets_the_refusal_not_a_go_ahead(server):
    # curl sends "Expect: 100-continue" before a large upload and waits: it must learn of the 401 (or 413)
    # without sending a byte of the body.
    for headers, want in (({}, b"HTTP/1.1 401"), (AUTH, b"HTTP/1.1 413")):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock.sendall((f"POST /records?label=x HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nExpect: 100-continue\r\n"
                          f"Content-Type: multipart/form-data; boundary=z\r\nContent-Length: {50 << 20}\r\n{extra}\r\n").encode())
            answer = _response(sock)
        assert answer.startswith(want), answer[:200]
        assert server.recorder.wait_for("/records")[3] == 0


def test_uploads_within_the_limits_still_work_chunked_or_not(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        image = png()

        def body():  # a generator body: httpx sends it chunked, without Content-Length
            yield b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'  # no Content-Type
            yield image
            yield b"\r\n--zz--\r\n"

        r = c.post("/records", params={"label": "red"}, content=body(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 201 and r.json()["added"] == 1, r.text
        assert c.post("/classify", files={"file": ("a.png", image, "image/png")}).json()["label"] == "red"


# -- hosts and origins over HTTP ------------------------------------------------------


def test_host_rule():
    from visual_memory.server.guard import host_allowed

    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "app.localhost:80", "[::1]:8000", "10.1.2.3", "192.168.0.7:8000"):
        assert host_allowed(host), host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "", None):
        assert not host_allowed(host), host
    assert host_allowed("vm.example.com:443", ["vm.example.com"]) and host_allowed("a.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"]) and host_allowed("anything", ["*"])


def test_foreign_hosts_are_refused(server):
    with httpx.Client(timeout=30) as c:
        image = png()
        for host in ("rebind.evil.example", f"rebind.evil.example:{server.port}"):
            for method, path, kw in (("GET", "/", {}), ("GET", "/records", {}), ("POST", "/classify", {"files": {"file": ("q.png", image, "image/png")}})):
                r = c.request(method, server.url + path, headers={"Host": host}, **kw)
                assert r.status_code == 400 and r.json()["error"] == "bad_host" and "--allow-host" in r.json()["detail"], (host, path, r.text)
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "10.9.8.7"):
            assert c.get(server.url + "/healthz", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_origins_for_a_proxy(small_memory, tmp_path, encoder):
    import shutil

    from visual_memory.server import create_app

    shutil.copytree(small_memory, tmp_path / "m.vm")
    app = create_app(vm.open(tmp_path / "m.vm", encoder=encoder), token=TOKEN, allowed_hosts=["vm.example.com"],
                     allowed_origins=["https://vm.example.com"])
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        # A proxy that forwards the public Host; one that rewrites it to 127.0.0.1 (the Origin is then allowed by name).
        for host in ("vm.example.com", f"127.0.0.1:{s.port}"):
            r = c.post("/classify", files={"file": ("q.png", png(), "image/png")},
                       headers={"Host": host, "Origin": "https://vm.example.com", "Sec-Fetch-Site": "same-origin"})
            assert r.status_code == 200, (host, r.text)
        assert c.get("/healthz", headers={"Host": "other.example.com"}).status_code == 400
        assert c.get("/healthz", headers={"Origin": "https://other.example.com"}).status_code == 403


def test_cross_origin_requests_are_refused(server):
    image = png()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        thumb_id = c.get("/records").json()["records"][0]["id"]
        same = {"Origin": server.url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
        assert c.post("/classify", files={"file": ("q.png", image, "image/png")}, headers=same).status_code == 200
        cases = [
            ({"Origin": "null"}, "Origin: null"),  # a file:// page or a sandboxed frame
            ({"Origin": "http://evil.example"}, "cross-origin request from 'http://evil.example'"),
            ({"Origin": f"http://localhost:{free_port()}"}, "cross-origin"),  # another local app
            ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, "cross-site request"),
        ]
        for headers, why in cases:
            r = c.post("/classify", files={"file": ("q.png", image, "image/png")}, headers=headers)
            assert r.status_code == 403 and why in r.json()["detail"], (headers, r.text)
            r = c.get(f"/records/{thumb_id}/thumbnail", headers=headers)  # <img> from another site
            assert r.status_code == 403, (headers, r.status_code)
        # Following a link from another site to the UI is a navigation, and fine.
        nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
        assert c.get("/", headers=nav).status_code == 200
        assert c.post("/classify", files={"file": ("q.png", image, "image/png")}, headers=nav).status_code == 403
    from visual_memory.server.guard import origin_problem

    assert origin_problem(httpx.Headers({"host": "a:1", "origin": "http://a:1"}), "POST") is None


# -- in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set VISMEM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            # DNS rebinding, for real: this name resolves to the server's loopback address.
            "--host-resolver-rules=MAP rebind.test 127.0.0.1"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


ATTACK = """<!doctype html><html><body><script>
const bytes = Uint8Array.from(atob("{png}"), c => c.charCodeAt(0));
const fd = new FormData();
fd.append("file", new Blob([bytes], {{type: "image/png"}}), "q.png");
fetch("{target}/classify", {{method: "POST", body: fd}}).then(() => document.title = "answered", () => document.title = "sent");
const img = new Image();
img.onload = () => document.body.dataset.thumb = "loaded " + img.naturalWidth;
img.onerror = () => document.body.dataset.thumb = "refused";
img.src = "{target}/records/{thumb}/thumbnail";
</script></body></html>"""


def _attack_page(server, thumb_id: str) -> str:
    return ATTACK.format(png=base64.b64encode(png()).decode(), target=server.url, thumb=thumb_id)


def test_a_file_page_cannot_use_the_api(browser, server, tmp_path):
    thumb_id = httpx.get(server.url + "/records").json()["records"][0]["id"]
    page_file = tmp_path / "attack.html"
    page_file.write_text(_attack_page(server, thumb_id))
    page = browser.new_page()
    page.goto(page_file.as_uri())
    method, path, status, read = server.recorder.wait_for("/classify")
    assert status == 403, status  # the request reached the server (browsers send it), which refused it
    page.wait_for_function("document.body.dataset.thumb !== undefined")
    assert page.evaluate("document.body.dataset.thumb") == "refused"
    page.close()


def test_another_sites_page_cannot_use_the_api(browser, server, tmp_path):
    thumb_id = httpx.get(server.url + "/records").json()["records"][0]["id"]
    (tmp_path / "attack.html").write_text(_attack_page(server, thumb_id))
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://localhost:{other.server_address[1]}/attack.html")  # another origin, another site
        method, path, status, read = server.recorder.wait_for("/classify")
        assert status == 403, status
        page.wait_for_function("document.body.dataset.thumb !== undefined")
        assert page.evaluate("document.body.dataset.thumb") == "refused"
        page.close()
    finally:
        other.shutdown()
        other.server_close()


def test_dns_rebinding_name_gets_nothing(browser, server):
    page = browser.new_page()
    response = page.goto(f"http://rebind.test:{server.port}/")
    assert response.status == 400 and "is not a name this server answers to" in page.content()
    thumb_id = httpx.get(server.url + "/records").json()["records"][0]["id"]
    status = page.evaluate(f"fetch('/records/{thumb_id}/thumbnail').then(r => r.status)")  # same-origin for the page
    assert status == 400
    page.close()


def test_the_ui_works_from_localhost_too(browser, server):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://localhost:{server.port}/")
    page.wait_for_function("document.querySelector('[data-testid=stats]').textContent.includes('3 records')")
    page.set_input_files("[data-testid=file]", files=[{"name": "q.png", "mimeType": "image/png", "buffer": png()}])
    page.wait_for_selector("[data-testid=neighbor]")
    assert errors == []
    page.close()
