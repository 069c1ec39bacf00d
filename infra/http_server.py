"""HTTP/1.1 in front of a `handle(HttpRequest) -> HttpResponse` callable, as API Gateway's edge would serve it.

Keep-alive connections, a listen backlog that holds a burst of connects, Nagle off and each response
(head and body) sent in one write, and bodies over the limit refused from their Content-Length before a
byte of them is read.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from infra.apigateway import HttpRequest, HttpResponse, error_response, new_request_id, too_large

Handle = Callable[[HttpRequest], HttpResponse]
LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn

log = logging.getLogger("local_api")


class LocalHttpServer(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    on_close: Callable[[], None] | None = None

    def server_close(self) -> None:
        super().server_close()
        if self.on_close is not None:
            self.on_close()


class _BodyTooLarge(Exception):
    pass


class _RequestHandler(BaseHTTPRequestHandler):
    handle_request: Handle
    body_limit: int
    refuse_too_large: Handle | None = None  # the answer to a request whose body is over the limit (not read)
    protocol_version = "HTTP/1.1"
    server_version = "candlecast-local-api"
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms delayed-ACK stall on keep-alive requests

    def _dispatch(self) -> None:
        started = time.perf_counter()
        try:
            body = self._read_body()
        except _BodyTooLarge:
            unread = HttpRequest(self.command, self.path, list(self.headers.items()), b"", self.client_address[0],
                                 self.request_version)
            response = self.refuse_too_large(unread) if self.refuse_too_large else too_large(self.body_limit)
            self.close_connection = True  # the unread body must not be taken for the next request
        except ValueError as error:
            response = error_response(400, "bad_request", str(error))
            self.close_connection = True
        else:
            request = HttpRequest(self.command, self.path, list(self.headers.items()), body,
                                  self.client_address[0], self.request_version)
            response = self.handle_request(request)
        self._send(response)
        log.info('"%s %s" %d %.1f ms %s', self.command, self.path, response.status,
                 (time.perf_counter() - started) * 1000, response.function_id)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if length < 0:
            raise ValueError("bad Content-Length")
        if length > self.body_limit:
            raise _BodyTooLarge
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while True:
            try:
                size = int(self.rfile.readline(64).split(b";", 1)[0].strip() or b"0", 16)
            except ValueError:
                raise ValueError("bad chunk size") from None
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > self.body_limit:
                raise _BodyTooLarge
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _send(self, response: HttpResponse) -> None:
        phrase = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
        lines = [f"{self.protocol_version} {response.status} {phrase}"]
        names = set()
        for name, value in response.headers:
            if name in ("content-length", "transfer-encoding", "connection", "date"):
                continue
            names.add(name)
            lines.append(f"{name}: {value}")
        if "content-type" not in names and response.body:
            lines.append("content-type: application/json")
        lines.append(f"date: {formatdate(usegmt=True)}")
        lines.append(f"apigw-requestid: {new_request_id()}")
        lines.append(f"content-length: {len(response.body)}")
        if self.close_connection:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head if self.command == "HEAD" else head + response.body)  # one write, one segment run

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method reaches the routes (TRACE too), as at API Gateway
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` and listening, taken before anything slow starts: OSError (EADDRINUSE when a
    server listens there, or another run took it with this) at once. It listens at once because with SO_REUSEADDR
    two sockets may both be bound to a port while neither listens: a second `make run` on the same port then
    started its whole stack and failed only when one of the two began to serve. Connections made before
    make_server() takes it are reset then, as if refused (answered, one whose client gave up would still spend a
    route's throttle)."""
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as LocalHttpServer: TIME_WAIT is no conflict
        bound.bind((host, port))
        bound.listen(LocalHttpServer.request_queue_size)
    except BaseException:
        bound.close()
        raise
    return bound


def _reset_waiting(listening: socket.socket) -> None:
    """Close the connections waiting in the backlog (made while the caller was starting)."""
    listening.setblocking(False)
    try:
        while True:
            try:
                waiting, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            waiting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, at once
            waiting.close()
    finally:
        listening.setblocking(True)


def make_server(handle: Handle, host: str = "127.0.0.1", port: int = 3000, *, body_limit: int,
                on_close: Callable[[], None] | None = None, bound: socket.socket | None = None,
                refuse_too_large: Handle | None = None) -> LocalHttpServer:
    """`on_close` runs after server_close() (e.g. to stop what `handle` started). With a `bound` socket (bind()),
    the server listens on it instead of binding `host` and `port`. `refuse_too_large` answers a request (its body
    left unread) over `body_limit`; by default a bare 413."""
    class Handler(_RequestHandler):
        handle_request = staticmethod(handle)

    Handler.body_limit = body_limit
    if refuse_too_large is not None:
        Handler.refuse_too_large = staticmethod(refuse_too_large)
    if bound is None:
        server = LocalHttpServer((host, port), Handler)
    else:
        server = LocalHttpServer(bound.getsockname()[:2], Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = bound
        server.server_address = bound.getsockname()[:2]
        server.server_name, server.server_port = server.server_address  # what server_bind() would set
        _reset_waiting(bound)
        server.server_activate()
    server.on_close = on_close
    return server


def serve_in_thread(server: LocalHttpServer) -> str:
    """Serve on a background thread; returns the base URL (stop with server.shutdown())."""
    threading.Thread(target=server.serve_forever, name="local-api", daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
