"""All SQL lives here, always with parameters. Each function takes an open psycopg connection (dict rows)."""

import psycopg


def wait_for_locks_at_most(conn: psycopg.Connection, seconds: float) -> None:
    """Within the open transaction, a statement waits at most `seconds` for a lock another session holds
    (psycopg.errors.LockNotAvailable after it). At least 1 ms: a lock_timeout of 0 waits forever."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(seconds * 1000))}ms",))
