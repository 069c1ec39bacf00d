"""Apply yoyo migrations under yoyo's lock, so concurrent runs serialise and the loser applies nothing.

Nothing fails silently: a missing or empty migrations folder, a migration that cannot be applied (named)
and a lock still held after LOCK_TIMEOUT_SECONDS each raise MigrationError with a one-line reason.
"""

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict

LOCK_TIMEOUT_SECONDS = 60


class MigrationError(RuntimeError):
    """A migration run that must not count as done; the message names the folder or the migration."""


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


def yoyo_url(conninfo: str) -> str:
    """A yoyo URI (postgresql+psycopg://…) for any libpq conninfo or URL, unix sockets included."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.pop("user", "")), safe="")
    password = quote(str(params.pop("password", "")), safe="")
    host = str(params.pop("host", ""))
    port = params.pop("port", None)
    dbname = quote(str(params.pop("dbname", "")), safe="")
    netloc = user + (f":{password}" if password else "") + ("@" if user else "")
    if host and not host.startswith("/"):
        netloc += host + (f":{port}" if port else "")
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

    def as_dict(self) -> dict:
        return {"applied": self.applied, "pending": self.pending}


def read(directory: Path | None = None):
    """The migrations in the folder; a missing or empty folder is an error that names it."""
    from yoyo import read_migrations

    directory = Path(directory or migrations_dir())
    if not directory.is_dir():
        kind = "is not a folder" if directory.exists() else "does not exist"
        raise MigrationError(f"the migrations folder {directory} {kind} (a checkout without symlinks?)")
    migrations = read_migrations(str(directory))
    if len(migrations) == 0:
        raise MigrationError(f"the migrations folder {directory} holds no migrations")
    return migrations


def connect(conninfo: str):
    """yoyo's psycopg 3 backend, connected and initialised as yoyo.get_backend does, without finding the class
    among every installed distribution's entry points (a scan of sys.path: about a tenth of a cold start)."""
    from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
    from yoyo.connections import parse_uri
    from yoyo.migrations import default_migration_table

    backend = PostgresqlPsycopgBackend(parse_uri(yoyo_url(conninfo)), default_migration_table)
    backend.init_database()
    return backend


def _backend_and_migrations(conninfo: str, directory: Path | None):
    migrations = read(directory)  # before connecting: a missing folder is the first thing to hear about
    return connect(conninfo), migrations


def _apply_each(backend, pending) -> list[str]:
    """Apply one by one, so a failure names its migration (yoyo runs each in its own transaction)."""
    applied = []
    for migration in pending:
        try:
            backend.apply_one(migration)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise MigrationError(
                f"migration {migration.id} failed: {type(error).__name__}: {reason} "
                f"(applied before it in this run: {applied or 'none'}; it was rolled back)"
            ) from error
        applied.append(migration.id)
    if pending:
        backend.run_post_apply(pending)
    return applied


@contextmanager
def _lock(backend):
    """yoyo's lock, its LockTimeout as a MigrationError that says how to clear a stale one."""
    from yoyo.exceptions import LockTimeout

    lock = backend.lock(timeout=LOCK_TIMEOUT_SECONDS)
    try:
        lock.__enter__()
    except LockTimeout as error:
        raise MigrationError(f"{error}; if no migration is running: candlecast migrate --break-lock") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def apply(conninfo: str, directory: Path | None = None, *, break_locks_older_than: float | None = None,
          on_broken_lock: Callable[[dict], None] | None = None) -> list[str]:
    """Apply pending migrations; returns the ids applied by this call (empty if another run did them).

    With break_locks_older_than, a lock older than that many seconds (left by a killed run) is removed
    first, on the same connection, and reported to on_broken_lock.
    """
    backend, migrations = _backend_and_migrations(conninfo, directory)
    try:
        if break_locks_older_than is not None:
            broken = _break_lock(backend, break_locks_older_than)
            if broken and on_broken_lock:
                on_broken_lock(broken)
        with _lock(backend):
            return _apply_each(backend, backend.to_apply(migrations))
    finally:
        backend.connection.close()


@contextmanager
def _backend(conninfo: str):
    backend = connect(conninfo)
    try:
        yield backend
    finally:
        backend.connection.close()


def _holder(backend) -> dict | None:
    exists = backend.execute("SELECT to_regclass(:name)", {"name": backend.lock_table}).fetchone()[0]
    row = backend.execute(f"SELECT pid, ctime FROM {backend.lock_table_quoted}").fetchone() if exists else None
    if row is None:
        return None
    age = (datetime.now(UTC).replace(tzinfo=None) - row[1]).total_seconds() if row[1] else None
    return {"pid": row[0], "age_seconds": round(age, 1) if age is not None else None}


def _break_lock(backend, older_than_seconds: float | None) -> dict | None:
    holder = _holder(backend)
    if holder is None:
        return None
    if older_than_seconds is not None and (holder["age_seconds"] or 0) <= older_than_seconds:
        return None
    backend.break_lock()
    return holder


def lock_holder(conninfo: str) -> dict | None:
    """The migration lock's row (pid, age in seconds), or None when nobody holds it."""
    with _backend(conninfo) as backend:
        return _holder(backend)


def break_lock(conninfo: str, older_than_seconds: float | None = None) -> dict | None:
    """Remove the migration lock (only if older than the given age); returns what was removed, or None."""
    with _backend(conninfo) as backend:
        return _break_lock(backend, older_than_seconds)


def rollback(conninfo: str, count: int = 1, directory: Path | None = None) -> list[str]:
    """Roll back the last `count` applied migrations."""
    if count < 1:
        raise ValueError("count must be at least 1")
    backend, migrations = _backend_and_migrations(conninfo, directory)
    try:
        with _lock(backend):
            to_rollback = backend.to_rollback(migrations)[:count]
            backend.rollback_migrations(to_rollback)
            return [migration.id for migration in to_rollback]
    finally:
        backend.connection.close()


def status(conninfo: str, directory: Path | None = None) -> MigrationStatus:
    backend, migrations = _backend_and_migrations(conninfo, directory)
    try:
        pending = {migration.id for migration in backend.to_apply(migrations)}
        return MigrationStatus(
            applied=[migration.id for migration in migrations if migration.id not in pending],
            pending=[migration.id for migration in migrations if migration.id in pending],
        )
    finally:
        backend.connection.close()
