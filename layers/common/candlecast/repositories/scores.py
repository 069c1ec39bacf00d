"""Queries on the live track record: prediction_scores (one row per matured step), model_live_stats (sums) and
model_live_days (out-of-sample sums per outcome day, for drift).

A step is scored once: the insert skips steps already scored, and only the rows it inserted are folded into
model_live_stats and model_live_days, in the same statement (so in the same transaction). Scored therefore
always means aggregated. An outcome is counted once: of the predictions made by one model from one origin (ticker,
timeframe, last candle), only the first scored at each step is folded (live_outcomes), so a popular origin counts
once.
"""

import json
import uuid
from datetime import datetime

import psycopg

from candlecast.repositories import wait_for_locks_at_most

# A step is looked for while its ts is this recent: long enough for a calendar month to close and a weekly
# refresh (with its chained chunks) to store it. Older steps that never found their candle stay unscored.
SCORING_WINDOW = "45 days"
CONFIDENCE_BINS = 10

SCORE_FIELDS = (
    ("prediction_id", "uuid"), ("step", "smallint"), ("model_id", "uuid"), ("ts", "timestamptz"),
    ("realised_close", "double precision"), ("inside_80", "boolean"), ("inside_95", "boolean"),
    ("confidence", "double precision"), ("event", "boolean"), ("pinball", "double precision"),
    ("baseline_pinball", "double precision"), ("in_sample", "boolean"),
)
_NAMES = ", ".join(name for name, _ in SCORE_FIELDS)
_OUTCOME_KEY = "model_id, ticker, timeframe, origin_at, step"

# Retention (issue 9) may delete a prediction only when this holds for it (alias `p`): every step is scored
# (and so aggregated), or was given up because its ts left the scoring window without a stored candle.
SETTLED_PREDICTION = f"""NOT EXISTS (
    SELECT 1 FROM prediction_steps unsettled
    WHERE unsettled.prediction_id = p.id
      AND unsettled.ts > now() - interval '{SCORING_WINDOW}'
      AND NOT EXISTS (SELECT 1 FROM prediction_scores settled
                      WHERE settled.prediction_id = unsettled.prediction_id AND settled.step = unsettled.step))"""

# Due: predictions whose next step to score (predictions.score_next_at, migration 0006) has its ts by now, read
# through predictions_score_due_idx (the expression and the predicate are the index's), and whose candle can be
# stored: the refresh records each file's last candle (symbols.metadata.candles_through), so between refreshes
# the hourly run reads no file in vain. A symbol the refresh has not recorded falls back to `now`. In series
# order (ticker, timeframe), so a run reads each candle file once. Planned for each run's `now` (never a generic
# plan): with the due share known (migration 0009's statistics), a backlog walks predictions_score_series_idx
# from the cursor (60 ms a batch of 200 at 1M due, where sorting every due prediction took 0.8 s), and an
# hourly run, with few due, sorts them.
_DUE = """
WITH due AS (
    SELECT p.id AS prediction_id
    FROM predictions p JOIN symbols s ON s.id = p.symbol_id
    WHERE COALESCE(p.score_next_at, p.last_candle_at) <= %(now)s
      AND p.score_next_at IS DISTINCT FROM 'infinity'::timestamptz
      AND COALESCE(p.score_next_at, p.last_candle_at)
          <= COALESCE((s.metadata->'candles_through'->>p.timeframe)::timestamptz, %(now)s)
      AND (p.ticker, p.timeframe, p.id) > (%(after_ticker)s, %(after_timeframe)s, %(after_id)s)
    ORDER BY p.ticker, p.timeframe, p.id
    LIMIT %(limit)s
)
SELECT p.id, p.ticker, p.timeframe, p.model_id, p.last_candle_at, p.last_close,
       m.name AS model_name, m.version AS model_version, m.timeframe AS model_timeframe, m.s3_key, m.sha256,
       m.train_end, m.is_active AS model_active,
       (SELECT json_agg(json_build_object('step', ps.step, 'ts', ps.ts, 'close', ps.close,
                                          'lower_80', ps.lower_80, 'upper_80', ps.upper_80,
                                          'lower_95', ps.lower_95, 'upper_95', ps.upper_95,
                                          'confidence', ps.confidence) ORDER BY ps.step)
        FROM prediction_steps ps
        WHERE ps.prediction_id = p.id AND ps.ts <= %(now)s
          AND NOT EXISTS (SELECT 1 FROM prediction_scores s WHERE s.prediction_id = ps.prediction_id
                                                              AND s.step = ps.step)) AS steps
FROM due JOIN predictions p ON p.id = due.prediction_id JOIN models m ON m.id = p.model_id
ORDER BY p.ticker, p.timeframe, p.id
"""

_RECORD = f"""
WITH scored AS (
    INSERT INTO prediction_scores ({_NAMES})
    SELECT {_NAMES} FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS r({", ".join(f"{name} {kind}" for name, kind in SCORE_FIELDS)})
    ON CONFLICT (prediction_id, step) DO NOTHING
    RETURNING {_NAMES}
), newly_scored AS (  -- with each one's origin
    SELECT scored.*, p.ticker, p.timeframe, p.last_candle_at AS origin_at
    FROM scored JOIN predictions p ON p.id = scored.prediction_id
), counted AS (
    INSERT INTO live_outcomes ({_OUTCOME_KEY}, ts)
    SELECT DISTINCT ON ({_OUTCOME_KEY}) {_OUTCOME_KEY}, ts FROM newly_scored
    ORDER BY {_OUTCOME_KEY}  -- one lock order for concurrent runs
    ON CONFLICT DO NOTHING
    RETURNING {_OUTCOME_KEY}
), first_of_origin AS (
    SELECT DISTINCT ON ({_OUTCOME_KEY}) newly_scored.*
    FROM newly_scored JOIN counted USING ({_OUTCOME_KEY})
    ORDER BY {_OUTCOME_KEY}, prediction_id
), folded AS (
    INSERT INTO model_live_stats (model_id, in_sample, horizon, confidence_bin, n, inside_80, inside_95, events,
                                  confidence_sum, pinball_sum, baseline_pinball_sum, first_ts, last_ts)
    SELECT model_id, in_sample, step, LEAST(floor(confidence * {CONFIDENCE_BINS})::int, {CONFIDENCE_BINS - 1}),
           count(*), count(*) FILTER (WHERE inside_80), count(*) FILTER (WHERE inside_95),
           count(*) FILTER (WHERE event), sum(confidence), sum(pinball), sum(baseline_pinball), min(ts), max(ts)
    FROM first_of_origin
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4  -- one lock order for concurrent runs
    ON CONFLICT (model_id, in_sample, horizon, confidence_bin) DO UPDATE SET
        n = model_live_stats.n + EXCLUDED.n,
        inside_80 = model_live_stats.inside_80 + EXCLUDED.inside_80,
        inside_95 = model_live_stats.inside_95 + EXCLUDED.inside_95,
        events = model_live_stats.events + EXCLUDED.events,
        confidence_sum = model_live_stats.confidence_sum + EXCLUDED.confidence_sum,
        pinball_sum = model_live_stats.pinball_sum + EXCLUDED.pinball_sum,
        baseline_pinball_sum = model_live_stats.baseline_pinball_sum + EXCLUDED.baseline_pinball_sum,
        first_ts = LEAST(model_live_stats.first_ts, EXCLUDED.first_ts),
        last_ts = GREATEST(model_live_stats.last_ts, EXCLUDED.last_ts),
        updated_at = now()
    RETURNING 1
), daily AS (
    INSERT INTO model_live_days (model_id, day, n, inside_80)
    SELECT model_id, (ts AT TIME ZONE 'UTC')::date, count(*), count(*) FILTER (WHERE inside_80)
    FROM first_of_origin
    WHERE NOT in_sample
    GROUP BY 1, 2
    ORDER BY 1, 2  -- one lock order for concurrent runs
    ON CONFLICT (model_id, day) DO UPDATE SET
        n = model_live_days.n + EXCLUDED.n,
        inside_80 = model_live_days.inside_80 + EXCLUDED.inside_80
    RETURNING 1
)
SELECT (SELECT count(*) FROM scored) AS scored, (SELECT count(*) FROM first_of_origin) AS counted,
       (SELECT count(*) FROM folded) AS cells, (SELECT count(*) FROM daily) AS days
"""

# After a batch: each prediction's next look is its earliest unscored step inside the window (one whose candle is
# missing keeps it due), or never. Scores are only ever added, so a value computed before a concurrent run's
# insert is too early, never too late: at worst a prediction is looked at once more.
_SCHEDULE = """
UPDATE predictions p SET score_next_at = next.at
FROM (SELECT pid.id, COALESCE(
          (SELECT min(ps.ts) FROM prediction_steps ps
           WHERE ps.prediction_id = pid.id AND ps.ts > %(since)s
             AND NOT EXISTS (SELECT 1 FROM prediction_scores s WHERE s.prediction_id = ps.prediction_id
                                                                 AND s.step = ps.step)),
          'infinity'::timestamptz) AS at
      FROM unnest(%(ids)s::uuid[]) AS pid(id)) next
WHERE p.id = next.id AND p.score_next_at IS DISTINCT FROM next.at
"""

# How long the accuracy update may queue behind a lock on models (a migration holds it for tens of seconds); the
# next run updates it instead.
ACCURACY_LOCK_TIMEOUT = 2.0  # seconds

# models.accuracy is the live 80 % coverage (drift.ACCURACY_DEFINITION) on out-of-sample steps.
_REFRESH_ACCURACY = """
UPDATE models m SET accuracy = live.inside_80::double precision / live.n
FROM (SELECT model_id, sum(n) AS n, sum(inside_80) AS inside_80 FROM model_live_stats
      WHERE NOT in_sample GROUP BY model_id) live
WHERE m.id = live.model_id AND m.accuracy IS DISTINCT FROM live.inside_80::double precision / live.n
"""

_STATS_OF_ACTIVE = """
SELECT m.timeframe, s.in_sample, s.horizon, s.confidence_bin, s.n, s.inside_80, s.inside_95, s.events,
       s.confidence_sum, s.pinball_sum, s.baseline_pinball_sum, s.first_ts, s.last_ts
FROM models m JOIN model_live_stats s ON s.model_id = m.id
WHERE m.is_active AND (%(timeframe)s::text IS NULL OR m.timeframe = %(timeframe)s)
ORDER BY m.timeframe, s.in_sample, s.horizon, s.confidence_bin
"""

_LIVE_DAYS_OF_ACTIVE = """
SELECT m.timeframe, array_agg(t.n ORDER BY t.day) AS n, array_agg(t.inside_80 ORDER BY t.day) AS inside_80
FROM models m JOIN model_live_days t ON t.model_id = m.id
WHERE m.is_active AND (%(timeframe)s::text IS NULL OR m.timeframe = %(timeframe)s)
GROUP BY m.timeframe
"""

# Where a run has got to: the (ticker, timeframe, id) of the last prediction done.
DueCursor = tuple[str, str, uuid.UUID]
NO_PREDICTION: DueCursor = ("", "", uuid.UUID(int=0))


# Active symbols outside `top` with a prediction whose next step to score is still within the window: the refresh
# keeps their candle files too, or Score, which reads only stored files, would never score them. Most liquid first.
_AWAITING_CANDLES = f"""
SELECT s.ticker FROM symbols s
WHERE s.is_active AND NOT s.ticker = ANY(%(top)s)
  AND EXISTS (SELECT 1 FROM predictions p
              WHERE p.symbol_id = s.id AND p.score_next_at IS DISTINCT FROM 'infinity'::timestamptz
                AND COALESCE(p.score_next_at, p.last_candle_at) > now() - interval '{SCORING_WINDOW}')
ORDER BY s.volume_24h DESC NULLS LAST, s.ticker
LIMIT %(limit)s
"""


def get_tickers_awaiting_candles(conn: psycopg.Connection, top: list[str], limit: int) -> list[str]:
    return [row["ticker"] for row in conn.execute(_AWAITING_CANDLES, {"top": top, "limit": limit}).fetchall()]


def due_cursor(prediction: dict) -> DueCursor:
    return prediction["ticker"], prediction["timeframe"], prediction["id"]


def get_due_predictions(conn: psycopg.Connection, now: datetime, after: DueCursor, limit: int) -> list[dict]:
    """Predictions after `after` (in ticker, timeframe, id order) due for a look by `now`, each with its model
    and its unscored steps up to `now` (ts ascending; none when it was looked at too early)."""
    after_ticker, after_timeframe, after_id = after
    return conn.execute(_DUE, {"now": now, "after_ticker": after_ticker, "after_timeframe": after_timeframe,
                               "after_id": after_id, "limit": limit}, prepare=False).fetchall()


def schedule_next(conn: psycopg.Connection, ids: list[uuid.UUID], since: datetime) -> int:
    """Set when each of `ids` is next due: its earliest unscored step with ts after `since`, or never."""
    return conn.execute(_SCHEDULE, {"ids": ids, "since": since}).rowcount if ids else 0


def record_scores(conn: psycopg.Connection, rows: list[dict]) -> int:
    """Insert the scores of matured steps and fold the new ones whose outcome is not counted yet into
    model_live_stats (and, out of sample, model_live_days); returns how many steps were newly scored.

    Steps already scored (by an earlier or a concurrent run) are skipped and not counted again, and so is the
    step of a prediction from an origin whose outcome at that step another prediction already counted.
    """
    if not rows:
        return 0
    with conn.transaction():
        result = conn.execute(_RECORD, {"rows": json.dumps(rows, default=str)}).fetchone()
    return int(result["scored"])


def refresh_accuracy(conn: psycopg.Connection) -> int:
    """Set models.accuracy to the live 80 % coverage of each model that has out-of-sample scores. Waits at most
    ACCURACY_LOCK_TIMEOUT for the rows (psycopg.errors.LockNotAvailable): a migration may hold the table."""
    with conn.transaction():
        wait_for_locks_at_most(conn, ACCURACY_LOCK_TIMEOUT)
        return conn.execute(_REFRESH_ACCURACY).rowcount


def get_active_model_stats(conn: psycopg.Connection, timeframe: str | None = None) -> list[dict]:
    """Every model_live_stats cell of the active models (of one timeframe, or all)."""
    return conn.execute(_STATS_OF_ACTIVE, {"timeframe": timeframe}).fetchall()


def get_active_live_days(conn: psycopg.Connection, timeframe: str | None = None) -> dict[str, list[tuple[int, int]]]:
    """Per timeframe (all, or one): its active model's out-of-sample outcomes per outcome day, in day order, as
    (steps scored, how many fell inside the 80 % band)."""
    return {row["timeframe"]: list(zip(row["n"], row["inside_80"], strict=True))
            for row in conn.execute(_LIVE_DAYS_OF_ACTIVE, {"timeframe": timeframe}, binary=True)}


def get_settled_prediction_ids(conn: psycopg.Connection, ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Which of `ids` retention may delete (SETTLED_PREDICTION holds)."""
    rows = conn.execute(f"SELECT p.id FROM predictions p WHERE p.id = ANY(%s) AND {SETTLED_PREDICTION}",
                        (ids,)).fetchall()
    return [row["id"] for row in rows]
