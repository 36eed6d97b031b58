"""The labeling web server: one page and a small JSON API over a `Store`, guarded against other sites and hosts.

API (JSON in and out; errors are 4xx with {"error": "what is wrong and what to do"}). The page opens a session
once per load and sends it with every later call; labels, leases and undo belong to that session:
  POST /api/session {"labeler": str} -> {"session": str, "labeler": str}
  POST /api/next    {"session"} -> {"comparison": {"id", "prompt", "responses"} or null, "stats": {...}}
                    leases the comparison for LEASE_SECONDS (one per session)
  POST /api/renew   {"session", "comparison_id"} -> {"held": bool}   the page's heartbeat while it is visible
  POST /api/release {"session"} -> {"released": int}                  the page was hidden or closed
  POST /api/label   {"session", "comparison_id": int, "choice": index | "tie" | "skip"} -> {"label_id", "stats"}
  POST /api/undo    {"session"} -> {"comparison": the one whose label was removed, or null, "stats"}
  GET  /api/stats[?session=S] -> done / queued / agreement, and with S that labeler's counts (see `Store.stats`)
  GET  /api/instructions -> {"instructions": the labeling guidelines as text, or null}
Every request passes `_Guard` first: its Host must be a name this server answers to (a DNS-rebinding page sends its
own name); an Origin, when sent, must be the page's own; anything that changes state is a POST with Content-Type
application/json (a page on another site can send text/plain without asking, never JSON); bodies carry a
Content-Length within MAX_BODY. With a token, every /api/ request carries `Authorization: Bearer TOKEN`; the page
reads it once from the URL the server prints (`/?token=...`). The page itself holds no data: served without one.
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
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .store import LabelingError, Store, check_labeler

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a label is under 200 bytes; anything near this is a mistake or an attack
MAX_INSTRUCTIONS = 100_000  # characters of guidelines: pages of text, not a data file by mistake
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
WILDCARDS = ("0.0.0.0", "::", "")
# Model text is shown with textContent; the policy is a second wall should a future edit slip in an innerHTML.
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                  b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page URL may carry the token
    (b"cache-control", b"no-store"),
]


# ---------------------------------------------------------------------------------------------- hosts and tokens


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost'). Any other name or address,
    0.0.0.0 included, may be reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None, proxied: bool = False) -> str | None:
    """The access token to require: `token` if given; a fresh random one when binding beyond loopback, or when the
    page is reached through a proxy under another name (`proxied`: --allowed-host); else None."""
    if token is not None:
        if len(token) < 8 or not token.isprintable() or " " in token:
            raise LabelingError("--token must be at least 8 printable characters without spaces")
        return token
    return None if is_loopback(host) and not proxied else secrets.token_urlsafe(24)


def host_name(host: str) -> str:
    """The name part of a Host header or --allowed-host value, lower case, IPv6 in brackets: 'Example.org:8765'
    -> 'example.org', '[::1]:8765' -> '[::1]', '::1' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (only our own flags spell it so; a Host header brackets it)
        return f"[{host}]"
    return host.partition(":")[0]


def machine_addresses() -> list[str]:
    """This machine's IP addresses, loopback included, best effort from three sources that each may fail: what its
    host name resolves to, the address it would reach the network from, and (Linux) every interface's."""
    found = {"127.0.0.1", "::1"}
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation nets
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))  # UDP connect sends nothing: it only picks the outgoing interface
                found.add(s.getsockname()[0])
        except OSError:
            pass
    found.update(_interface_addresses())
    addresses = set()
    for text in found:
        try:
            addresses.add(ipaddress.ip_address(text.split("%")[0]))
        except ValueError:
            pass
    return [str(a) for a in sorted(addresses, key=lambda a: (a.version, a.is_loopback, a))]


def _interface_addresses() -> set[str]:
    """Linux: the IPv4 address of each interface (SIOCGIFADDR) and every IPv6 one (/proc/net/if_inet6)."""
    found = set()
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                    found.add(socket.inet_ntoa(packed[20:24]))
                except OSError:
                    pass  # an interface without an IPv4 address
    except (ImportError, OSError, AttributeError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def allowed_hosts(host: str, extra=()) -> frozenset[str]:
    """The Host names the server answers to when bound to `host`: the loopback names; beyond loopback also this
    machine's names and addresses; and each `extra` name (--allowed-host: e.g. a TLS proxy's public name). Ports
    are not compared: a proxy may forward its own."""
    names = set(LOOPBACK_NAMES)
    if host not in WILDCARDS:
        names.add(host_name(host))
    if not is_loopback(host):
        hostname = socket.gethostname()
        names.update(n.lower() for n in (hostname, f"{hostname}.local", socket.getfqdn()) if n)
        names.update(host_name(a) for a in machine_addresses())
    for name in extra:
        if not name.strip() or "/" in name or " " in name.strip():
            raise LabelingError(f"--allowed-host {name!r} is not a host name; give one such as labels.example.org "
                                "(no scheme, no path)")  # fmt: skip
        names.add(host_name(name))
    return frozenset(names)


def read_instructions(path: str | Path | None) -> str | None:
    """The guidelines file's text (Markdown or plain text), or None without one; a missing or unreadable file is a
    LabelingError, so the server never starts without the guidelines it was told to show."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise LabelingError(f"--instructions {path} does not exist; give a Markdown or plain-text file of guidelines")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelingError(f"--instructions {path} is not UTF-8 text ({err.reason}); save it as UTF-8")
    if len(text) > MAX_INSTRUCTIONS:
        raise LabelingError(f"--instructions {path} has {len(text)} characters, over {MAX_INSTRUCTIONS}; "
                            "is it the right file?")  # fmt: skip
    if not text.strip():
        raise LabelingError(f"--instructions {path} is empty; write the guidelines or leave the option out")
    return text


# ---------------------------------------------------------------------------------------------- the guard


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Guard:
    """ASGI middleware in front of every request, checking in order: Host, Origin, the token on /api/, and for a
    state change (POST) its Content-Type and size; it adds the security headers to every answer.

    Bodies need a Content-Length (411 without): the server's HTTP parser then stops a body at that length, so a
    request can never stream more than MAX_BODY bytes into memory.
    """

    def __init__(self, app, token: str | None, max_body: int, hosts: frozenset[str]):
        self.app, self.token, self.max_body, self.hosts = app, token, max_body, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refuse(scope, headers)
        if problem:
            return await _error(*problem)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def _refuse(self, scope, headers: dict) -> tuple[int, str] | None:
        """(status, message) when the request must not reach the app, else None."""
        host = headers.get("host", "")
        # DNS rebinding: a page on attacker.example whose name now resolves to us sends Host: attacker.example
        if host_name(host) not in self.hosts:
            return 400, (f"this server does not answer to the host name {host[:80]!r}; open the URL it printed at "
                         "start, or add the name with --allowed-host NAME")  # fmt: skip
        # A browser sends Origin on cross-site requests: only the page's own origin may talk to the API
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.strip().lower():
            return 403, f"requests from {origin[:80]!r} are refused; use the labeling page itself"
        if self.token and scope["path"].startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell an attacker how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return 401, ("missing or wrong access token; open the URL the server printed at start "
                             "(it ends in ?token=...), or send 'Authorization: Bearer TOKEN'")  # fmt: skip
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            # another site may send a "simple" request (text/plain, forms) without asking first, never JSON
            content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if content_type != "application/json":
                return 415, f"send a JSON body with Content-Type: application/json (got {content_type[:40]!r})"
            length = headers.get("content-length")
            if length is None:
                return 411, "a request body needs a Content-Length header"
            if not length.isdigit():
                return 400, f"Content-Length {length!r:.20} is not a number"
            if int(length) > self.max_body:
                return 413, f"request body of {length} bytes is over the limit of {self.max_body}"
        return None


async def _json_object(request: Request, required: set[str], optional: set[str] = frozenset()) -> dict:
    """The request's JSON object, with every `required` field and nothing outside required | optional."""
    allowed = required | optional
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
    missing = required - set(data)
    if missing:
        raise LabelingError(f"missing field(s) {sorted(missing)}; this endpoint takes {sorted(allowed)}")
    return data


# ---------------------------------------------------------------------------------------------- the app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"error": what is wrong and what to do}: the store's (with their status), unknown pages
    and methods, malformed requests, and anything else (500, its traceback in the server's log)."""

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

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        # still logged with its traceback by the server; the page gets JSON it can show instead of a bare 500
        return _error(500, f"the labeling server failed ({type(err).__name__}); its log has the details")


def create_app(db_path: str | Path, token: str | None = None, labels_per_comparison: int | None = None,
               max_body: int = MAX_BODY, instructions: str | None = None, hosts=LOOPBACK_NAMES):  # fmt: skip
    """The web app over the store at `db_path` (created if absent).

    token: required on every /api/ request when set (`resolve_token` decides for a host); labels_per_comparison:
    how many labelers answer each comparison (None keeps the value stored in the file; 1 for a new one);
    instructions: guidelines text the page shows before the first item; hosts: the Host names answered
    (`allowed_hosts` for a bind address; by default the loopback names).
    """
    store = Store(db_path, labels_per_comparison)
    app = FastAPI(title="wprlhf labeling", docs_url=None, redoc_url=None, openapi_url=None)

    _add_error_handlers(app)
    async def call(function, *args):
        return await run_in_threadpool(function, *args)  # SQLite waits on locks: keep it off the event loop

    async def who(data: dict) -> tuple[str, str]:
        """(labeler, session) of the session a request names."""
        return await call(store.session_labeler, data["session"]), data["session"]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/api/session")
    async def open_session(request: Request):
        data = await _json_object(request, {"labeler"})
        return {"session": await call(store.open_session, data["labeler"]), "labeler": check_labeler(data["labeler"])}

    @app.post("/api/next")
    async def next_comparison(request: Request):
        labeler, session = await who(await _json_object(request, {"session"}))
        comparison = await call(store.next_for, labeler, session)
        return {"comparison": comparison, "stats": await call(store.stats, labeler, session)}

    @app.post("/api/renew")
    async def renew(request: Request):
        data = await _json_object(request, {"session", "comparison_id"})
        labeler, session = await who(data)
        return {"held": await call(store.renew, labeler, session, data["comparison_id"])}

    @app.post("/api/release")
    async def release(request: Request):
        labeler, session = await who(await _json_object(request, {"session"}))
        return {"released": await call(store.release, labeler, session)}

    @app.post("/api/label")
    async def label(request: Request):
        data = await _json_object(request, {"session", "comparison_id", "choice"})
        labeler, session = await who(data)
        label_id = await call(store.label, data["comparison_id"], labeler, data["choice"], session)
        return {"label_id": label_id, "stats": await call(store.stats, labeler, session)}

    @app.post("/api/undo")
    async def undo(request: Request):
        labeler, session = await who(await _json_object(request, {"session"}))
        comparison = await call(store.undo, labeler, session)
        return {"comparison": comparison, "stats": await call(store.stats, labeler, session)}

    @app.get("/api/stats")
    async def stats(request: Request):
        session = request.query_params.get("session")
        if session is None:
            return await call(store.stats)
        return await call(store.stats, await call(store.session_labeler, session), session)

    @app.get("/api/instructions")
    async def guidelines():
        return {"instructions": instructions}

    return _Guard(app, token, max_body, frozenset(hosts))


# ---------------------------------------------------------------------------------------------- serving


def page_url(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in WILDCARDS else host  # a wildcard bind is not an address to open
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def page_urls(host: str, port: int, token: str | None) -> list[str]:
    """The page's URL for each address it can be opened at: one per interface address for a wildcard bind (0.0.0.0
    is IPv4 only, :: both), loopback last; else the one address bound."""
    if host not in WILDCARDS:
        return [page_url(host, port, token)]
    urls = []
    for address in machine_addresses():
        ip = ipaddress.ip_address(address)
        if ip.is_link_local or (host == "0.0.0.0" and ip.version == 6):
            continue  # a link-local address needs a zone id (%eth0) that browsers do not take in a URL
        urls.append((ip.is_loopback, page_url(address, port, token)))
    return [url for _, url in sorted(urls, key=lambda u: u[0])]  # stable: the machine's own order within each


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          labels_per_comparison: int | None = None, instructions: str | Path | None = None,
          extra_hosts=()) -> None:  # fmt: skip
    """Run the labeling server until interrupted. Beyond loopback (or behind a proxy: `extra_hosts`) a token is
    required: `token`, or a random one printed with the page's URLs. instructions: a guidelines file."""
    text = read_instructions(instructions)  # before anything starts: a wrong path must not serve a page without it
    hosts = allowed_hosts(host, extra_hosts)
    token = resolve_token(host, token, proxied=bool(extra_hosts))
    app = create_app(db_path, token, labels_per_comparison, instructions=text, hosts=hosts)
    urls = page_urls(host, port, token)
    if len(urls) == 1:
        print(f"labeling {db_path}: open {urls[0]}", flush=True)
    else:
        print(f"labeling {db_path}: open the URL for the network the labelers are on:", *urls, sep="\n  ", flush=True)
    if token:
        print("every labeler needs this URL (or the token); keep it private", flush=True)
    if not is_loopback(host) or extra_hosts:
        print(f"""this is plain HTTP: the token and the labels cross the network in clear text.
  Beyond a network you trust, serve on 127.0.0.1 behind a TLS reverse proxy that keeps the Host header:
    wprlhf label serve --db {db_path} --port {port} --allowed-host labels.example.org
    caddy reverse-proxy --from labels.example.org --to 127.0.0.1:{port}
  (nginx: proxy_pass http://127.0.0.1:{port}; proxy_set_header Host $host;)""", flush=True)
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
