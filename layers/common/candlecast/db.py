"""One psycopg_pool.ConnectionPool per container, opened lazily and reused across invocations."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from aws_lambda_powertools import Logger
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from candlecast.config import database_conninfo, get_settings
from candlecast.errors import DatabaseUnavailable

logger = Logger(child=True)
_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()


def _configure(conn: psycopg.Connection) -> None:
    conn.prepare_threshold = get_settings().db_prepare_threshold
    # Reads need no BEGIN/COMMIT round trips; writes that span statements use conn.transaction().
    conn.autocommit = True


def get_pool() -> ConnectionPool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                settings = get_settings()
                _pool = ConnectionPool(
                    database_conninfo(settings),
                    min_size=0,
                    max_size=settings.db_pool_max_size,
                    timeout=settings.db_pool_timeout,
                    reconnect_timeout=30,
                    check=ConnectionPool.check_connection,
                    configure=_configure,
                    kwargs={"row_factory": dict_row, "connect_timeout": 2, "application_name": "candlecast"},
                    name="candlecast",
                    open=True,
                )
    return _pool


def close_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


@contextmanager
def connection() -> Iterator[psycopg.Connection]:
    """A pooled autocommit connection; an unreachable database becomes DatabaseUnavailable."""
    try:
        with get_pool().connection() as conn:
            yield conn
    except PoolTimeout as error:
        logger.warning("database pool timeout", extra={"error": str(error)})
        raise DatabaseUnavailable("the database is unavailable; try again shortly") from error
    except psycopg.OperationalError as error:
        logger.warning("database operational error", extra={"error": str(error)})
        raise DatabaseUnavailable("the database is unavailable; try again shortly") from error
