"""The pool's checkout check against a real server: a healthy idle connection is lent as it is, one the
server has ended is replaced before a request sees it. The server's own timeouts are set on every pooled
connection, and a transaction a frozen function leaves open is ended by the server. A session that refuses to
write is dropped, connections are renewed after MAX_LIFETIME_SECONDS, a database that refuses connections is a
503 at once (and is used again by itself when it is back), a busy pool is not taken for a dead one, and after a
restart the first request does not pause over the stale idle connections."""

import logging
import time

import psycopg
import pytest

from candlecast import db
from candlecast.errors import DatabaseUnavailable
from tests.conftest import reset_clients

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


def test_every_pooled_connection_carries_the_server_timeouts(one_connection):
    with db.connection() as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[name] for name in (
            "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")}
    assert shown == {"statement_timeout": "1s", "lock_timeout": "500ms", "idle_in_transaction_session_timeout": "5s"}


def test_pooled_sessions_are_in_utc_whatever_the_servers_zone(one_connection):
    """A server (or database) in another zone, as an embedded PostgreSQL started on a laptop outside UTC is: the
    session is UTC, so timestamps come back in UTC and SQL's months are UTC's."""
    from psycopg import sql

    with psycopg.connect(one_connection.database_url, autocommit=True) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]
        admin.execute(sql.SQL("ALTER DATABASE {} SET timezone = 'America/New_York'").format(sql.Identifier(name)))
        try:
            reset_clients()
            with db.connection() as conn:
                row = conn.execute("SELECT current_setting('TimeZone') AS zone, "
                                   "timestamptz '2026-03-01 00:00Z' + interval '1 month' AS next").fetchone()
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} RESET timezone").format(sql.Identifier(name)))
            reset_clients()
    assert row["zone"] == "UTC"
    assert row["next"].utcoffset().total_seconds() == 0
    assert row["next"].isoformat() == "2026-04-01T00:00:00+00:00"  # New York's months: 2026-04-01T04:00Z


def test_a_transaction_left_open_by_a_frozen_function_is_ended_by_the_server_and_the_pool_recovers(
        one_connection, monkeypatch):
    from tests.conftest import reset_clients

    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "0.5")
    reset_clients()
    # A function frozen mid-transaction holding a lock: taken from the pool without the watchdog (frozen with it).
    frozen = db.get_pool().getconn()
    # One query string: no idle moment before the lock is held, however slow this machine.
    locked = frozen.execute("BEGIN; SELECT pg_backend_pid() AS pid, pg_advisory_xact_lock(4242)", prepare=False)
    locked.nextset()
    pid = locked.fetchone()["pid"]
    with psycopg.connect(one_connection.database_url, autocommit=True) as admin:
        deadline = time.monotonic() + 30
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the server never ended the idle transaction"
            time.sleep(0.05)
        assert admin.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0]  # the lock is free again
        admin.execute("SELECT pg_advisory_unlock(4242)")
    # Thawed, the function finds its session ended by the server's timeout (not by anything of ours) ...
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        frozen.execute("SELECT 1")
    db.get_pool().putconn(frozen)
    # ... and the pool lends a new connection to the next request.
    assert backend_pid() != pid


# --- sessions that must not be lent again -------------------------------------------------------


def test_a_session_that_refuses_to_write_is_a_503_and_is_dropped_while_reads_go_on(one_connection):
    with db.connection() as conn:
        first = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        conn.execute("SET default_transaction_read_only = on")  # what a demoted writer's or a standby's session says
    with pytest.raises(DatabaseUnavailable), db.connection() as conn:
        conn.execute("CREATE TABLE read_only_probe (id int)")  # 25006 ReadOnlySqlTransaction
    # Not lent again, and no fail-fast pause: a read-only server still answers reads.
    assert backend_pid() != first


def test_a_lock_held_past_lock_timeout_is_a_503_that_does_not_start_an_outage(one_connection, caplog):
    # A migration's DDL holds a table: the statement queued behind it ends at lock_timeout (55P03), which psycopg
    # raises as an OperationalError, not as the QueryCanceled of statement_timeout.
    first = backend_pid()
    with psycopg.connect(one_connection.database_url) as migration:
        migration.execute("LOCK TABLE symbols IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING), pytest.raises(DatabaseUnavailable, match="in time"), \
                db.connection() as conn:
            conn.execute("SELECT count(*) FROM symbols")
    assert db._outage is None  # the server answered: no fail-fast pause for the next request
    assert not [record for record in caplog.records if record.getMessage().startswith("database down")]
    assert backend_pid() == first  # and the session, which is fine, is lent again


def test_a_pooled_connection_is_renewed_after_its_max_lifetime(one_connection, monkeypatch):
    monkeypatch.setattr(db, "MAX_LIFETIME_SECONDS", 0.3, raising=False)
    reset_clients()
    first = backend_pid()
    time.sleep(0.4)
    backend_pid()  # psycopg_pool retires an expired connection when it is given back
    assert backend_pid() != first


def test_a_busy_container_renewing_its_connection_never_holds_a_second(clean_db, monkeypatch):
    """Back-to-back invocations across many renewals: the one that finds the expired connection's replacement
    still opening waits for it instead of growing the pool, so a warm container holds one connection (the
    connection budget's count), with the defaults."""
    monkeypatch.setattr(db, "MAX_LIFETIME_SECONDS", 0.05, raising=False)
    reset_clients()
    sizes, pids = set(), set()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pids.add(backend_pid())
        sizes.add(db.get_pool().get_stats().get("pool_size", 0))
    assert len(pids) > 5  # it was renewed again and again
    assert sizes <= {0, 1}, sizes
    with psycopg.connect(clean_db.database_url, autocommit=True) as admin:
        held = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'candlecast'")
        assert held.fetchone()[0] <= 1
    reset_clients()


# --- a database that refuses connections: 503 at once, recovery by itself ------------------------


@pytest.fixture
def slow_pool_timeout(clean_db, monkeypatch):
    """A 5 s pool timeout: a 503 that comes in well under it did not wait for it."""
    monkeypatch.setenv("DB_POOL_TIMEOUT", "5")
    reset_clients()
    yield clean_db
    monkeypatch.undo()
    reset_clients()


def unavailable_after() -> float:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        backend_pid()
    return time.monotonic() - started


def test_a_database_that_refuses_connections_is_a_503_at_once_from_a_cold_start_on(
        slow_pool_timeout, monkeypatch, caplog):
    from infra.local_stack import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://candlecast@127.0.0.1:{free_port()}/candlecast")  # nothing there
    reset_clients()
    with caplog.at_level(logging.WARNING):
        waits = []
        for _ in range(5):
            waits.append(unavailable_after())
            time.sleep(0.6)  # past the first fail-fast pause: some of these try to connect again
    assert max(waits) < 2.5, waits  # none waited out the 5 s pool timeout (the figures: see the report)
    # psycopg_pool's warning for every failed attempt is not passed on; the outage is logged once, by its class.
    assert not [record for record in caplog.records if record.name.startswith("psycopg")
                and "error connecting" in record.getMessage()]
    down = [record for record in caplog.records if record.getMessage().startswith("database down")]
    assert len(down) == 1 and down[0].error == "OperationalError", [record.getMessage() for record in caplog.records]
    assert "127.0.0.1" not in " ".join(str(record.__dict__) for record in caplog.records)  # libpq's text stays out


def test_while_postgres_is_stopped_requests_answer_at_once_and_it_is_used_again_by_itself(
        slow_pool_timeout, needs_embedded_postgres):
    backend_pid()  # warm: an idle pooled connection
    needs_embedded_postgres.stop()
    try:
        waits = []
        for _ in range(4):
            waits.append(unavailable_after())
            time.sleep(0.6)
    finally:
        needs_embedded_postgres.start()
    started = time.monotonic()
    while True:  # nothing but requests: no reset, no new container
        try:
            backend_pid()
            break
        except DatabaseUnavailable:
            assert time.monotonic() - started < 5, "the pool did not use the database again by itself"
            time.sleep(0.1)
    assert max(waits) < 2.5, waits


# --- a busy pool is not a dead database ---------------------------------------------------------


def test_an_exhausted_pool_is_a_503_of_its_own_that_does_not_start_an_outage(one_connection, monkeypatch, caplog):
    monkeypatch.setenv("DB_POOL_TIMEOUT", "0.3")
    reset_clients()
    with caplog.at_level(logging.WARNING), db.connection() as held:  # the only connection, busy
        held.execute("SELECT 1")
        with pytest.raises(DatabaseUnavailable, match="busy"), db.connection():
            pass
    assert not [record for record in caplog.records if record.getMessage().startswith("database down")]
    assert db._outage is None  # no fail-fast pause for the next request
    backend_pid()  # the connection is free again, and the database was never down


# --- after a restart, stale idle connections cost no pause --------------------------------------


def test_after_the_server_ends_every_idle_connection_the_first_request_does_not_pause(clean_db, monkeypatch):
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "2")
    reset_clients()
    with db.connection() as one, db.connection() as two:
        pids = [conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"] for conn in (one, two)]
    assert db.get_pool().get_stats()["pool_available"] == 2
    with psycopg.connect(clean_db.database_url, autocommit=True) as admin:  # what a restart does to them
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    time.sleep(0.2)  # the server's goodbye reaches both idle sockets
    started = time.monotonic()
    assert backend_pid() not in pids  # not a 503
    # psycopg_pool would check the second stale connection too, then pause a second before looking again.
    assert time.monotonic() - started < db.get_pool().timeout / 2
