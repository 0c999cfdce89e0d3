"""The live page's web server (aiohttp, in its own thread with its own event loop).

Routes: ``GET /`` the page (``static/``: HTML, CSS and JS, nothing fetched from elsewhere);
``GET /ws`` a WebSocket that sends every new picture as a binary JPEG message (a slow browser
gets the newest picture when it is ready for one: pictures are skipped, never queued);
``GET /frame.jpg`` the newest picture; ``GET /status`` JSON (:meth:`LiveState.status`);
``POST /settings`` JSON with any of the page's controls (:data:`~sounddiffusion.live.controls.CONTROLS`),
in force from the next frame; a wrong one answers 400 with one line and changes nothing.

On the loopback address (the default) only requests addressed to it are answered (``Host``
checked against :func:`allowed_hosts`, so a web page elsewhere cannot reach the server through a
DNS name that points at 127.0.0.1), a request that a browser says comes from a page elsewhere
(an ``Origin`` header not of this server) is refused (WebSockets are not covered by the browser's
same-origin rules), and ``POST /settings`` must be JSON (which a page elsewhere cannot send
without the browser asking first). On any other address every request needs the random token printed with
the URL, as ``?token=`` or the cookie the page gets with it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
from pathlib import Path

from aiohttp import WSCloseCode, web

from sounddiffusion.errors import ParameterError, UserError
from sounddiffusion.live.controls import LiveControls
from sounddiffusion.live.state import LiveState

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"/": ("index.html", "text/html"), "/live.js": ("live.js", "text/javascript"),
              "/live.css": ("live.css", "text/css")}
COOKIE = "sounddiffusion_live"
# The page's own files, pictures from its own stream (blob:), connections to this server only.
CSP = "default-src 'self'; img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
NO_STORE = {"Cache-Control": "no-store"}
CLOSE_S = 1.0
"""Seconds a viewer has to take a WebSocket's closing message (one that stopped reading is cut off then)."""
STOP_S = 10.0
"""Seconds :meth:`LiveServer.stop` waits for the server (the closes, then aiohttp's 2 s for the handlers)."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is this machine only (127.0.0.0/8, ::1, localhost)."""
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` headers a server on the loopback address ``host``:``port`` answers: that address
    and the loopback names, each with ``:port``, and also without it on port 80 (which browsers
    leave out). A page's ``Origin`` is ``http://`` and one of them."""
    names = {f"[{name}]" if ":" in name else name for name in ("127.0.0.1", "localhost", "::1", host)}
    return frozenset({f"{name}:{port}" for name in names} | (names if port == 80 else set()))


def _text(status: int, message: str) -> web.Response:
    """A one-line plain-text answer."""
    return web.Response(status=status, text=" ".join(message.split()) + "\n", headers=NO_STORE)


class LiveServer:
    """Serves ``state`` and changes ``controls`` on ``host``:``port`` (0: any free port). :meth:`bind`
    takes the port (so a taken one fails before the model loads), :meth:`start` serves and returns
    the lines to show the user, :meth:`stop` closes every connection and the port."""

    def __init__(self, state: LiveState, controls: LiveControls, *, host: str, port: int):
        self.state, self.controls, self.host = state, controls, host
        self.requested_port = port
        self.token = None if is_loopback(host) else secrets.token_urlsafe(16)
        self.sock: socket.socket | None = None
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._news: asyncio.Event | None = None
        self._sockets: dict[web.WebSocketResponse, web.Request] = {}  # the open streams
        self._closing = False
        self._forget = None
        self._runner: web.AppRunner | None = None  # once serving
        self._failed: BaseException | None = None  # what stopped the server thread from serving

    # -- life cycle

    def bind(self) -> None:
        """Take the port now; ParameterError (one line) when the address cannot be used."""
        try:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.requested_port,
                                                                 type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
        except socket.gaierror as exc:
            raise ParameterError(f"--host {self.host}: not an address of this machine ({exc.strerror}); "
                                 f"use 127.0.0.1 or 0.0.0.0") from None
        except OSError as exc:
            raise ParameterError(f"--port {self.requested_port} on {self.host} cannot be used ({exc.strerror}): "
                                 f"choose another port, or 0 for any free one") from None
        self.sock, self.port = sock, sock.getsockname()[1]

    def url(self) -> str:
        """The page's address as the user opens it (with the token when there is one)."""
        shown = self.host
        ip = _ip(shown)
        if ip is not None and ip.is_unspecified:  # 0.0.0.0, ::: every interface
            shown = socket.gethostname()
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> list[str]:
        """Serve in a thread; returns the lines that tell the user where the page is."""
        if self.sock is None:
            self.bind()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="live-server", daemon=True)
        self._thread.start()
        ready.wait()
        if self._failed is not None:
            raise self._failed
        if self.token:
            log.warning("serving on %s, reachable from the network: only those who have the token in the "
                        "address below can watch or change the picture; keep it to yourself", self.host)
        return [f"live: open {self.url()} (Ctrl-C stops)"]

    def stop(self) -> None:
        """Close every connection and the port (waits for the server thread)."""
        if self._runner is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=STOP_S)
            except concurrent.futures.TimeoutError:
                log.warning("the page's server did not stop within %g s; leaving it to the end of the process",
                            STOP_S)
            self._thread.join(timeout=STOP_S)
        elif self.sock is not None:
            self.sock.close()
        if self._forget is not None:
            self._forget()

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._news = asyncio.Event()
            runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0)
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.SockSite(runner, self.sock).start())
        except BaseException as exc:  # noqa: BLE001 - raised again by start(), in the caller's thread
            self._failed = exc
            self._loop.close()
            ready.set()
            return
        self._runner = runner
        self._forget = self.state.listen(lambda shown: self._loop.call_soon_threadsafe(self._tell))
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        self._closing = True
        self._tell()
        await asyncio.gather(*(_close(ws, request) for ws, request in list(self._sockets.items())))
        await self._runner.cleanup()
        self._loop.call_soon(self._loop.stop)

    def _tell(self) -> None:
        """A new picture (or the end): wake every stream."""
        news, self._news = self._news, asyncio.Event()
        news.set()

    # -- the application

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_get("/live.js", self._page)
        app.router.add_get("/live.css", self._page)
        app.router.add_get("/ws", self._stream)
        app.router.add_get("/frame.jpg", self._frame)
        app.router.add_get("/status", self._status)
        app.router.add_post("/settings", self._settings)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.token is not None:
            given = request.query.get("token") or request.cookies.get(COOKIE) or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return _text(403, "forbidden: open the address with ?token= that live.py printed")
        else:
            hosts = allowed_hosts(self.host, self.port)
            if request.host.lower() not in hosts:
                return _text(403, f"forbidden: open {self.url()}")
            # a page elsewhere may open a WebSocket here (CORS does not cover them): its browser says whence
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() not in {f"http://{name}" for name in hosts}:
                return _text(403, f"forbidden: a page from {origin[:80]} cannot use live.py; open {self.url()}")
        response = await handler(request)
        if self.token is not None and request.path == "/" and request.query.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return response

    async def _page(self, request: web.Request) -> web.StreamResponse:
        name, kind = PAGE_FILES[request.path]
        return web.Response(body=(STATIC / name).read_bytes(), content_type=kind, charset="utf-8",
                            headers={"Content-Security-Policy": CSP, **NO_STORE})

    async def _frame(self, request: web.Request) -> web.Response:
        shown = self.state.newest()
        if shown is None:
            return _text(503, "no picture yet: the first one is on its way")
        return web.Response(body=shown.jpeg, content_type="image/jpeg",
                            headers={"X-Frame-Number": str(shown.number), **NO_STORE})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.status(), headers=NO_STORE)

    async def _settings(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _text(415, "send the settings as JSON with Content-Type: application/json")
        try:
            changes = json.loads(await request.text())
        except ValueError as exc:
            return _text(400, f"the body is not JSON ({exc})")
        try:
            values = self.controls.change(changes)
        except UserError as exc:
            return _text(400, str(exc))
        self.state.set_controls(values)
        return web.json_response(values, headers=NO_STORE)

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets[ws] = request
        reader = asyncio.ensure_future(self._drain(ws))
        sent = 0
        try:
            while not ws.closed and not self._closing:
                news = self._news  # taken before looking, so no picture slips in unannounced
                shown = self.state.newest()
                if shown is None or shown.number == sent:
                    await news.wait()
                    continue
                await ws.send_bytes(shown.jpeg)
                sent = shown.number
        except (ConnectionResetError, RuntimeError):  # the browser went away mid-send
            pass
        finally:
            self._sockets.pop(ws, None)
            reader.cancel()
            await _close(ws, request)
        return ws

    @staticmethod
    async def _drain(ws: web.WebSocketResponse) -> None:
        """Read (and ignore) what the browser sends, so that its close is seen."""
        async for _ in ws:
            pass


async def _close(ws: web.WebSocketResponse, request: web.Request) -> None:
    """Close ``ws`` (the stream of ``request``); a viewer that has stopped reading (its connection
    full) or does not answer the closing handshake within :data:`CLOSE_S` is cut off."""
    try:
        await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY, message=b"live.py stopped"), CLOSE_S)
    except asyncio.TimeoutError:
        log.debug("a viewer did not take the close in %g s: cut off", CLOSE_S)
        if request.transport is not None:
            request.transport.abort()  # close() would wait to hand it what it does not read
