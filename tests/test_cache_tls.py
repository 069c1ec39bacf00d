"""The cache over TLS (rediss://, as ElastiCache Serverless requires): redis-py would build a TLS context, loading
the CA store, for every new connection; the cache's connections share the container's one, built at init."""

import ssl
import subprocess
import threading

import pytest

from candlecast import api, cache, tls
from candlecast.config import get_settings
from infra.slow_proxy import SlowProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost (its own CA), as (certificate file, key file)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "localhost.pem", folder / "localhost.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_redis(clean_db, certificate, monkeypatch):
    """A TLS-terminating proxy in front of the test Redis, trusted through SSL_CERT_FILE (the system CA store's
    override), with every ssl.create_default_context() call counted."""
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    proxy = SlowProxy(clean_db.redis_url, tls=server_context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    built = []
    create = ssl.create_default_context

    def counted(*args, **kwargs):
        built.append(threading.get_ident())
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)

    def point_at(url: str) -> None:
        monkeypatch.setenv("REDIS_URL", url)
        get_settings.cache_clear()
        tls.default_context.cache_clear()
        cache.reset_client()

    point_at(proxy.url)
    yield proxy, built, point_at
    cache.reset_client()  # first: a probe of this client stops before the settings change under it
    proxy.close()
    monkeypatch.undo()
    get_settings.cache_clear()
    tls.default_context.cache_clear()
    cache.reset_client()


def test_every_tls_connection_shares_the_context_built_at_init(tls_redis):
    _, built, _ = tls_redis
    api.create_resolver()  # a function's init
    assert len(built) == 1
    assert cache.set_prediction_bytes("X:BTCUSD", b"{btc}") is True
    pool = cache.get_client().connection_pool
    connections = [pool.get_connection() for _ in range(3)]  # three at once: three TLS handshakes
    try:
        assert all(isinstance(connection._sock, ssl.SSLSocket) for connection in connections)
        for connection in connections:
            connection.send_command("PING")
            assert connection.read_response() in (b"PONG", "PONG")
    finally:
        for connection in connections:
            pool.release(connection)
    assert cache.get_prediction_bytes("X:BTCUSD") == b"{btc}" and not cache.is_down()
    assert len(built) == 1  # the init's context, and no other


def test_the_shared_context_still_verifies_the_server(tls_redis):
    proxy, _, point_at = tls_redis
    # The certificate names localhost only: reached as 127.0.0.1, the host name check must refuse it.
    point_at(proxy.url.replace("localhost", "127.0.0.1"))
    assert cache.set_prediction_bytes("X:ETHUSD", b"{eth}") is False
    assert cache.is_down()


def test_a_url_with_tls_options_of_its_own_keeps_redis_pys_context(tls_redis):
    proxy, built, point_at = tls_redis
    point_at(proxy.url.replace("localhost", "127.0.0.1") + "?ssl_cert_reqs=none")
    assert cache.set_prediction_bytes("X:ETHUSD", b"{eth}") is True  # unverified, as the URL asks
    assert len(built) == 1  # redis-py's own for this connection; the shared one was never built
    cache.prepare()
    assert len(built) == 2
