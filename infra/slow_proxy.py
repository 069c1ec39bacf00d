"""A TCP proxy in front of a real Redis that holds each chunk a client sends for `delay` seconds: a Redis that
answers every command, slowly. The cache test and `make faults` put it between the service and Redis. Given a
server TLS context, it terminates TLS as ElastiCache does (rediss://localhost:PORT): the TLS cache test's Redis.

`forwarded` holds (time.monotonic() on arrival, the chunk's first bytes, the delay it got) for every chunk
a client sent towards Redis; `commands(since, until)` names the commands among them. `answer`, when set, is sent
back for each chunk in Redis's place (a proxy or server that answers out of protocol).
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

HEAD_BYTES = 64
_COMMAND = re.compile(rb"^\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")  # RESP: an array whose first item is the name


class SlowProxy:
    def __init__(self, upstream_url: str, tls: ssl.SSLContext | None = None):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 6379)
        self.database = parts.path or "/0"
        self.delay = 0.0
        self.answer: bytes | None = None
        self.forwarded: list[tuple[float, bytes, float]] = []
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.url = f"rediss://localhost:{port}{self.database}" if tls else f"redis://127.0.0.1:{port}{self.database}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def commands(self, since: float = 0.0, until: float = float("inf")) -> list[str]:
        """The names of the commands (upper case) that arrived in [since, until): a pipeline's first only."""
        names = []
        for arrived, head, _ in list(self.forwarded):
            if since <= arrived < until and (match := _COMMAND.match(head)):
                names.append(match.group(1).decode().upper())
        return names

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._tls is not None:
                client.settimeout(5)  # a client that never finishes its handshake does not stop the proxy
                try:
                    client = self._tls.wrap_socket(client, server_side=True)
                    client.settimeout(None)
                except OSError:  # ssl.SSLError too: the client refused our certificate
                    client.close()
                    continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # Redis is down: the client sees its connection closed, as it would without us
                client.close()
                continue
            server.settimeout(None)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, slowed: bool) -> None:
        """Copies `source` to `target`; when `slowed`, as a delay line: each chunk leaves `delay` seconds after it
        arrived, and chunks that arrive together leave together (a command sent in several chunks, as redis-py
        sends a large value, is late once, not once per chunk)."""
        line: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
        if slowed:
            threading.Thread(target=self._release, args=(line, source, target), daemon=True).start()
        try:
            while chunk := source.recv(65536):
                if not slowed:
                    target.sendall(chunk)
                    continue
                if self.answer is not None:
                    source.sendall(self.answer)
                    continue
                arrived, delay = time.monotonic(), self.delay
                self.forwarded.append((arrived, chunk[:HEAD_BYTES], delay))
                line.put((arrived + delay, chunk))
        except OSError:
            pass
        finally:
            line.put(None)
            if not slowed:
                _close(source, target)

    def _release(self, line: queue.SimpleQueue, source: socket.socket, target: socket.socket) -> None:
        try:
            while (item := line.get()) is not None:
                due, chunk = item
                time.sleep(max(0.0, due - time.monotonic()))
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source, target)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def _close(*ends: socket.socket) -> None:
    for end in ends:
        with contextlib.suppress(OSError):
            end.close()
