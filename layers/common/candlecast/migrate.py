"""Apply yoyo migrations under yoyo's lock, so concurrent runs serialise and the loser applies nothing."""

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict

LOCK_TIMEOUT_SECONDS = 60


def migrations_dir() -> Path:
    """MIGRATIONS_DIR, else migrations/ beside the running function (Lambda), else the repository's."""
    if configured := os.environ.get("MIGRATIONS_DIR"):
        return Path(configured)
    for candidate in (Path(os.environ.get("LAMBDA_TASK_ROOT", "/nonexistent")) / "migrations",
                      Path(__file__).resolve().parents[3] / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no migrations directory found; set MIGRATIONS_DIR")


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


def _backend_and_migrations(conninfo: str, directory: Path | None):
    from yoyo import get_backend, read_migrations

    backend = get_backend(yoyo_url(conninfo))
    return backend, read_migrations(str(directory or migrations_dir()))


def apply(conninfo: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the ids applied by this call (empty if another run did them)."""
    backend, migrations = _backend_and_migrations(conninfo, directory)
    try:
        with backend.lock(timeout=LOCK_TIMEOUT_SECONDS):
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
            return [migration.id for migration in pending]
    finally:
        backend.connection.close()


def rollback(conninfo: str, count: int = 1, directory: Path | None = None) -> list[str]:
    """Roll back the last `count` applied migrations."""
    if count < 1:
        raise ValueError("count must be at least 1")
    backend, migrations = _backend_and_migrations(conninfo, directory)
    try:
        with backend.lock(timeout=LOCK_TIMEOUT_SECONDS):
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
