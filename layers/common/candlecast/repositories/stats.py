"""Database-wide checks and figures."""

import psycopg


def test_connection(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 AS ok").fetchone()["ok"] == 1


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
