"""The pool's checkout check against a real server: a healthy idle connection is lent as it is, one the
server has ended is replaced before a request sees it."""

import time

import psycopg
import pytest

from candlecast import db

pytestmark = pytest.mark.integration


@pytest.fixture
def one_connection(clean_db, monkeypatch):
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "1")
    from tests.conftest import reset_clients

    reset_clients()
    yield clean_db
    reset_clients()


def backend_pid() -> int:
    with db.connection() as conn:
        return conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]


def test_a_healthy_idle_connection_is_reused(one_connection):
    assert backend_pid() == backend_pid()


def test_a_connection_the_server_ended_is_replaced_before_use(one_connection):
    first = backend_pid()
    with psycopg.connect(one_connection.database_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
    time.sleep(0.2)  # the server's goodbye reaches the idle socket
    second = backend_pid()  # no OperationalError: the check saw the readable socket and the pool reconnected
    assert second != first
