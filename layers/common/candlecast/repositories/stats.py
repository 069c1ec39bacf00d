"""Database-wide checks and figures."""

import psycopg


def test_connection(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 AS ok").fetchone()["ok"] == 1


def database_identity(conn: psycopg.Connection) -> str:
    """What any restore changes, readable without privileges: the server's start (a point-in-time restore is a new
    instance), the database's oid (dropped and created again) and the predictions table's (pg_restore --clean)."""
    row = conn.execute(
        """
        SELECT pg_postmaster_start_time() AS started, d.oid AS database, to_regclass('predictions')::oid AS predictions
        FROM pg_database d WHERE d.datname = current_database()
        """
    ).fetchone()
    return f"{row['started'].isoformat()} {row['database']} {row['predictions']}"


def get_database_stats(conn: psycopg.Connection) -> dict:
    return conn.execute(
        """
        SELECT (SELECT count(*) FROM symbols)                         AS symbols,
               (SELECT count(*) FROM symbols WHERE is_active)         AS active_symbols,
               (SELECT count(*) FROM models)                          AS models,
               (SELECT count(*) FROM models WHERE is_active)          AS active_models,
               (SELECT count(*) FROM predictions)                     AS predictions,
               (SELECT count(*) FROM prediction_steps)                AS prediction_steps,
               pg_database_size(current_database())                   AS database_bytes
        """
    ).fetchone()
