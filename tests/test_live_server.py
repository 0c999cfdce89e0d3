"""live.py's web server without a model: who it answers on the loopback address (Host and Origin),
and that it stops in time however its viewers behave."""
from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import os
import socket
import threading
import time

import aiohttp
import pytest

from sounddiffusion.live.controls import LiveControls
from sounddiffusion.live.server import STOP_S, LiveServer, allowed_hosts
from sounddiffusion.live.state import LiveState
from sounddiffusion.settings import LiveSettings


@pytest.fixture
def serve():
    """serve(host) -> a started LiveServer on a free port of ``host``, stopped after the test."""
    started = []

    def start(host="127.0.0.1"):
        server = LiveServer(LiveState(width=64, height=64), LiveControls(LiveSettings()), host=host, port=0)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def answer(server: LiveServer, path: str, headers: dict, method: str = "GET", body: bytes | None = None) -> int:
    """The status of one request to ``server`` with exactly these ``headers`` (Host among them)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def websocket(server: LiveServer, host: str, origin: str | None) -> int:
    """The handshake's status for a WebSocket to /ws with ``Host: host`` (and ``Origin: origin``)."""
    async def connect():
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"http://{server.host}:{server.port}/ws", headers=headers, timeout=30):
                    return 101
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status
    return asyncio.run(connect())


def test_the_loopback_names_are_allowed_with_the_port_and_without_it_on_port_80():
    assert allowed_hosts("127.0.0.1", 8765) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert allowed_hosts("127.0.0.2", 9000) == {"127.0.0.1:9000", "localhost:9000", "[::1]:9000", "127.0.0.2:9000"}
    assert allowed_hosts("::1", 80) == {"127.0.0.1:80", "localhost:80", "[::1]:80", "127.0.0.1", "localhost", "[::1]"}


def test_a_server_on_another_loopback_address_answers_requests_addressed_to_it(serve):
    server = serve("127.0.0.2")
    own = f"127.0.0.2:{server.port}"
    assert answer(server, "/status", {"Host": own}) == 200
    assert answer(server, "/status", {"Host": f"localhost:{server.port}"}) == 200
    assert answer(server, "/status", {"Host": f"attacker.example:{server.port}"}) == 403
    assert answer(server, "/status", {"Host": "127.0.0.2"}) == 403  # port 80 only


def test_a_page_elsewhere_can_neither_stream_the_pictures_nor_change_the_settings(serve):
    server = serve()
    own = f"127.0.0.1:{server.port}"
    assert websocket(server, own, None) == 101  # not a browser
    assert websocket(server, own, f"http://{own}") == 101  # the page itself
    assert websocket(server, own, f"http://localhost:{server.port}") == 101
    for elsewhere in ("http://attacker.example", f"http://attacker.example:{server.port}", "null",
                      f"https://{own}"):
        assert websocket(server, own, elsewhere) == 403, elsewhere
    change = b'{"seed": 5}'
    headers = {"Host": own, "Content-Type": "application/json"}
    assert answer(server, "/settings", {**headers, "Origin": "http://attacker.example"}, "POST", change) == 403
    assert server.controls.values()["seed"] == 42
    assert answer(server, "/settings", {**headers, "Origin": f"http://{own}"}, "POST", change) == 200
    assert server.controls.values()["seed"] == 5


def test_stop_cuts_off_a_viewer_that_stopped_reading(serve, caplog):
    """A viewer that took the handshake and then read nothing (its connection full of pictures)
    holds stop() up for a second (CLOSE_S), with no error."""
    server = serve()
    viewer = socket.socket()
    viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    viewer.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    viewer.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert viewer.recv(12) == b"HTTP/1.1 101"
    picture = os.urandom(1 << 20)  # the server sends the bytes as they are
    for _ in range(12):  # more than the kernel's buffers take: the server's sends wait for the viewer
        server.state.publish(picture, time.monotonic(), 1.0)
        time.sleep(0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sounddiffusion.live.server"):
        server.stop()
    assert time.monotonic() - started < STOP_S and not caplog.records
    viewer.settimeout(30)
    try:
        while viewer.recv(1 << 20):  # what was sent, then the end
            pass
    except ConnectionResetError:
        pass
    viewer.close()


def test_an_error_in_the_server_thread_reaches_start(monkeypatch):
    server = LiveServer(LiveState(), LiveControls(LiveSettings()), host="127.0.0.1", port=0)

    def broken_app():
        raise RuntimeError("no application")

    monkeypatch.setattr(server, "app", broken_app)
    raised = []

    def start():
        try:
            server.start()
        except RuntimeError as exc:
            raised.append(exc)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(60)
    assert not starting.is_alive(), "start() hangs"
    assert [str(exc) for exc in raised] == ["no application"]
    server.stop()
    assert server.sock.fileno() == -1  # the port is given back
