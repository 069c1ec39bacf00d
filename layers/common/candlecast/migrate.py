"""Apply yoyo migrations one run at a time, each run bounded in time and in how long it can block others.

- One run at a time: a PostgreSQL session-level advisory lock (MIGRATION_LOCK_KEY), held on the run's own
  connection. The server releases it when that session ends, so a run that was killed or lost its server
  leaves no lock behind. Another run waits for it until its deadline (or LOCK_WAIT_SECONDS), then applies
  what is still pending: usually nothing.
- Each migration and its row in _yoyo_migration commit in one transaction on that connection: a run that is
  cancelled, killed or cut off leaves both or neither.
- The connection's lock_timeout (DDL_LOCK_TIMEOUT_SECONDS) ends a statement queued for a lock behind another
  transaction before the queue blocks every reader of the table; the migration is tried again, LOCK_ATTEMPTS
  times in all within the deadline.
- A Deadline sets statement_timeout just under the time left, and Deadline.cancel() (from another thread)
  cancels the running statement and lets no further migration start or commit. idle_in_transaction and
  idle_session timeouts end a run whose client was frozen or lost (a Lambda sandbox frozen after answering).

Nothing fails silently: a missing or empty migrations folder, yoyo's own tables found incomplete (a partial
restore), a migration that cannot be applied (named), and a lock still held when the run must give up each
raise MigrationError with a one-line reason.

mark_applied records migrations as applied without running them, under the same lock: the way out when
_yoyo_migration is older than the schema (restored from another backup), which a re-apply's "already exists"
error points at.
"""

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

logger = logging.getLogger(__name__)

# pg_advisory_lock's key for "a migration run is in progress" (one bigint, any value no other code uses).
MIGRATION_LOCK_KEY = 5303853331250992063
LOCK_WAIT_SECONDS = 300.0  # how long a run without a deadline (the CLI) waits for another run to finish
LOCK_POLL_SECONDS = 0.25
LOCK_GIVE_UP_EARLY_SECONDS = 1.0  # a run with a deadline stops waiting for the lock this long before it
DDL_LOCK_TIMEOUT_SECONDS = 2.0  # lock_timeout: how long one statement may queue for a lock (and readers behind it)
LOCK_ATTEMPTS = 5  # tries of a migration whose statement gave up waiting for a lock
LOCK_RETRY_PAUSE_SECONDS = 2.0  # before the second try; the third waits twice as long, and so on
STATEMENT_MARGIN_SECONDS = 0.5  # statement_timeout is the time left before the deadline, less this (or half)
IDLE_IN_TRANSACTION_SECONDS = 10.0  # idle_in_transaction_session_timeout: a frozen client's open transaction
IDLE_SESSION_SECONDS = 60.0  # idle_session_timeout: a frozen client's session (and its advisory lock)
APPLICATION_NAME = "candlecast-migrate"


class MigrationError(RuntimeError):
    """A migration run that must not count as done; the message names the folder or the migration."""


class Cancelled(MigrationError):
    """The run was cancelled (its deadline passed) before it was done."""


class Deadline:
    """When a run must be over (None: no limit), and its cancellation from another thread."""

    def __init__(self, seconds: float | None = None):
        self.at = None if seconds is None else time.monotonic() + seconds
        self._cancelled = threading.Event()
        self._connection = None
        self._guard = threading.Lock()

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self, before: str) -> None:
        if self._cancelled.is_set():
            raise Cancelled(f"cancelled at its deadline before {before}")

    def sleep(self, seconds: float) -> None:
        self._cancelled.wait(max(seconds, 0.0))

    def statement_timeout_ms(self) -> int:
        """statement_timeout for the next statement: just under the time left (0, PostgreSQL's "none")."""
        remaining = self.remaining()
        if remaining is None:
            return 0
        return max(int((remaining - min(STATEMENT_MARGIN_SECONDS, remaining / 2)) * 1000), 1)

    def attach(self, connection) -> None:
        with self._guard:
            self._connection = connection
        self.check("connecting")

    def cancel(self) -> None:
        """Refuse any further migration or commit, and cancel the statement running now (its transaction
        rolls back). Idempotent: call it again to catch a statement that started since."""
        self._cancelled.set()
        with self._guard:
            connection = self._connection
        if connection is not None and not connection.closed:
            try:
                connection.cancel_safe(timeout=2.0)
            except Exception as error:  # the server is unreachable: its timeouts end the statement
                logger.warning("could not cancel the migration's statement: %s", error)


def migrations_dir() -> Path:
    """MIGRATIONS_DIR, else migrations/ beside the running function (Lambda), else the repository's."""
    if configured := os.environ.get("MIGRATIONS_DIR"):
        return Path(configured)
    candidates = (Path(os.environ.get("LAMBDA_TASK_ROOT", "/nonexistent")) / "migrations",
                  Path(__file__).resolve().parents[3] / "migrations")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no migrations folder at {' or '.join(map(str, candidates))}; set MIGRATIONS_DIR")


def _check_folder(directory: Path) -> Path:
    if not directory.is_dir():
        kind = "is not a folder" if directory.exists() else "does not exist"
        raise MigrationError(f"the migrations folder {directory} {kind} (a checkout without symlinks?)")
    if not any(directory.glob("*.sql")) and not any(directory.glob("*.py")):
        raise MigrationError(f"the migrations folder {directory} holds no migrations")
    return directory


def migrations_hash(directory: Path) -> str:
    """sha256 over every migration file's relative path and bytes, in path order: template.yaml's
    DbMigration.MigrationsHash (`make migrations-hash`), and what the Migrate function compares it with."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    )
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def bundled_hash(directory: Path | None = None) -> str:
    """migrations_hash of the folder this code applies; a missing or empty folder is an error that names it."""
    return migrations_hash(_check_folder(Path(directory or migrations_dir())))


def yoyo_url(conninfo: str) -> str:
    """A yoyo URI (postgresql+psycopg://…) for any libpq conninfo or URL, unix sockets included."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    user = quote(str(params.pop("user", "")), safe="")
    password = quote(str(params.pop("password", "")), safe="")
    host = str(params.pop("host", ""))
    port = params.pop("port", None)
    dbname = quote(str(params.pop("dbname", "")), safe="")
    netloc = user + (f":{password}" if password else "") + ("@" if user else "")
    if host and not host.startswith("/"):
        netloc += (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")  # an IPv6 literal
    else:
        if host:
            params["host"] = host
        if port:
            params["port"] = port
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql+psycopg://{netloc}/{dbname}{query}"


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[str]
    pending: list[str]
    unknown: list[str]  # applied in the database, not in this checkout's folder (a newer release's)

    def as_dict(self) -> dict:
        return {"applied": self.applied, "pending": self.pending, "unknown": self.unknown}


def read(directory: Path | None = None):
    """The migrations in the folder; a missing or empty folder is an error that names it."""
    from yoyo import read_migrations

    directory = _check_folder(Path(directory or migrations_dir()))
    migrations = read_migrations(str(directory))
    if len(migrations) == 0:
        raise MigrationError(f"the migrations folder {directory} holds no migrations")
    for migration in migrations:
        migration.load()
        if not migration.use_transactions:  # yoyo runs those on a second connection, outside the lock and deadline
            raise MigrationError(f"migration {migration.id} is not transactional (`-- transactional: false`): "
                                 "every migration runs in the run's transaction, under its lock and deadline")
    return migrations


def server_options(deadline: Deadline | None = None) -> str:
    """As db.py's pool does: the server itself ends a statement past the deadline, a lock wait, and a
    transaction or session left idle by a client that was frozen or lost; the session is in UTC, as RDS is,
    whatever an embedded server's zone (a migration's `now() - interval '45 days'`, the dates its errors name)."""
    statement_ms = (deadline or Deadline()).statement_timeout_ms()
    return (f"-c statement_timeout={statement_ms} -c lock_timeout={int(DDL_LOCK_TIMEOUT_SECONDS * 1000)} "
            f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_SECONDS * 1000)} "
            f"-c idle_session_timeout={int(IDLE_SESSION_SECONDS * 1000)} -c TimeZone=UTC")


# libpq waits this long for a connection, its handshake and authentication. Without it a server that accepts
# the TCP connection and never answers (stopped, overloaded, a proxy with no backend) held the migration until
# the kernel gave up: the custom resource answered FAILED after 130 s. The request pool allows 2 s (db.py); a
# migration, run once per deploy, can wait a little longer for a busy server.
CONNECT_TIMEOUT_SECONDS = 10
MIN_CONNECT_TIMEOUT_SECONDS = 2  # libpq treats anything lower as 2


def connect_timeout_seconds(deadline: Deadline | None = None) -> int:
    """connect_timeout for a migration's connection: CONNECT_TIMEOUT_SECONDS, or less when the deadline is closer."""
    remaining = deadline.remaining() if deadline is not None else None
    if remaining is None:
        return CONNECT_TIMEOUT_SECONDS
    return max(MIN_CONNECT_TIMEOUT_SECONDS, min(CONNECT_TIMEOUT_SECONDS, int(remaining)))


def _backend(conninfo: str, deadline: Deadline | None = None):
    """yoyo's psycopg 3 backend, connected with server_options, without finding the class among every
    installed distribution's entry points (a scan of sys.path: about a tenth of a cold start)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
    from yoyo.connections import parse_uri
    from yoyo.migrations import default_migration_table

    given = conninfo_to_dict(conninfo)
    options = " ".join(filter(None, (str(given.get("options") or ""), server_options(deadline))))
    conninfo = make_conninfo(conninfo, options=options, application_name=given.get("application_name")
                             or APPLICATION_NAME, connect_timeout=given.get("connect_timeout")
                             or connect_timeout_seconds(deadline))
    return PostgresqlPsycopgBackend(parse_uri(yoyo_url(conninfo)), default_migration_table)


def connect(conninfo: str, deadline: Deadline | None = None):
    """yoyo's backend, connected and initialised as yoyo.get_backend does."""
    backend = _backend(conninfo, deadline)
    try:
        _check_bookkeeping(backend)
        backend.init_database()
    except BaseException:
        backend.connection.close()
        raise
    return backend


YOYO_TABLES = ("_yoyo_migration", "_yoyo_log", "_yoyo_version")  # yoyo's record of what is applied, and its log

# Beside yoyo's tables: the stage whose runs migrate this database, recorded by the first run that names one (the
# Migrate function and `candlecast migrate` do). Two stages' stacks reaching one database (a secret without
# `dbname` puts every stage in "candlecast") share its tables: one stage's Retention deletes the other's
# predictions, its deploy migrates the other's schema, its seed changes the other's active models. A run of
# another stage is refused before it changes anything.
STAGE_TABLE = "_candlecast_stage"


def _claim_stage(connection, stage: str, *, take_over: bool) -> None:
    """Record `stage` as the database's when none is (or, with `take_over`, instead of another); raise
    MigrationError when another stage's runs migrate it. Under the run lock, so two first runs cannot both claim."""
    connection.execute(f"CREATE TABLE IF NOT EXISTS {STAGE_TABLE} (single boolean PRIMARY KEY DEFAULT true "
                       "CHECK (single), stage text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now())")
    row = connection.execute(f"SELECT stage, claimed_at FROM {STAGE_TABLE}").fetchone()
    if row is not None and row[0] == stage:
        return
    if row is not None and not take_over:
        raise MigrationError(
            f"this database is stage {row[0]!r}'s (its runs have migrated it since {row[1]:%Y-%m-%d}), not "
            f"{stage!r}'s: nothing was changed. Two stages sharing one database share its tables (each one's "
            f"Retention, migrations and seed act on the other's data): give stage {stage!r} a database of its own "
            "(`dbname` in its secret). If this database was restored from a backup of stage "
            f"{row[0]!r} for {stage!r} to use, record it as {stage!r}'s with `STAGE={stage} candlecast migrate "
            "--take-over` (README, \"Restoring from a backup\")")
    connection.execute(f"INSERT INTO {STAGE_TABLE} (stage) VALUES (%s) ON CONFLICT (single) "
                       "DO UPDATE SET stage = EXCLUDED.stage, claimed_at = now()", (stage,))
    if row is not None:
        logger.warning("the database was stage %r's; it is now stage %r's (--take-over)", row[0], stage)


def _check_bookkeeping(backend) -> None:
    """yoyo's tables are all there (a migrated database) or none is (a new one): yoyo creates all three when
    _yoyo_migration or _yoyo_version is missing, and with some of them left (a partial restore, a dropped table)
    it failed with psycopg's DuplicateTable, or wrote no log. Raised before anything is changed."""
    tables = set(backend.list_tables())  # what yoyo reads to decide what to create (the current schema's)
    present = [name for name in YOYO_TABLES if name in tables]
    if not present or len(present) == len(YOYO_TABLES):
        return
    missing = [name for name in YOYO_TABLES if name not in present]
    raise MigrationError(
        f"yoyo's bookkeeping is incomplete: {', '.join(missing)} missing while {', '.join(present)} "
        f"{'is' if len(present) == 1 else 'are'} there (a partial restore, or a dropped table); nothing was changed. "
        f"Restore {', '.join(missing)} from the backup the schema came from; without one, rename "
        f"{', '.join(present)} away (yoyo recreates all three) and record the migrations the schema holds with "
        "`candlecast migrate --mark-applied <last migration the schema holds>` (README, \"Restoring from a backup\")"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _set_statement_timeout(backend, deadline: Deadline) -> None:
    if deadline.at is not None:
        backend.connection.execute("SELECT set_config('statement_timeout', %s, false)",
                                   (str(deadline.statement_timeout_ms()),))


def _run_one(backend, migration, deadline: Deadline, direction: Literal["apply", "rollback"]) -> None:
    """The migration's steps (or its rollback's) and the record of it in _yoyo_migration (and _yoyo_log) in one
    transaction on the run's connection, under its lock and deadline. yoyo's apply_one and rollback_one commit the
    two apart, the steps on a second connection: a rollback ended between them left the migration recorded as
    applied without its tables."""
    what = f"migration {migration.id}" if direction == "apply" else f"rollback of {migration.id}"
    deadline.check(what)
    migration.load()
    _set_statement_timeout(backend, deadline)
    with backend.transaction():
        migration.process_steps(backend, direction)
        if direction == "apply":
            backend.mark_one(migration, log=False)
        else:
            backend.unmark_one(migration, log=False)
        backend.log_migration(migration, direction)
        deadline.check(f"{what} committed")  # raising here rolls it back


def _already_there(error: BaseException) -> str:
    """For an "already exists" error: the schema may be newer than _yoyo_migration, and the way to record that."""
    from psycopg import errors

    if not isinstance(error, (errors.DuplicateTable, errors.DuplicateObject, errors.DuplicateColumn,
                              errors.DuplicateFunction, errors.DuplicateSchema)):
        return ""
    return ("; if the schema already holds this migration (_yoyo_migration restored older than the schema), record "
            "it and those before it as applied, without running them: `candlecast migrate --mark-applied "
            "<last migration the schema holds>` (README, \"Restoring from a backup\")")


def _apply_with_retries(backend, migration, deadline: Deadline, applied: list[str]) -> None:
    """Apply one migration, again while its statements give up waiting for a lock (LockNotAvailable: another
    transaction holds one it needs) and the deadline leaves time; a failure names the migration."""
    from psycopg import OperationalError
    from psycopg.errors import LockNotAvailable

    def failed(error: BaseException, detail: str = "") -> MigrationError:
        while isinstance(error, OperationalError) and isinstance(error.__context__, OperationalError):
            error = error.__context__  # a ROLLBACK on a connection the server ended: report why it ended
        return MigrationError(
            f"migration {migration.id} failed: {detail}{type(error).__name__}: {_first_line(error)} "
            f"(applied before it in this run: {applied or 'none'}; it was rolled back){_already_there(error)}"
        )

    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            _run_one(backend, migration, deadline, "apply")
            return
        except Cancelled as error:
            raise failed(error) from error
        except LockNotAvailable as error:
            pause = LOCK_RETRY_PAUSE_SECONDS * attempt
            remaining = deadline.remaining()
            out_of_time = remaining is not None and remaining < pause + DDL_LOCK_TIMEOUT_SECONDS
            if attempt == LOCK_ATTEMPTS or out_of_time:
                raise failed(error, f"it waited for a lock {attempt} time(s), {DDL_LOCK_TIMEOUT_SECONDS:g} s "
                                    "each (lock_timeout), while another transaction held it; ") from error
            logger.warning("migration %s waited %g s for a lock; trying again in %g s (attempt %d of %d)",
                           migration.id, DDL_LOCK_TIMEOUT_SECONDS, pause, attempt, LOCK_ATTEMPTS)
            deadline.sleep(pause)
        except Exception as error:
            raise failed(error) from error


def _apply_each(backend, pending, deadline: Deadline) -> list[str]:
    """Apply one by one, so a failure names its migration."""
    applied: list[str] = []
    for migration in pending:
        _apply_with_retries(backend, migration, deadline, applied)
        applied.append(migration.id)
    if pending:
        backend.run_post_apply(pending)
    return applied


def _lock_holder(connection) -> str:
    """Who holds the migration lock, as far as the catalog says in the time left; else "another run"."""
    from psycopg import Error

    try:
        row = connection.execute(
            """
            SELECT a.pid, a.application_name, round(extract(epoch FROM now() - a.backend_start))
            FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND l.classid::bigint = %s AND l.objid::bigint = %s
            """, (MIGRATION_LOCK_KEY >> 32, MIGRATION_LOCK_KEY & 0xFFFFFFFF)).fetchone()
    except Error as error:  # e.g. the deadline's statement timeout: the error still says the lock is held
        logger.warning("could not read who holds the migration lock: %s", _first_line(error))
        return "another run"
    if row is None:
        return "another run"
    return f"another run (pid {row[0]}, {row[1] or 'no application_name'}, connected {row[2]} s ago)"


@contextmanager
def _run_lock(backend, deadline: Deadline):
    """The advisory lock, waited for until the deadline (else LOCK_WAIT_SECONDS). Released on the way out;
    if that fails (the connection is gone) the server has released it with the session, and the error
    that ended the run, naming its migration, is the one raised."""
    connection = backend.connection
    started = time.monotonic()
    remaining = deadline.remaining()
    # Before the deadline, so the answer names the lock's holder rather than a cancelled wait.
    give_up_at = started + (LOCK_WAIT_SECONDS if remaining is None else max(remaining - LOCK_GIVE_UP_EARLY_SECONDS,
                                                                             0.0))
    while True:
        deadline.check("taking the migration lock")
        if connection.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()[0]:
            break
        if time.monotonic() >= give_up_at:
            raise MigrationError(f"the migration lock is held by {_lock_holder(connection)}: waited "
                                 f"{time.monotonic() - started:.0f} s for it to finish")
        deadline.sleep(min(LOCK_POLL_SECONDS, max(give_up_at - time.monotonic(), 0.0)))
    try:
        yield
    finally:
        try:
            connection.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        except Exception as error:
            logger.warning("could not release the migration lock (the session is gone, and the lock with it): %s",
                           _first_line(error))


@contextmanager
def _locked_run(conninfo: str, directory: Path | None, deadline: Deadline | None, stage: str | None = None,
                take_over: bool = False):
    """yoyo's backend and the migrations, under the advisory lock, with yoyo initialised inside it; with a
    `stage`, only when the database is that stage's (or no stage's yet: then it becomes `stage`'s)."""
    deadline = deadline or Deadline()
    migrations = read(directory)  # before connecting: a missing folder is the first thing to hear about
    backend = _backend(conninfo, deadline)
    try:
        deadline.attach(backend.connection)
        with _run_lock(backend, deadline):
            _check_bookkeeping(backend)
            backend.init_database()
            # yoyo's own row lock, taken here only by yoyo's internal-schema upgrade, is left only by a run that
            # was killed (older releases took it for every run): nobody else can be migrating now.
            backend.connection.execute(f"DELETE FROM {backend.lock_table_quoted}")
            if stage is not None:
                _claim_stage(backend.connection, stage, take_over=take_over)
            yield backend, migrations
    finally:
        backend.connection.close()


def _unknown_applied(backend, migrations) -> list[str]:
    """Ids applied in the database, in the order applied, that `migrations` does not hold."""
    known = {migration.id for migration in migrations}
    backend.ensure_internal_schema_updated()  # yoyo's own tables, as get_applied_migration_hashes makes sure of
    sql = backend.format_sql("SELECT {quoted.migration_id} FROM {0.migration_table_quoted} "
                             "ORDER BY {quoted.applied_at_utc}")
    return [row[0] for row in backend.execute(sql).fetchall() if row[0] not in known]


def apply(conninfo: str, directory: Path | None = None, *, deadline: Deadline | None = None, stage: str | None = None,
          take_over: bool = False) -> list[str]:
    """Apply pending migrations; returns the ids applied by this call (empty if another run did them). With a
    `stage`, only to that stage's database (_claim_stage)."""
    deadline = deadline or Deadline()
    with _locked_run(conninfo, directory, deadline, stage, take_over) as (backend, migrations):
        if unknown := _unknown_applied(backend, migrations):
            logger.warning("the database has migrations applied that this release does not know: %s (a newer "
                           "release's, not rolled back before this one was deployed)", ", ".join(unknown))
        return _apply_each(backend, backend.to_apply(migrations), deadline)


def mark_applied(conninfo: str, through: str, directory: Path | None = None, *,
                 deadline: Deadline | None = None, stage: str | None = None) -> list[str]:
    """Record the migrations up to and including `through` (in the order apply takes them) as applied, without
    running them, under the run lock: for a schema that already holds them while _yoyo_migration does not (a
    migrations table restored older than the schema). Returns the ids marked (those not recorded already); an
    id this folder does not hold marks nothing and raises MigrationError."""
    from yoyo.migrations import topological_sort

    deadline = deadline or Deadline()
    with _locked_run(conninfo, directory, deadline, stage) as (backend, migrations):
        ordered = list(topological_sort(migrations))
        ids = [migration.id for migration in ordered]
        if through not in ids:
            raise MigrationError(f"no migration {through!r} in this release's migrations ({', '.join(ids)}): "
                                 "nothing marked")
        if unknown := _unknown_applied(backend, migrations):
            logger.warning("the database has migrations applied that this release does not know: %s",
                           ", ".join(unknown))
        recorded = set(backend.get_applied_migration_hashes())
        to_mark = [migration for migration in ordered[:ids.index(through) + 1] if migration.hash not in recorded]
        deadline.check("marking migrations applied")
        backend.mark_migrations(to_mark)  # one transaction; each row logged in _yoyo_log as "mark"
        return [migration.id for migration in to_mark]


def rollback(conninfo: str, count: int = 1, directory: Path | None = None, *, stage: str | None = None) -> list[str]:
    """Roll back the last `count` applied migrations (with a `stage`, only in that stage's database)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    deadline = Deadline()
    with _locked_run(conninfo, directory, deadline, stage) as (backend, migrations):
        if unknown := _unknown_applied(backend, migrations):
            raise MigrationError(
                f"the database has migrations applied that this checkout does not know: {', '.join(unknown)}; "
                "nothing rolled back. Roll those back first with the release that added them (its "
                "`candlecast migrate --rollback N`): this checkout's last migration is not the database's last")
        rolled_back: list[str] = []
        for migration in backend.to_rollback(migrations)[:count]:
            try:
                _run_one(backend, migration, deadline, "rollback")
            except Exception as error:
                raise MigrationError(
                    f"rollback of {migration.id} failed: {type(error).__name__}: {_first_line(error)} (rolled back "
                    f"before it in this run: {rolled_back or 'none'}; it is still applied, unchanged)") from error
            rolled_back.append(migration.id)
        return rolled_back


def status(conninfo: str, directory: Path | None = None) -> MigrationStatus:
    migrations = read(directory)
    backend = connect(conninfo)
    try:
        pending = {migration.id for migration in backend.to_apply(migrations)}
        return MigrationStatus(
            applied=[migration.id for migration in migrations if migration.id not in pending],
            pending=[migration.id for migration in migrations if migration.id in pending],
            unknown=_unknown_applied(backend, migrations),
        )
    finally:
        backend.connection.close()
