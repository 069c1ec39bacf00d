"""Queries on predictions and prediction_steps."""

import contextlib
import uuid
from datetime import datetime

import psycopg
from psycopg.pq import TransactionStatus

from candlecast.schemas import PredictionCreate, PredictionStepCreate, list_adapter
from candlecast.timeframes import TIMEFRAMES

STEP_FIELDS = ("step", "ts", "open", "high", "low", "close", "lower_80", "upper_80", "lower_95", "upper_95",
               "confidence")
STEP_TYPES = ("smallint", "timestamptz", *["double precision"] * 9)
REPEAT_WINDOW = "15 minutes"
_steps_json = list_adapter(PredictionStepCreate)

_PREDICTION_COLUMNS = """p.id, p.ticker, p.timeframe, p.model_id, m.name AS model_name, m.version AS model_version,
       p.last_candle_at, p.last_close, p.horizon, p.created_at, p.request_hash, p.idempotency_key"""

# The twin a create looks for. Keyed and unkeyed creates are separate statements: a prepared statement
# soon runs a generic plan (parameters unknown), and only a condition without `$1 IS NULL` branches keeps
# an index there. The unkeyed one takes the request's newest row by predictions_request_hash_created_idx and
# only then checks its age: a window condition inside would let the planner prefer walking
# predictions_created_idx through every recent row, which stale statistics make look cheap.
_KEYED_TWIN = """SELECT id, request_hash, created_at, ticker, timeframe FROM predictions
    WHERE idempotency_key = %(idempotency_key)s"""
_UNKEYED_TWIN = f"""SELECT * FROM (
        SELECT id, request_hash, created_at, ticker, timeframe FROM predictions WHERE request_hash = %(request_hash)s
        ORDER BY created_at DESC LIMIT 1) newest
    WHERE created_at > now() - interval '{REPEAT_WINDOW}'"""


def _create_statement(twin: str) -> str:
    return f"""
WITH existing AS (
    {twin}
), inserted AS (
    INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, horizon,
                             idempotency_key, user_id, request_hash)
    SELECT %(symbol_id)s, %(ticker)s, %(timeframe)s, %(model_id)s, %(last_candle_at)s, %(last_close)s,
           %(horizon)s, %(idempotency_key)s, %(user_id)s, %(request_hash)s
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    RETURNING id, created_at
), steps AS (
    INSERT INTO prediction_steps (prediction_id, {", ".join(STEP_FIELDS)})
    SELECT inserted.id, s.* FROM inserted,
           jsonb_to_recordset(%(steps)s::jsonb)
           AS s({", ".join(f"{name} {kind}" for name, kind in zip(STEP_FIELDS, STEP_TYPES, strict=True))})
)
SELECT id, created_at, true AS created, %(request_hash)s AS request_hash, %(ticker)s AS ticker,
       %(timeframe)s AS timeframe FROM inserted
UNION ALL
SELECT id, created_at, false AS created, request_hash, ticker, timeframe FROM existing
"""


CREATE_KEYED = _create_statement(_KEYED_TWIN)
CREATE_UNKEYED = _create_statement(_UNKEYED_TWIN)


def create_prediction(
    conn: psycopg.Connection, prediction: PredictionCreate, request_hash: str
) -> dict:
    """Store a prediction and its steps atomically, unless an equivalent one exists.

    Equivalent means the same Idempotency-Key, or (without a key) the same request hash within 15 minutes.
    A transaction-scoped advisory lock serialises concurrent identical requests, so exactly one row is
    stored whatever the cache does. Returns {id, created_at, created}; raises Conflict when a key is
    reused for another symbol or timeframe (the same request after a new candle or model is a retry).
    """
    from candlecast.errors import IdempotencyKeyReused

    lock_name = f"idempotency:{prediction.idempotency_key}" if prediction.idempotency_key else request_hash
    params = {
        **prediction.model_dump(exclude={"steps"}),
        "horizon": len(prediction.steps),
        "request_hash": request_hash,
        # One JSON document for the 30 steps: cheaper to send than eleven arrays.
        "steps": _steps_json.dump_json(prediction.steps).decode(),
    }
    # BEGIN, the lock, the insert and COMMIT go in one round trip (pipelined; psycopg's transaction() would
    # sync after BEGIN and before COMMIT), and the row is read once COMMIT has answered. The insert's snapshot
    # is still taken after the lock is granted, so it sees a concurrent twin that committed first. When a
    # statement fails, the server skips the rest (COMMIT included) and the transaction is rolled back here.
    statement = CREATE_UNKEYED if prediction.idempotency_key is None else CREATE_KEYED
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            # Every create commits durably, whatever the server's, database's or role's default: a 201 is a
            # promise, keyed or not. SET LOCAL ends with the transaction; it rides in the same round trip.
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock_name,))
            inserted = conn.execute(statement, params)
            conn.execute("COMMIT")
    except Exception:
        if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            with contextlib.suppress(psycopg.Error):  # the original error is the one to report
                conn.rollback()
        raise
    row = inserted.fetchone()
    if (row["ticker"], row["timeframe"]) != (prediction.ticker, prediction.timeframe):
        raise IdempotencyKeyReused
    return row


def model_keys_starting_with(conn: psycopg.Connection, model_id: uuid.UUID, key_prefix: str) -> set[str]:
    """The Idempotency-Keys starting with `key_prefix` of the predictions `model_id` made."""
    rows = conn.execute(
        "SELECT idempotency_key FROM predictions WHERE model_id = %s AND starts_with(idempotency_key, %s)",
        (model_id, key_prefix),
    ).fetchall()
    return {row["idempotency_key"] for row in rows}


def get_prediction_by_id(conn: psycopg.Connection, prediction_id: uuid.UUID) -> dict | None:
    prediction = conn.execute(
        f"SELECT {_PREDICTION_COLUMNS} FROM predictions p JOIN models m ON m.id = p.model_id WHERE p.id = %s",
        (prediction_id,),
    ).fetchone()
    if prediction is None:
        return None
    prediction["steps"] = conn.execute(
        f"SELECT {', '.join(STEP_FIELDS)} FROM prediction_steps WHERE prediction_id = %s ORDER BY step",
        (prediction_id,),
    ).fetchall()
    return prediction


def _before_anchor(alias: str) -> str:
    """After the page's last row (created_at, id), newest first: the index gives created_at <= the anchor's, and
    only rows created in the same microsecond are compared by id."""
    return (f"AND {alias}created_at <= %(created_at)s "
            f"AND ({alias}created_at < %(created_at)s OR {alias}id < %(id)s)")


def _recent_statement(any_timeframe: bool, after: bool) -> str:
    if not any_timeframe:
        return f"""
SELECT {_PREDICTION_COLUMNS} FROM predictions p JOIN models m ON m.id = p.model_id
WHERE p.symbol_id = %(symbol_id)s AND p.timeframe = %(timeframe)s {_before_anchor("p.") if after else ""}
ORDER BY p.created_at DESC, p.id DESC
LIMIT %(limit)s"""
    # Without a timeframe: each timeframe's newest from predictions_symbol_timeframe_created_idx, merged, so the
    # cost follows the page, not the symbol's number of predictions (and no second index slows every create).
    return f"""
SELECT {_PREDICTION_COLUMNS} FROM ({" UNION ALL ".join(
        f"(SELECT * FROM predictions WHERE symbol_id = %(symbol_id)s AND timeframe = '{timeframe}' "
        f"{_before_anchor('') if after else ''} ORDER BY created_at DESC, id DESC LIMIT %(limit)s)"
        for timeframe in TIMEFRAMES)}) p
JOIN models m ON m.id = p.model_id
ORDER BY p.created_at DESC, p.id DESC
LIMIT %(limit)s"""


_RECENT = {(any_timeframe, after): _recent_statement(any_timeframe, after)
           for any_timeframe in (True, False) for after in (False, True)}


def get_recent_predictions_by_symbol(
    conn: psycopg.Connection, symbol_id: int, timeframe: str | None, limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[dict]:
    """The symbol's predictions (of one timeframe, or all), newest first, after the row whose (created_at, id)
    is `after` (the last row of the previous page)."""
    created_at, prediction_id = after if after is not None else (None, None)
    return conn.execute(_RECENT[(timeframe is None, after is not None)], {
        "symbol_id": symbol_id, "timeframe": timeframe, "limit": limit, "created_at": created_at,
        "id": prediction_id}).fetchall()
