"""The labeling web server: one page and a small JSON API over a `Store`, with token auth beyond loopback.

API (JSON in and out; errors are 4xx with {"error": "what is wrong and what to do"}):
  GET  /api/next?labeler=NAME   -> {"comparison": {"id", "prompt", "responses"} or null, "stats": {...}}
  POST /api/label  {"comparison_id": int, "labeler": str, "choice": index | "tie" | "skip"} -> {"label_id", "stats"}
  POST /api/undo   {"labeler": str} -> {"comparison": the one whose label was removed, or null, "stats"}
  GET  /api/stats[?labeler=NAME] -> done / queued / agreement (see `Store.stats`)
With a token, every /api/ request carries `Authorization: Bearer TOKEN`; the page reads the token once from
the URL the server prints (`/?token=...`). The page itself holds no data, so it is served without one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .store import LabelingError, Store

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a label is under 200 bytes; anything near this is a mistake or an attack
# Model text is shown with textContent; the policy is a second wall should a future edit slip in an innerHTML.
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                  b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page URL may carry the token
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost'). Any other name or address,
    0.0.0.0 included, may be reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The access token to require: `token` if given; a fresh random one when binding beyond loopback; else None."""
    if token is not None:
        if len(token) < 8 or not token.isprintable() or " " in token:
            raise LabelingError("--token must be at least 8 printable characters without spaces")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Guard:
    """ASGI middleware in front of every request: the token on /api/, a size limit on bodies, security headers.

    Bodies need a Content-Length (411 without): the server's HTTP parser then stops a body at that length, so a
    request can never stream more than MAX_BODY bytes into memory.
    """

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and scope["path"].startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell an attacker how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                response = _error(401, "missing or wrong access token; open the URL the server printed at start "
                                       "(it ends in ?token=...), or send 'Authorization: Bearer TOKEN'")  # fmt: skip
                return await response(scope, receive, send_with_headers)
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            length = headers.get("content-length")
            problem = None
            if length is None:
                problem = 411, "a request body needs a Content-Length header"
            elif not length.isdigit():
                problem = 400, f"Content-Length {length!r:.20} is not a number"
            elif int(length) > self.max_body:
                problem = 413, f"request body of {length} bytes is over the limit of {self.max_body}"
            if problem:
                return await _error(*problem)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


async def _json_object(request: Request, allowed: set[str]) -> dict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors; deep nesting recurses
        raise LabelingError(f"request body is not valid JSON ({type(err).__name__}: {str(err)[:80]})")
    if not isinstance(data, dict):
        raise LabelingError(f"request body must be a JSON object with {sorted(allowed)}, got a {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise LabelingError(f"unknown field(s) {sorted(unknown)}; this endpoint takes {sorted(allowed)}")
    return data


def create_app(db_path: str | Path, token: str | None = None, labels_per_comparison: int | None = None,
               max_body: int = MAX_BODY) -> FastAPI:  # fmt: skip
    """The web app over the store at `db_path` (created if absent).

    token: required on every /api/ request when set (`resolve_token` decides for a host); labels_per_comparison:
    how many labelers answer each comparison (None keeps the value stored in the file; 1 for a new one).
    """
    store = Store(db_path, labels_per_comparison)
    app = FastAPI(title="wprlhf labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LabelingError)
    async def labeling_error(request, err: LabelingError):
        return _error(err.status, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = {404: f"no such page or endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return _error(err.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return _error(400, f"bad request: {err.errors()[:1]}")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/next")
    async def next_comparison(request: Request):
        labeler = request.query_params.get("labeler")
        comparison = await run_in_threadpool(store.next_for, labeler)
        return {"comparison": comparison, "stats": await run_in_threadpool(store.stats, labeler)}

    @app.post("/api/label")
    async def label(request: Request):
        data = await _json_object(request, {"comparison_id", "labeler", "choice"})
        if "comparison_id" not in data or "choice" not in data:
            raise LabelingError("send comparison_id, labeler and choice (a response index, 'tie' or 'skip')")
        label_id = await run_in_threadpool(store.label, data["comparison_id"], data.get("labeler"), data["choice"])
        return {"label_id": label_id, "stats": await run_in_threadpool(store.stats, data.get("labeler"))}

    @app.post("/api/undo")
    async def undo(request: Request):
        data = await _json_object(request, {"labeler"})
        comparison = await run_in_threadpool(store.undo, data.get("labeler"))
        return {"comparison": comparison, "stats": await run_in_threadpool(store.stats, data.get("labeler"))}

    @app.get("/api/stats")
    async def stats(request: Request):
        return await run_in_threadpool(store.stats, request.query_params.get("labeler"))

    return _Guard(app, token, max_body)


def page_url(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is not an address to open
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          labels_per_comparison: int | None = None) -> None:  # fmt: skip
    """Run the labeling server until interrupted. Beyond loopback a token is required: `token`, or a random one
    printed with the page's URL."""
    token = resolve_token(host, token)
    app = create_app(db_path, token, labels_per_comparison)
    print(f"labeling {db_path}: open {page_url(host, port, token)}", flush=True)
    if token:
        print("every labeler needs this URL (or the token); keep it private", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


class BackgroundServer:
    """Serve `app` from a thread on a free loopback port, for tests and notebooks:

        with BackgroundServer(create_app("labels.db")) as url:   # url = "http://127.0.0.1:PORT"
            ...
    """

    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 20.0):
        self.app, self.host, self.start_timeout = app, host, start_timeout

    def __enter__(self) -> str:
        # Bind first and hand uvicorn the socket: no window in which another process could take the port.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"the labeling server did not start within {self.start_timeout} s")
            time.sleep(0.02)
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
