"""The labeling web server: one page for labelers, one for the lead, and a small JSON API over a `Store`, guarded
against other sites and hosts, slow or oversized requests, and guessed tokens.

API (JSON in and out; errors are 4xx with {"error": "what is wrong and what to do"}). The page opens a session
once per tab (kept across reloads) and sends it with every later call; labels, leases and undo belong to it:
  GET  /api/me      -> {"role": "open" | "shared" | "labeler" | "lead", "labeler": the invite's name or null,
                        "min_read_seconds": how long an item is on screen before its answer is taken}
  POST /api/session {"labeler": str} -> {"session": str, "labeler": str}   with an invite: {} (the name is the
                    invite's); names are compared NFKC-normalised and case-folded
  POST /api/next    {"session"} -> {"comparison": {"id", "prompt", "responses"} or null, "stats": {...}}
                    leases the comparison for LEASE_SECONDS (one per session, MAX_LEASES_PER_LABELER per person)
  POST /api/renew   {"session", "comparison_id"} -> {"held": bool}   the page's heartbeat while it is visible
  POST /api/release {"session"} -> {"released": int}                  the page was hidden or closed
  POST /api/label   {"session", "comparison_id": int, "choice": index | "tie" | "skip"} -> {"label_id", "stats"}
                    only for the comparison leased to this session (409 otherwise), once it has been on screen
                    for min_read_seconds (425 before)
  POST /api/undo    {"session"} -> {"comparison": the one whose label was removed, or null, "stats"}
                    with an invite, the person's latest label from any of their pages; else this session's
  GET  /api/stats[?session=S] -> progress, and with S that labeler's counts (see `Store.stats`); never agreement
  GET  /api/instructions -> {"instructions": the labeling guidelines as text, or null}
  GET  /api/lead/report -> `Store.lead_report`: per-labeler progress and speed, agreement (Cohen's and Fleiss'
                    kappa, raw, counts), leased / skipped / stuck items, the review queue      (lead's link only)
  POST /api/lead/adjudicate {"comparison_id", "choice": index | "tie"} -> {"adjudication_id"}    (lead's link only)
Every request passes `_Guard` first: its Host must be a name this server answers to (a DNS-rebinding page sends its
own name); an Origin, when sent, must be the page's own; anything that changes state is a POST with Content-Type
application/json (a page on another site can send text/plain without asking, never JSON); bodies carry a
Content-Length within MAX_BODY, no Transfer-Encoding, and arrive within BODY_TIMEOUT. With a token or invites, every
/api/ request carries `Authorization: Bearer SECRET` (checked before any body is read, with a back-off on wrong
guesses); the page reads it once from its link (`/?token=...`). `lead_html` writes the lead's view as one file. `TimedH11Protocol` closes connections past
MAX_CONNECTIONS and those whose headers take over HEADER_TIMEOUT. The pages themselves hold no data.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .store import MIN_READ_SECONDS, LabelingError, NameTaken, Store, UnknownSession, check_labeler

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a label is under 200 bytes; anything near this is a mistake or an attack
MAX_INSTRUCTIONS = 100_000  # characters of guidelines: pages of text, not a data file by mistake
HEADER_TIMEOUT = 10.0  # seconds for a request line and its headers: a slow client holds a socket no longer
BODY_TIMEOUT = 10.0  # seconds for a body (at most MAX_BODY) once its headers passed the guard
MAX_CONNECTIONS = 256  # open at once: well under the usual limit of 1,024 open files
FREE_GUESSES = 5  # wrong tokens from one address before the back-off starts (a mistyped link is not an attack)
MAX_BACKOFF = 60.0  # seconds: the longest wait after wrong guesses
MIN_TOKEN_LENGTH, MIN_TOKEN_CHARS = 16, 10  # a token needs this many characters, this many of them different
TOKEN_ENV = "WPRLHF_LABEL_TOKEN"  # the token from the environment: unlike --token, not shown by `ps`
STATE_CHANGES = ("POST", "PUT", "PATCH", "DELETE")
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


def check_token(token: str, where: str = "--token") -> str:
    """A shared token, checked: at least MIN_TOKEN_LENGTH printable characters without spaces, MIN_TOKEN_CHARS of
    them different. "password" or "aaaaaaaaaaaaaaaa" would be guessed; `secrets.token_urlsafe(24)` passes."""
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
        raise LabelingError(f"{where} must be at least {MIN_TOKEN_LENGTH} printable characters without spaces; "
                            "leave it out to get a random one printed")  # fmt: skip
    if len(set(token)) < MIN_TOKEN_CHARS:
        raise LabelingError(f"{where} is too easy to guess: it needs at least {MIN_TOKEN_CHARS} different "
                            "characters; leave it out to get a random one printed")  # fmt: skip
    return token


def read_token(token: str | None = None, token_file: str | Path | None = None, environ=os.environ) -> str | None:
    """The shared token from --token, --token-file (its first line) or the WPRLHF_LABEL_TOKEN variable, in that
    order; None when none is given. A file or the environment keeps it out of `ps` and shell history."""
    if token is not None and token_file is not None:
        raise LabelingError("give --token or --token-file, not both")
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise LabelingError(f"--token-file {path} is not a file (missing, or a folder); write the token on the "
                                "first line of a file")  # fmt: skip
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM some editors add is dropped
        except (UnicodeDecodeError, OSError) as err:
            raise LabelingError(f"--token-file {path} cannot be read as UTF-8 text ({err}); write the token as "
                                "plain text on its first line") from None  # fmt: skip
        return check_token(lines[0].strip() if lines else "", f"--token-file {path}")
    if token is not None:
        return check_token(token)
    if environ.get(TOKEN_ENV):
        return check_token(environ[TOKEN_ENV].strip(), TOKEN_ENV)
    return None


def resolve_token(host: str, token: str | None, proxied: bool = False, invited: bool = False) -> str | None:
    """The shared token to require: `token` if given (checked); else a fresh random one when binding beyond
    loopback, or when the page is reached through a proxy under another name (`proxied`: --allowed-host), unless
    the file holds invites (`invited`: then each person's own link is their credential); else None."""
    if token is not None:
        return check_token(token)
    return None if (is_loopback(host) and not proxied) or invited else secrets.token_urlsafe(24)


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


# ---------------------------------------------------------------------------------------------- the connection


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two limits it lacks: a connection past MAX_CONNECTIONS is closed at once,
    and one whose request line and headers have not all arrived HEADER_TIMEOUT seconds after it opened (or after
    its last answer) is closed. Without them, 1,100 idle sockets used up the 1,024 open files and locked every
    labeler out. The body's own deadline is `_Guard`'s (BODY_TIMEOUT), after the token check."""

    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()  # connection_lost then forgets it
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._headers_late)

    def _headers_late(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # IDLE: no complete request yet
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # a kept-alive connection gets the same deadline for its next request

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def server_options() -> dict:
    """uvicorn settings for the labeling server: the timed protocol, a short keep-alive, small header buffers, and
    X-Forwarded-For ignored (uvicorn trusts it from loopback by default, so a client behind a local proxy could name
    a new address with every wrong token and never meet the back-off)."""
    return {"http": TimedH11Protocol, "timeout_keep_alive": 5, "log_level": "warning",
            "h11_max_incomplete_event_size": 16 * 1024, "proxy_headers": False}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the guard


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then passes on the rest (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _Guard:
    """ASGI middleware in front of every request, checking in order: Host, Origin, the credential on /api/ (the
    shared token or an invite's secret, with a back-off on wrong guesses), the role a path needs, and for a state
    change (POST) its framing, Content-Type and size; then it reads the body itself, within BODY_TIMEOUT and
    max_body, before the app sees it. It adds the security headers to every answer.

    A body needs a Content-Length and no Transfer-Encoding: with both, the HTTP parser follows the chunked framing
    and the length checked here would say nothing about what is read (RFC 9112 section 6.3). Counting the bytes
    as they arrive caps the body a second time, whatever the framing.
    """

    def __init__(self, app, token: str | None, max_body: int, hosts: frozenset[str], store: Store):
        self.app, self.token, self.max_body, self.hosts, self.store = app, token, max_body, hosts, store
        self.failures: dict[str, tuple[int, float]] = {}  # address -> (wrong guesses in a row, refused until)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scope = {**scope, "wprlhf.identity": ("open", None)}
        problem = self._refuse(scope, headers)
        if problem is None and scope["method"] in STATE_CHANGES:
            body = await self._read_body(receive)
            problem, receive = (body, receive) if isinstance(body, tuple) else (None, _replay(body, receive))
        if problem:
            return await _error(*problem)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def _refuse(self, scope, headers: dict) -> tuple | None:
        """(status, message[, headers]) when the request must not reach the app, else None."""
        host = headers.get("host", "")
        # DNS rebinding: a page on attacker.example whose name now resolves to us sends Host: attacker.example
        if host_name(host) not in self.hosts:
            return 400, (f"this server does not answer to the host name {host[:80]!r}; open the URL it printed at "
                         "start, or add the name with --allowed-host NAME")  # fmt: skip
        # A browser sends Origin on cross-site requests: only the page's own origin may talk to the API
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.strip().lower():
            return 403, f"requests from {origin[:80]!r} are refused; use the labeling page itself"
        if scope["path"].startswith("/api/"):
            problem = self._authenticate(scope, headers)
            if problem:
                return problem
        if scope["method"] in STATE_CHANGES:
            return self._refuse_body(headers)
        return None

    def _authenticate(self, scope, headers: dict) -> tuple | None:
        """Find who sends the request (scope["wprlhf.identity"] = (role, name)) or refuse it. Roles: "open" (no
        credential is needed: loopback, no token, no invites), "shared" (the --token), "labeler" or "lead" (an
        invite). Wrong guesses from one address are answered 429, unchecked, for a time that doubles with each
        guess past FREE_GUESSES (at most MAX_BACKOFF s); a right one clears that address's count. The back-off is
        per address because it acts before anyone is known (a team behind one proxy shares it, and only someone's
        wrong guesses start it)."""
        address, now = (scope.get("client") or ("unknown",))[0], time.monotonic()
        guesses, until = self.failures.get(address, (0, 0.0))
        required = self.token is not None or self.store.has_invites()
        if required and until > now:
            wait = math.ceil(until - now)
            return 429, (f"too many wrong access codes from this address; wait {wait} s, then open the link you "
                         "were given again"), {"Retry-After": str(wait)}  # fmt: skip
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given, identity = given.strip(), None if required else ("open", None)
        # compare_digest: the time taken does not tell an attacker how much of a guess was right (an invite is
        # looked up by its secret's hash, which a guess does not approach byte by byte)
        if scheme.lower() == "bearer" and given:
            if self.token and hmac.compare_digest(given.encode(), self.token.encode()):
                identity = ("shared", None)
            elif required:
                identity = self.store.identity(given)
        if identity is None:
            if len(self.failures) > 10_000:  # a flood from many addresses: forget the ones whose wait is over
                self.failures = {a: f for a, f in self.failures.items() if f[1] > now}
            guesses += 1
            self.failures[address] = (guesses, now + min(MAX_BACKOFF, 2.0 ** (guesses - FREE_GUESSES))
                                      if guesses > FREE_GUESSES else 0.0)  # fmt: skip
            return 401, ("missing or wrong access token; open the URL the server printed at start or the invite "
                         "link you were given (it ends in ?token=...), or send 'Authorization: Bearer TOKEN'")  # fmt: skip
        self.failures.pop(address, None)
        scope["wprlhf.identity"] = identity
        lead_path = scope["path"].startswith("/api/lead/")
        if lead_path != (identity[0] == "lead") and scope["path"] != "/api/me":  # /api/me: the page asks who it is
            return 403, ("the lead's view needs the lead's own link (`wprlhf label invite --lead NAME`)" if lead_path
                         else "this is the lead's link, for /lead; labelers label with their own invite links")
        return None

    def _refuse_body(self, headers: dict) -> tuple | None:
        # another site may send a "simple" request (text/plain, forms) without asking first, never JSON
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            return 415, f"send a JSON body with Content-Type: application/json (got {content_type[:40]!r})"
        length = headers.get("content-length")
        if "transfer-encoding" in headers:
            if length is not None:
                return 400, ("a request with both Content-Length and Transfer-Encoding is refused (the two framings "
                             "disagree); send Content-Length only")  # fmt: skip
            return 411, "a request body needs a Content-Length header (chunked bodies are not taken)"
        if length is None:
            return 411, "a request body needs a Content-Length header"
        if not length.isdigit():
            return 400, f"Content-Length {length!r:.20} is not a number"
        if int(length) > self.max_body:
            return 413, f"request body of {length} bytes is over the limit of {self.max_body}"
        return None

    async def _read_body(self, receive) -> bytes | tuple:
        """The whole body, or (status, message) when it is over max_body or too slow to arrive."""
        chunks, size = [], 0
        deadline = time.monotonic() + BODY_TIMEOUT
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return 408, f"the request body did not arrive within {BODY_TIMEOUT:g} s; send it again"
            if message["type"] == "http.disconnect":
                return 400, "the client went away before sending its body"
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return 413, f"request body is over the limit of {self.max_body} bytes"
            if not message.get("more_body"):
                return b"".join(chunks)


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


async def call(function, *args):
    """Run a Store method in a worker thread: SQLite waits on locks, and the event loop must not."""
    return await run_in_threadpool(function, *args)


def labeler_stats(stats: dict) -> dict:
    """Stats as a labeler may see them: without agreement, which would tell them whether they matched the others
    (and, with undo, let them change their answer to match). The lead's view has it."""
    return {k: v for k, v in stats.items() if k not in ("agreement", "agreement_pairs")}


async def who(store: Store, request: Request, data: dict) -> tuple[str, str]:
    """(labeler, session) of the session a request names. With an invite, the session must be that person's."""
    labeler = await call(store.session_labeler, data["session"])
    role, name = request.scope["wprlhf.identity"]
    if role == "labeler" and labeler != name:
        raise UnknownSession(f"this session belongs to another labeler than {name!r}; reload the page")
    return labeler, data["session"]


def _add_pages(app: FastAPI, store: Store, instructions: str | None) -> None:
    """The labeling page, the lead's page, their static files, and what the page asks before it starts."""

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/lead", include_in_schema=False)
    async def lead_page():
        return FileResponse(STATIC / "lead.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/instructions")
    async def guidelines():
        return {"instructions": instructions}

    @app.get("/api/me")
    async def me(request: Request):
        role, name = request.scope["wprlhf.identity"]
        return {"role": role, "labeler": name, "min_read_seconds": store.min_read_seconds}

    @app.post("/api/session")
    async def open_session(request: Request):
        role, name = request.scope["wprlhf.identity"]
        data = await _json_object(request, set() if role == "labeler" else {"labeler"}, {"labeler"})
        if role == "labeler":  # the name comes from the invite, never from the page
            if "labeler" in data and check_labeler(data["labeler"]) != name:
                raise NameTaken(f"this invite link is {name!r}'s; open your own link to label under another name")
            return {"session": await call(store.open_session, name, True), "labeler": name}
        return {"session": await call(store.open_session, data["labeler"]), "labeler": check_labeler(data["labeler"])}


def _add_labeling_api(app: FastAPI, store: Store) -> None:
    """The labeler's calls; each names its session (see the module docstring)."""

    @app.post("/api/next")
    async def next_comparison(request: Request):
        labeler, session = await who(store, request, await _json_object(request, {"session"}))
        comparison = await call(store.next_for, labeler, session)
        return {"comparison": comparison, "stats": labeler_stats(await call(store.stats, labeler, session))}

    @app.post("/api/renew")
    async def renew(request: Request):
        data = await _json_object(request, {"session", "comparison_id"})
        labeler, session = await who(store, request, data)
        return {"held": await call(store.renew, labeler, session, data["comparison_id"])}

    @app.post("/api/release")
    async def release(request: Request):
        labeler, session = await who(store, request, await _json_object(request, {"session"}))
        return {"released": await call(store.release, labeler, session)}

    @app.post("/api/label")
    async def label(request: Request):
        data = await _json_object(request, {"session", "comparison_id", "choice"})
        labeler, session = await who(store, request, data)
        label_id = await call(store.label, data["comparison_id"], labeler, data["choice"], session)
        return {"label_id": label_id, "stats": labeler_stats(await call(store.stats, labeler, session))}

    @app.post("/api/undo")
    async def undo(request: Request):
        labeler, session = await who(store, request, await _json_object(request, {"session"}))
        comparison = await call(store.undo, labeler, session)
        return {"comparison": comparison, "stats": labeler_stats(await call(store.stats, labeler, session))}

    @app.get("/api/stats")
    async def stats(request: Request):
        session = request.query_params.get("session")
        if session is None:
            return labeler_stats(await call(store.stats))
        labeler, session = await who(store, request, {"session": session})
        return labeler_stats(await call(store.stats, labeler, session))


def _add_lead_api(app: FastAPI, store: Store) -> None:
    """The lead's calls (the guard lets only a lead's link reach /api/lead/)."""

    @app.get("/api/lead/report")
    async def report():
        return await call(store.lead_report)

    @app.post("/api/lead/adjudicate")
    async def adjudicate(request: Request):
        data = await _json_object(request, {"comparison_id", "choice"})
        lead = request.scope["wprlhf.identity"][1]
        return {"adjudication_id": await call(store.adjudicate, data["comparison_id"], lead, data["choice"])}


def lead_html(report: dict) -> str:
    """The lead's view as one self-contained HTML file (`wprlhf label status --html FILE`): the /lead page with its
    style and script inline and `report` (`Store.lead_report`) embedded, read-only (adjudicate on /lead)."""
    page = (STATIC / "lead.html").read_text(encoding="utf-8")
    data = json.dumps(report, ensure_ascii=False).replace("<", "\\u003c")  # no "</script>" in a text ends the block
    inline = {'<link rel="stylesheet" href="/static/style.css">': f"<style>\n{(STATIC / 'style.css').read_text()}</style>",
              '<script src="/static/lead.js" defer></script>': (
                  f'<script type="application/json" id="report-data">{data}</script>\n'
                  f"<script>\n{(STATIC / 'lead.js').read_text(encoding='utf-8')}</script>")}  # fmt: skip
    for tag, text in inline.items():
        if tag not in page:  # lead.html changed: fail here, not with a file that silently lacks its script
            raise RuntimeError(f"static/lead.html no longer holds {tag}; update lead_html to match")
        page = page.replace(tag, text)
    return page


def create_app(db_path: str | Path, token: str | None = None, labels_per_comparison: int | None = None,
               max_body: int = MAX_BODY, instructions: str | None = None, hosts=LOOPBACK_NAMES,
               min_read_seconds: float = MIN_READ_SECONDS):  # fmt: skip
    """The web app over the store at `db_path` (created if absent).

    token: the shared token, required on every /api/ request when set (`resolve_token` decides for a host); once
    the file holds invites (`Store.invite`), every request needs the token or an invite's secret. labels_per_comparison:
    how many labelers answer each comparison (None keeps the value stored in the file; 1 for a new one);
    instructions: guidelines text the page shows before the first item; hosts: the Host names answered
    (`allowed_hosts` for a bind address; by default the loopback names); min_read_seconds: how long a comparison
    is on a page's screen before its answer is taken.
    """
    store = Store(db_path, labels_per_comparison, min_read_seconds)
    app = FastAPI(title="wprlhf labeling", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_pages(app, store, instructions)
    _add_labeling_api(app, store)
    _add_lead_api(app, store)
    return _Guard(app, token, max_body, frozenset(hosts), store)


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
          extra_hosts=(), token_file: str | Path | None = None) -> None:  # fmt: skip
    """Run the labeling server until interrupted. Beyond loopback (or behind a proxy: `extra_hosts`) a credential
    is required: each invited person's link, or the shared token (`token`, `token_file` or WPRLHF_LABEL_TOKEN: see
    `read_token`), a random one printed with the page's URLs when none is given. instructions: a guidelines file."""
    text = read_instructions(instructions)  # before anything starts: a wrong path must not serve a page without it
    hosts = allowed_hosts(host, extra_hosts)
    invited = Store(db_path, labels_per_comparison).has_invites()
    token = resolve_token(host, read_token(token, token_file), proxied=bool(extra_hosts), invited=invited)
    app = create_app(db_path, token, labels_per_comparison, instructions=text, hosts=hosts)
    urls = page_urls(host, port, token)
    if len(urls) == 1:
        print(f"labeling {db_path}: open {urls[0]}", flush=True)
    else:
        print(f"labeling {db_path}: open the URL for the network the labelers are on:", *urls, sep="\n  ", flush=True)
    if token:
        print("every labeler needs this URL (or the token); keep it private", flush=True)
    if invited:
        print(f"invited labelers open their own links (`wprlhf label invite --db {db_path} NAME` makes one; "
              "give it this server's address with --url)", flush=True)  # fmt: skip
    if not is_loopback(host) or extra_hosts:
        print(f"""this is plain HTTP: the token and the labels cross the network in clear text.
  Beyond a network you trust, serve on 127.0.0.1 behind a TLS reverse proxy that keeps the Host header:
    wprlhf label serve --db {db_path} --port {port} --allowed-host labels.example.org
    caddy reverse-proxy --from labels.example.org --to 127.0.0.1:{port}
  (nginx: proxy_pass http://127.0.0.1:{port}; proxy_set_header Host $host;)""", flush=True)
    uvicorn.run(app, host=host, port=port, **server_options())


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
        self.server = uvicorn.Server(uvicorn.Config(self.app, **server_options()))
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
