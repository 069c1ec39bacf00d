"""One psycopg_pool.ConnectionPool per container, opened lazily and reused across invocations.

Every use of a connection is bounded: PostgreSQL's statement_timeout and lock_timeout end slow work on
the server, and a client-side watchdog shuts the socket of a connection whose server stops answering
(a frozen server enforces no timeout of its own). While the database cannot be reached, requests answer 503
at once instead of each waiting out the pool timeout, and one is let through now and then to try it again.
"""

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import psycopg
from aws_lambda_powertools import Logger
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from candlecast import cache
from candlecast.config import DatabaseSettings, database_conninfo, get_settings
from candlecast.errors import CandlecastError, DatabaseUnavailable
from candlecast.repositories import stats

logger = Logger(child=True)
_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()
# While the database cannot be reached (a connection attempt or a request failed) and no connection is idle,
# requests answer 503 at once. After FAIL_FAST_SECONDS one may try again, and each time that fails the pause
# doubles, up to FAIL_FAST_MAX_SECONDS: a database that comes back is used again within that.
FAIL_FAST_SECONDS = 0.5
FAIL_FAST_MAX_SECONDS = 2.0
# The watchdog looks at its deadlines at least this often, and gives a block this much beyond its statement
# timeout (the server's own timeout, when it answers, comes first).
WATCHDOG_TICK_SECONDS = 0.25
WATCHDOG_MARGIN_SECONDS = 0.1
# psycopg_pool retries a failed connection attempt on its own schedule (after 1 s, 2 s, ... within this) while
# requests wait for it. With 0 it retries once at once and gives the slot back: the next request let through by
# the fail-fast pause makes the next attempt.
RECONNECT_SECONDS = 0.0
# A pooled connection is replaced after this long (psycopg_pool's default is an hour): a session that outlived a
# failover or a DNS change is not kept by a warm container (psycopg_pool retires it when it is given back).
MAX_LIFETIME_SECONDS = 300.0
# Sessions the server will not let write (25006: a writer during a failover, a standby) or that it is ending
# (57P01-57P03, class 08): never lent again. The pool replaces a connection closed before it is given back.
DISCARD_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03"})


class ConnectionFailed(psycopg.OperationalError):
    """What a request waiting for a new pooled connection gets when the attempt to open it failed."""


class _Outage:
    """The database could not be reached: since when, and when a request may try it again."""

    __slots__ = ("pause", "retry_at", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.pause = FAIL_FAST_SECONDS
        self.retry_at = now + self.pause


_outage: _Outage | None = None
_outage_lock = threading.Lock()


# What libpq's and the server's text says about why a connection failed, most specific first. The text itself is
# never logged (it names hosts, users and databases); the reason and the SQLSTATE are.
_REASONS = (
    ("server", ("the database system is", "too many connections", "remaining connection slots")),
    ("authentication", ("password authentication failed", "authentication failed", "no pg_hba.conf entry",
                        "role ", "password", "permission denied", "sasl", "scram")),
    ("config", ("database ", "invalid connection option", "invalid dsn", "invalid sslmode", "invalid port",
                "invalid integer value", "missing \"=\"")),
    ("timeout", ("timeout expired", "timed out", "timeout")),
    ("network", ("connection refused", "could not translate host name", "name or service not known",
                 "no route to host", "network is unreachable", "server closed the connection", "connection reset",
                 "could not connect", "is the server running", "ssl", "eof", "broken pipe",
                 "consuming input failed", "connection is lost", "closed")),
)
_SQLSTATE_REASONS = {"28": "authentication", "3D": "config", "08": "network", "57": "server", "53": "server"}


def failure_cause(error: BaseException) -> dict[str, str | None]:
    """Why the database failed, fit for a log line: the error's class, its SQLSTATE and a reason (authentication,
    config, timeout, network, server or unknown), never its text. A connection the server refused has no
    SQLSTATE in psycopg (libpq's message only): its text is classified, and dropped."""
    if isinstance(error, ConnectionFailed) and error.__cause__ is not None:  # the attempt's own error
        return failure_cause(error.__cause__)
    sqlstate = getattr(error, "sqlstate", None)
    reason = _SQLSTATE_REASONS.get((sqlstate or "")[:2])
    if reason is None and isinstance(error, PoolTimeout | psycopg.errors.ConnectionTimeout | TimeoutError):
        reason = "timeout"
    if reason is None:
        text = str(error).lower()
        reason = next((name for name, marks in _REASONS if any(mark in text for mark in marks)), "unknown")
    return {"error": type(error).__name__, "sqlstate": sqlstate, "reason": reason}


def _database_failed(error: Exception, during: str | None = None) -> None:
    """A connection attempt, or a request's use of the database (`during`: what failed), failed: an outage begins
    (logged once, with its cause), or, when this was the try after a pause, the next pause is twice as long."""
    global _outage
    now = time.monotonic()
    with _outage_lock:
        outage = _outage
        if outage is None:
            _outage = _Outage(now)
        elif now >= outage.retry_at:
            outage.pause = min(outage.pause * 2, FAIL_FAST_MAX_SECONDS)
            outage.retry_at = now + outage.pause
    if outage is None:  # its cause, classified: the server's and libpq's text names hosts and users
        logger.warning("database down: requests answer 503 at once until a connection succeeds",
                       extra={**failure_cause(error), **({"during": during} if during else {})})


def _database_answered() -> None:
    """A connection was opened, or a request's database work went through: the outage, if any, is over."""
    global _outage
    if _outage is None:
        return
    with _outage_lock:
        outage, _outage = _outage, None
    if outage is not None:
        logger.info("database up again", extra={"down_seconds": round(time.monotonic() - outage.since, 3)})


def _failing_fast() -> bool:
    """During an outage, until its pause is over, a request answers at once, unless a connection is idle (it may
    well work: the failure was a new connection's)."""
    outage = _outage
    if outage is None or time.monotonic() >= outage.retry_at:
        return False
    pool = _pool
    return pool is None or pool.get_stats()["pool_available"] == 0


def _fail_waiting_requests(cause: Exception) -> None:
    """psycopg_pool lets a request wait for a connection attempt that has already failed until its own timeout
    (the pool retries on its own schedule): tell the waiting requests at once instead. The pool has no public call
    for this; its queue of waiting clients (`_waiting`, each with `fail()`) is used as psycopg_pool 3.3 has it
    (pinned in layers/constraints.txt; tests/test_db_pool.py fails if a new version waits again)."""
    pool = _pool
    waiting = getattr(pool, "_waiting", None)
    if pool is None or waiting is None:
        return
    with pool._lock:
        clients = list(waiting)
    for client in clients:
        failure = ConnectionFailed("the connection attempt failed")
        failure.__cause__ = cause
        client.fail(failure)


class _PoolConnection(psycopg.Connection):
    """The pool opens its connections with this: each attempt starts or ends an outage, and a failed one is
    answered at once to the requests waiting for it."""

    @classmethod
    def connect(cls, *args, **kwargs):
        try:
            conn = super().connect(*args, **kwargs)
        except psycopg.Error as error:
            _database_failed(error)
            _fail_waiting_requests(error)
            raise
        _database_answered()
        return conn


class _OnePerOutage(logging.Filter):
    """psycopg_pool warns through the root logger on every failed connection attempt (about twice a second while
    the database is down); _database_failed logs the outage once, with its cause, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("error connecting in", "reconnection attempt in pool"))


if not any(type(each).__name__ == _OnePerOutage.__name__ for each in logging.getLogger("psycopg.pool").filters):
    logging.getLogger("psycopg.pool").addFilter(_OnePerOutage())


class _WatchedCursor(psycopg.Cursor):
    """Each statement restarts its connection's watchdog: a long block of quick statements is fine, one
    statement (or pipeline) the server stops answering is not."""

    def execute(self, *args, **kwargs):
        _watchdog.rearm(self.connection)
        return super().execute(*args, **kwargs)

    def executemany(self, *args, **kwargs):
        _watchdog.rearm(self.connection)
        return super().executemany(*args, **kwargs)


def _configure(conn: psycopg.Connection) -> None:
    conn.cursor_factory = _WatchedCursor
    conn.prepare_threshold = get_settings().db_prepare_threshold
    # Reads need no BEGIN/COMMIT round trips; writes that span statements use conn.transaction().
    conn.autocommit = True
    _follow_history(conn)


def _follow_history(conn: psycopg.Connection) -> None:
    """A restored database (or one restarted, or failed over) invalidates the caches once: what they hold may
    describe rows it no longer has (`cache.follow_database`). One query and one Redis GET per new connection."""
    try:
        with _deadline(conn):
            identity = stats.database_identity(conn)
    except psycopg.Error:  # the pool's checkout check deals with a connection this broke
        return
    cache.follow_database(identity)


def _server_options() -> str:
    """The server ends a statement, a lock wait, and a transaction left open between statements (a function
    frozen or killed mid-transaction, whose watchdog is frozen too) by itself. Sessions are in UTC whatever the
    server's zone (an embedded one takes the machine's): timestamps come back in UTC, and SQL's calendar
    arithmetic (`+ interval '1 month'`) is done on UTC's months."""
    settings = get_settings()
    statement_ms = int(settings.db_statement_timeout * 1000)
    idle_ms = int(settings.db_idle_in_transaction_timeout * 1000)
    return (f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms // 2} "
            f"-c idle_in_transaction_session_timeout={idle_ms} -c TimeZone=UTC")


CHECK_SECONDS = 0.5  # an empty query answers in a millisecond when the server is there at all


def check_connection(conn: psycopg.Connection) -> None:
    """The pool's check before it lends a connection, without a round trip in the usual case.

    An idle connection receives nothing unless the server ends it (a restart, a failover, an idle timeout,
    pg_terminate_backend): then its socket is readable, and only then is a real round trip made (bounded
    by the watchdog), which raises and makes the pool open a new connection. `make bench` measures this
    against a round trip on every checkout and against retrying once on a broken connection.

    A connection the server has ended is taken to mean it ended the others too (a restart, a failover): the idle
    ones are dropped with it (pool.drain(), which opens new ones), so psycopg_pool does not check them one by one
    and pause a second after the second failed check. One backend ended alone costs its idle siblings a reconnect.
    """
    try:
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        if readable:
            with _deadline(conn, CHECK_SECONDS):
                ConnectionPool.check_connection(conn)
    except Exception:
        pool = _pool
        if pool is not None:
            pool.drain()
        raise


def get_pool() -> ConnectionPool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                settings = get_settings()
                _pool = ConnectionPool(
                    database_conninfo(settings),
                    connection_class=_PoolConnection,
                    min_size=0,
                    max_size=settings.db_pool_max_size,
                    timeout=settings.db_pool_timeout,
                    reconnect_timeout=RECONNECT_SECONDS,
                    max_lifetime=MAX_LIFETIME_SECONDS,
                    check=check_connection,
                    configure=_configure,
                    kwargs={"row_factory": dict_row, "connect_timeout": 2, "application_name": "candlecast",
                            "options": _server_options()},
                    name="candlecast",
                    open=True,
                )
    return _pool


def close_pool() -> None:
    global _pool, _outage
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None
        _outage = None


def _shut_socket(conn: psycopg.Connection) -> None:
    """Unblock whoever waits on this connection: its socket reads end-of-file, psycopg raises
    OperationalError, and the pool discards the connection."""
    with contextlib.suppress(Exception):
        sock = socket.socket(fileno=conn.fileno())
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the descriptor stays psycopg's


class _Watchdog:
    """One daemon thread that shuts the sockets of connections held past their deadline (a thread per
    use would cost ~0.3 ms; arming this costs a lock and a dict entry)."""

    def __init__(self) -> None:
        self._deadlines: dict[int, tuple[float, float, psycopg.Connection]] = {}  # deadline, limit, conn
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, conn: psycopg.Connection, seconds: float) -> int:
        with self._wake:
            token = id(conn)
            self._deadlines[token] = (time.monotonic() + seconds, seconds, conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self._thread.start()
            return token

    def rearm(self, conn: psycopg.Connection) -> None:
        with self._wake:
            entry = self._deadlines.get(id(conn))
            if entry is not None:
                self._deadlines[id(conn)] = (time.monotonic() + entry[1], entry[1], conn)

    def disarm(self, token: int) -> None:
        with self._wake:
            self._deadlines.pop(token, None)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                for token, (deadline, _, conn) in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[token]
                        _shut_socket(conn)
                soonest = min((deadline for deadline, _, _ in self._deadlines.values()), default=now + 1.0)
                self._wake.wait(min(WATCHDOG_TICK_SECONDS, max(0.01, soonest - now)))


_watchdog = _Watchdog()


@contextmanager
def _deadline(conn: psycopg.Connection, seconds: float | None = None) -> Iterator[None]:
    """Shut the connection's socket if, `seconds` after the block or its latest statement started, it is still
    running: a server that has stopped answering (frozen, or its host gone) would otherwise hold the request
    until Lambda's timeout."""
    if seconds is None:
        seconds = get_settings().db_statement_timeout + WATCHDOG_MARGIN_SECONDS
    token = _watchdog.arm(conn, seconds)
    try:
        yield
    finally:
        _watchdog.disarm(token)


def longest_wait(settings: DatabaseSettings) -> float:
    """The longest a request's database work holds it when the server stops answering: the wait for a pooled
    connection, or a statement's deadline as the watchdog enforces it (`make faults` checks against this)."""
    return max(settings.db_pool_timeout,
               settings.db_statement_timeout + WATCHDOG_MARGIN_SECONDS + WATCHDOG_TICK_SECONDS)


def _logged(error: DatabaseUnavailable) -> DatabaseUnavailable:
    """`error`, marked as one whose cause is in the log already (the API logs no second line for it)."""
    error.logged = True
    return error


def _unavailable(error: Exception, what: str) -> DatabaseUnavailable:
    """The 503 for a failed connection or request. Its cause is logged once per outage, by _database_failed (with
    `what` when a request saw it first): a line per request, or per failed retry, repeated the same cause (the
    audit's first request logged 'database down', 'database pool timeout' and 'request failed')."""
    _database_failed(error, what)
    _reread_credentials()  # a rotated password: a new pool, and no fail-fast pause
    return _logged(DatabaseUnavailable("the database is unavailable; try again shortly"))


# Credentials from Secrets Manager are read again at most this often while connecting fails.
REREAD_CREDENTIALS_SECONDS = 30.0
_credentials_read_at = 0.0


def _reread_credentials() -> None:
    """After a failure, with credentials from Secrets Manager: read the secret again (at most every 30 s), and
    when it has changed (a rotation) open a new pool with it. The pool's connection string is fixed when it is
    made; without this a rotated password would fail every new connection until the container is replaced."""
    global _credentials_read_at
    settings = get_settings()
    if settings.db_secret_arn is None or time.monotonic() - _credentials_read_at < REREAD_CREDENTIALS_SECONDS:
        return
    _credentials_read_at = time.monotonic()
    try:
        fresh = database_conninfo(settings, refresh=True)
    except CandlecastError:  # Secrets Manager failing too: the next failure after the interval asks again
        return
    if _pool is not None and fresh != _pool.conninfo:
        logger.warning("database credentials changed; opening a new pool")
        close_pool()


_batch_budget: ContextVar[float | None] = ContextVar("db_batch_budget", default=None)


@contextmanager
def batch(seconds: float) -> Iterator[None]:
    """Within this block every `connection()` is batch work: `seconds` per statement and to get a connection
    (seeding, scoring a backlog), not a request's DB_STATEMENT_TIMEOUT."""
    token = _batch_budget.set(seconds)
    try:
        yield
    finally:
        _batch_budget.reset(token)


def _must_discard(error: psycopg.Error) -> bool:
    sqlstate = error.sqlstate or ""
    return sqlstate in DISCARD_SQLSTATES or sqlstate.startswith("08")


# Connections lent by connection() and not yet given back: when they are all the pool may have, a pool timeout
# means the pool is busy, not that the database is down.
_in_use = 0
_in_use_lock = threading.Lock()


def _count_in_use(change: int) -> None:
    global _in_use
    with _in_use_lock:
        _in_use += change


def _exhausted(pool: ConnectionPool) -> bool:
    return _in_use >= pool.max_size


@contextmanager
def _checked_out(budget: float | None) -> Iterator[psycopg.Connection]:
    """pool.connection(), except that a session the server will not let write, or is ending, is closed before
    it goes back: the pool then drops it instead of lending it again (an hour later, by default)."""
    pool = get_pool()
    try:
        conn = pool.getconn(timeout=budget)
    except PoolTimeout as error:
        if _exhausted(pool):
            raise _PoolExhausted from error
        raise
    _count_in_use(1)
    try:
        with conn, _deadline(conn, budget):
            yield conn
    except psycopg.Error as error:
        if _must_discard(error):
            conn.close()
        raise
    finally:
        _count_in_use(-1)
        pool.putconn(conn)


class _PoolExhausted(Exception):
    """Every connection the pool may have is lent out, and none came back in time."""


@contextmanager
def connection(budget: float | None = None) -> Iterator[psycopg.Connection]:
    """A pooled autocommit connection for one short piece of database work (never hold it across a call
    to storage or an upstream). An unreachable or stalled database becomes DatabaseUnavailable (503), and
    so does one that will not write (read-only during a failover, or a standby).

    The block gets DB_STATEMENT_TIMEOUT seconds; batch work (seed, ingest) passes a larger `budget`,
    which also raises the server's statement_timeout for the block.
    """
    budget = budget if budget is not None else _batch_budget.get()
    if budget is None and _failing_fast():  # the outage's cause was logged when it began
        raise _logged(DatabaseUnavailable("the database is unavailable; try again shortly"))
    try:
        with _checked_out(budget) as conn:
            if budget is None:
                yield conn
            else:
                conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(budget * 1000)}ms",))
                try:
                    yield conn
                finally:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("RESET statement_timeout")
    except _PoolExhausted as error:  # the database is fine (no fail-fast pause), this container is busy
        logger.warning("database pool exhausted: every connection is in use")
        raise _logged(DatabaseUnavailable("every database connection is busy; try again shortly")) from error.__cause__
    except PoolTimeout as error:
        raise _unavailable(error, "database pool timeout") from error
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as error:  # statement_timeout (57014)
        # or lock_timeout (55P03, an OperationalError): the server answered, so no fail-fast pause
        logger.warning("database statement timed out", extra={"sqlstate": error.sqlstate})
        raise _logged(DatabaseUnavailable("the database did not answer in time; try again shortly")) from error
    except psycopg.errors.ReadOnlySqlTransaction as error:  # it answers (reads work): no fail-fast pause
        logger.warning("database is read-only (a failover, or a standby); the session is dropped")
        raise _logged(DatabaseUnavailable("the database does not accept writes at the moment; try again shortly")) \
            from error
    except ConnectionFailed as error:  # the connection attempt this request waited for
        raise _unavailable(error, "database connection failed") from error
    except psycopg.OperationalError as error:
        raise _unavailable(error, "database operational error") from error
    else:
        _database_answered()
