"""Queries on the models table: registration and the one active model per timeframe."""

import uuid
from typing import TYPE_CHECKING

import psycopg
from psycopg.types.json import Jsonb

if TYPE_CHECKING:  # health imports this module and needs no pydantic models
    from candlecast.schemas import ModelCreate

MODEL_COLUMNS = (
    "id, timeframe, name, version, kind, s3_key, sha256, accuracy, metrics, features, "
    "train_start, train_end, is_active, created_at"
)


def register_model(conn: psycopg.Connection, model: "ModelCreate", *, activate: bool = True) -> uuid.UUID:
    """Insert (or refresh, by name+version) a model; when `activate`, it becomes its timeframe's only active one.
    The same file registered again keeps its live accuracy unless one is given; another file (sha256) under a
    registered name and version is ModelVersionTaken, nothing changed: predictions name the row, and its file is
    the one they were made with. Registrations of one timeframe take turns (a transaction-scoped advisory lock):
    two at once would each deactivate the rows they see and both insert an active one."""
    from candlecast.errors import ModelVersionTaken

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                     (f"model-registration:{model.timeframe}",))
        if activate:
            conn.execute(
                "UPDATE models SET is_active = false WHERE timeframe = %s AND is_active "
                "AND NOT (name = %s AND version = %s)",
                (model.timeframe, model.name, model.version),
            )
        row = conn.execute(
            """
            INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, accuracy, metrics, features,
                                train_start, train_end, is_active, activated_at)
            VALUES (%(timeframe)s, %(name)s, %(version)s, %(kind)s, %(s3_key)s, %(sha256)s, %(accuracy)s,
                    %(metrics)s, %(features)s, %(train_start)s, %(train_end)s, %(activate)s,
                    CASE WHEN %(activate)s THEN now() END)
            ON CONFLICT (name, version) DO UPDATE SET
                timeframe = EXCLUDED.timeframe, kind = EXCLUDED.kind, s3_key = EXCLUDED.s3_key,
                accuracy = COALESCE(EXCLUDED.accuracy, models.accuracy),
                metrics = EXCLUDED.metrics,
                features = EXCLUDED.features, train_start = EXCLUDED.train_start, train_end = EXCLUDED.train_end,
                is_active = models.is_active OR EXCLUDED.is_active,
                activated_at = COALESCE(EXCLUDED.activated_at, models.activated_at)
            WHERE models.sha256 = EXCLUDED.sha256
            RETURNING id
            """,
            {**model.model_dump(), "metrics": Jsonb(model.metrics), "features": Jsonb(model.features),
             "activate": activate},
        ).fetchone()
        if row is None:  # another file under this name and version: rolled back, the deactivation too
            raise ModelVersionTaken(f"model {model.name} {model.version} is registered with another file; a changed "
                                    "model needs a new version")
    return row["id"]


ACTIVE_MODEL_BY_TIMEFRAME = f"SELECT {MODEL_COLUMNS} FROM models WHERE timeframe = %s AND is_active"


def get_active_model_by_timeframe(conn: psycopg.Connection, timeframe: str) -> dict | None:
    return conn.execute(ACTIVE_MODEL_BY_TIMEFRAME, (timeframe,)).fetchone()


# What a forecast needs, nothing more (the model's metrics and features are kilobytes of JSON): one row,
# its symbol, model or keyed half NULL when that is missing. The keyed half is the prediction an
# Idempotency-Key already names: its retry is answered without the model or candles.
_FORECAST_INPUTS = """
SELECT s.id AS symbol_id, s.ticker, s.is_active AS symbol_active,
       m.id AS model_id, m.timeframe, m.name, m.version, m.s3_key, m.sha256,
       k.id AS keyed_id, k.ticker AS keyed_ticker, k.timeframe AS keyed_timeframe
FROM (SELECT) one
LEFT JOIN symbols s ON s.ticker = %(ticker)s
LEFT JOIN models m ON m.timeframe = %(timeframe)s AND m.is_active
LEFT JOIN predictions k ON k.idempotency_key = %(idempotency_key)s"""


def get_symbol_and_active_model(
    conn: psycopg.Connection, ticker: str, timeframe: str, idempotency_key: str | None = None
) -> tuple[dict | None, dict | None, dict | None]:
    """What a forecast starts from, in one statement: the symbol ({id, ticker, is_active}), its timeframe's active
    model ({id, timeframe, name, version, s3_key, sha256}) and the prediction `idempotency_key` names
    ({id, ticker, timeframe}), each None when missing."""
    row = conn.execute(_FORECAST_INPUTS, {"ticker": ticker, "timeframe": timeframe,
                                          "idempotency_key": idempotency_key}).fetchone()
    symbol = None if row["symbol_id"] is None else {"id": row["symbol_id"], "ticker": row["ticker"],
                                                    "is_active": row["symbol_active"]}
    model = None if row["model_id"] is None else {
        "id": row["model_id"], **{name: row[name] for name in ("timeframe", "name", "version", "s3_key", "sha256")}}
    keyed = None if row["keyed_id"] is None else {
        "id": row["keyed_id"], "ticker": row["keyed_ticker"], "timeframe": row["keyed_timeframe"]}
    return symbol, model, keyed


def get_all_active_models(conn: psycopg.Connection) -> list[dict]:
    return conn.execute(f"SELECT {MODEL_COLUMNS} FROM models WHERE is_active ORDER BY timeframe").fetchall()


def get_registered_model_files(conn: psycopg.Connection) -> list[dict]:
    """Every registered model's file (active or not): timeframe, name, version, s3_key, sha256, is_active, and what
    the file was made as (kind, train_start, train_end)."""
    return conn.execute("SELECT timeframe, name, version, s3_key, sha256, is_active, kind, train_start, train_end "
                        "FROM models ORDER BY timeframe, version").fetchall()
