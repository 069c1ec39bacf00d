"""An HTTP proxy in front of moto's S3 server that lets a test land a rewrite of one object between two requests."""

import contextlib
import threading
from collections.abc import Callable


class RewritingProxy:
    """Calls `rewrite` (which replaces the object, straight at moto) when moto has answered a `method` request for
    `key` and before that answer is relayed, for the first `times` such requests: a rewrite landing just after a
    read (a GET) or a write (a PUT). `requests` lists the methods of every request for `key`."""

    def __init__(self, upstream: str, key: str, rewrite: Callable[[], None], *, method: str = "GET", times: int = 1):
        from http.client import HTTPConnection
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy, self.requests = self, []

        class Handler(BaseHTTPRequestHandler):
            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                connection = HTTPConnection(target.hostname, target.port, timeout=5)
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = connection.getresponse()
                payload = response.read()
                if key in self.path:
                    proxy.requests.append(self.command)
                    if self.command == method and proxy.requests.count(method) <= times:
                        rewrite()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection", "date", "server"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_HEAD = do_PUT = forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def through(proxy: RewritingProxy):
    """Storage's clients reach S3 through `proxy` inside the block."""
    import pytest

    from candlecast import storage
    from candlecast.config import get_settings

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("S3_ENDPOINT_URL", proxy.url)
            get_settings.cache_clear()
            storage.reset_clients()
            yield proxy
    finally:
        proxy.close()
        get_settings.cache_clear()
        storage.reset_clients()
