"""Pool checkout policies side by side: a round trip on every checkout, no check but one retry of a request
that meets a broken connection, and candlecast.db.check_connection (a round trip only when the idle socket
shows the server ended the connection). Prints figures; asserts nothing.
"""

import time
from collections.abc import Callable

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from candlecast import db
from infra.bench import percentile

ROUNDS, PER_ROUND = 100, 20
QUERY = "SELECT id FROM symbols WHERE ticker = %s"  # one small indexed read: a request's typical statement


def _pool(database_url: str, check) -> ConnectionPool:
    return ConnectionPool(database_url, min_size=1, max_size=1, check=check, configure=db._configure,
                          kwargs={"row_factory": dict_row}, open=True)


def _request(pool: ConnectionPool, retry_once: bool) -> None:
    for attempt in (1, 2):
        try:
            with pool.connection() as conn:
                conn.execute(QUERY, ("X:BTCUSDT",)).fetchone()
            return
        except psycopg.OperationalError:
            if not retry_once or attempt == 2:
                raise


POLICIES: dict[str, tuple[object, bool]] = {
    "check: a round trip on every checkout (before)": (ConnectionPool.check_connection, False),
    "no check; a request on a broken connection is retried once": (None, True),
    "check: round trip only if the idle socket is readable (kept)": (db.check_connection, False),
}


def bench_pool(database_url: str) -> dict[str, str]:
    pools = {name: _pool(database_url, check) for name, (check, _) in POLICIES.items()}
    samples: dict[str, list[float]] = {name: [] for name in POLICIES}
    try:
        for name, pool in pools.items():
            for _ in range(50):  # warm: past the prepare threshold
                _request(pool, POLICIES[name][1])
        for _ in range(ROUNDS):  # policies take turns, so a noisy neighbour slows each alike
            for name, pool in pools.items():
                for _ in range(PER_ROUND):
                    started = time.perf_counter()
                    _request(pool, POLICIES[name][1])
                    samples[name].append((time.perf_counter() - started) * 1000)
        figures = {f"{name}, checkout + query p50 / p99":
                   f"{percentile(taken, 0.5):.3f} / {percentile(taken, 0.99):.3f} ms"
                   for name, taken in samples.items()}
        for name, pool in pools.items():
            figures[f"{name}, first request after the server ended the connection"] = _after_termination(
                database_url, pool, lambda pool=pool, name=name: _request(pool, POLICIES[name][1]))
    finally:
        for pool in pools.values():
            pool.close()
    return figures


def _after_termination(database_url: str, pool: ConnectionPool, request: Callable[[], None]) -> str:
    with pool.connection() as conn:
        pid = conn.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.2)  # the server's goodbye reaches the idle socket
    started = time.perf_counter()
    try:
        request()
    except psycopg.OperationalError:
        return f"FAILS (a 503) after {(time.perf_counter() - started) * 1000:.1f} ms"
    return f"succeeds in {(time.perf_counter() - started) * 1000:.1f} ms"
