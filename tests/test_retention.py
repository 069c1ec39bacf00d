"""Retention through the scheduled function's handler against real PostgreSQL."""

from datetime import timedelta

import psycopg
import pytest

from tests.conftest import ROOT, load_event

pytestmark = pytest.mark.integration


@pytest.fixture
def aged(clean_db):
    """Predictions of five kinds (10 each, steps included): old and over; old, but a step still to come
    (a monthly forecast); young; old and over again, created after the others; old, over only 10 days ago
    and not yet scored by the track record."""
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        symbol_id = conn.execute("""INSERT INTO symbols (ticker, name, base_currency, quote_currency)
                                    VALUES ('X:BTCUSD', 'Bitcoin', 'BTC', 'USD') RETURNING id""").fetchone()[0]
        model_id = conn.execute("""
            INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, is_active)
            VALUES ('1h', 'retention-test', '1', 'baseline', 'models/1h.pkl', repeat('0', 64), true) RETURNING id
        """).fetchone()[0]
        for kind, created_days_ago, last_step_days_ahead in (("over", 400, -399), ("pending", 401, 30),
                                                             ("young", 10, -9), ("over-later", 390, -389),
                                                             ("unscored", 380, -10)):
            conn.execute("""
                WITH new AS (
                    INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close,
                                             request_hash, created_at)
                    SELECT %(symbol)s, 'X:BTCUSD', '1h', %(model)s, now() - %(created)s, 100, %(kind)s || i,
                           now() - %(created)s + i * interval '1 second'
                    FROM generate_series(1, 10) i
                    RETURNING id, created_at
                )
                INSERT INTO prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80, upper_80,
                                              lower_95, upper_95, confidence)
                SELECT new.id, n, now() + %(last_step)s - (30 - n) * interval '1 hour', 100, 101, 99, 100, 98, 102,
                       97, 103, 0.5
                FROM new, generate_series(1, 30) n
            """, {"symbol": symbol_id, "model": model_id, "kind": kind, "created": timedelta(days=created_days_ago),
                  "last_step": timedelta(days=last_step_days_ahead)})
    return clean_db


def remaining(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("""SELECT rtrim(request_hash, '0123456789'), count(*) FROM predictions GROUP BY 1""")
        counts = dict(rows.fetchall())
        counts["steps"] = conn.execute("SELECT count(*) FROM prediction_steps").fetchone()[0]
    return counts


def run_retention(monkeypatch, days: str, batch_size: str) -> dict:
    from infra.lambda_loader import LambdaContext, load_handler
    from tests.conftest import reset_clients

    monkeypatch.setenv("PREDICTION_RETENTION_DAYS", days)
    monkeypatch.setenv("RETENTION_BATCH_SIZE", batch_size)
    reset_clients()
    handler = load_handler(ROOT / "functions/retention")
    return handler(load_event("retention_scheduled.json"), LambdaContext(timeout_seconds=300))


def test_retention_deletes_expired_predictions_in_batches_and_keeps_the_rest(aged, monkeypatch):
    report = run_retention(monkeypatch, "365", "4")
    # 40 predictions are older than 365 days: 20 are over and scored or past the scoring window, 10 have a
    # step still to come, 10 have steps the track record has yet to score.
    assert report["deleted"] == 20 and report["examined"] == 40 and report["complete"]
    assert report["batches"] == 11  # 4 at a time (the last batch finds nothing more), never all at once
    assert remaining(aged.database_url) == {"pending": 10, "young": 10, "unscored": 10, "steps": 30 * 30}


def count_first_step_outcomes(database_url: str) -> None:
    """Score's live_outcomes row for the first step at each distinct time of the aged predictions."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO live_outcomes (model_id, ticker, timeframe, origin_at, step, ts)
            SELECT DISTINCT ON (s.ts) p.model_id, p.ticker, p.timeframe, p.last_candle_at, s.step, s.ts
            FROM prediction_steps s JOIN predictions p ON p.id = s.prediction_id
            WHERE s.step = 1
        """)


def test_retention_forgets_the_counted_outcomes_no_prediction_left_can_match(aged, monkeypatch):
    count_first_step_outcomes(aged.database_url)
    report = run_retention(monkeypatch, "365", "1000")
    with psycopg.connect(aged.database_url) as conn:
        left = conn.execute("SELECT count(*), min(ts) > now() - interval '365 days' FROM live_outcomes").fetchone()
    # One outcome per kind of prediction (each kind's ten share an origin): "over" and "over-later" are forgotten.
    assert report["outcomes_forgotten"] == 2 and left == (3, True)


def test_retention_emits_what_it_removed_as_metrics(aged, monkeypatch, capsys):
    """Retention emitted no metric: how many predictions and outcomes a run removed, and how many the cache kept
    serving, were in its log line only. They now go out as EMF metrics, with the dimensions Refresh's carry."""
    from tests.test_observability import emf_blobs

    count_first_step_outcomes(aged.database_url)
    capsys.readouterr()
    report = run_retention(monkeypatch, "365", "4")
    assert (report["deleted"], report["outcomes_forgotten"], report["cache_not_dropped"]) == (20, 2, 0)
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "RetentionPredictionsDeleted" in blob]
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    assert {metric["Name"]: metric["Unit"] for metric in directive["Metrics"]} == {
        "RetentionPredictionsDeleted": "Count", "RetentionOutcomesForgotten": "Count",
        "RetentionCacheNotDropped": "Count"}
    assert ([blob["RetentionPredictionsDeleted"], blob["RetentionOutcomesForgotten"],
             blob["RetentionCacheNotDropped"]] == [[20.0], [2.0], [0.0]])
    # `service` comes from POWERTOOLS_SERVICE_NAME as the process had it when the module was loaded
    assert {"function", "stage"} <= set(directive["Dimensions"][0]) <= {"function", "service", "stage"}
    assert (blob["stage"], blob["function"]) == ("local", "retention")

    # Turned off, it looks at nothing and counts nothing.
    assert run_retention(monkeypatch, "none", "1000") == {"enabled": False}
    assert not [blob for blob in emf_blobs(capsys.readouterr().out) if "RetentionPredictionsDeleted" in blob]


def test_retention_waits_for_the_track_record_to_score_recent_steps(aged, monkeypatch):
    run_retention(monkeypatch, "365", "1000")
    assert remaining(aged.database_url)["unscored"] == 10
    with psycopg.connect(aged.database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO prediction_scores (prediction_id, step, model_id, ts, realised_close, inside_80, inside_95,
                                           confidence, event, pinball, baseline_pinball, in_sample)
            SELECT s.prediction_id, s.step, p.model_id, s.ts, 100, true, true, 0.5, true, 0.1, 0.1, false
            FROM prediction_steps s JOIN predictions p ON p.id = s.prediction_id
            WHERE p.request_hash LIKE 'unscored%%'
        """)
    report = run_retention(monkeypatch, "365", "1000")
    assert report["deleted"] == 10
    assert "unscored" not in remaining(aged.database_url)


def test_retention_run_twice_changes_nothing_the_second_time(aged, monkeypatch):
    run_retention(monkeypatch, "365", "1000")
    before = remaining(aged.database_url)
    report = run_retention(monkeypatch, "365", "1000")
    assert report["deleted"] == 0 and report["batches"] == 1
    assert remaining(aged.database_url) == before


def test_retention_can_be_turned_off(aged, monkeypatch):
    report = run_retention(monkeypatch, "none", "1000")
    assert report == {"enabled": False}
    assert remaining(aged.database_url)["steps"] == 50 * 30


def ids_of(database_url: str) -> dict[str, list[str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT rtrim(request_hash, '0123456789'), id::text FROM predictions").fetchall()
    kinds: dict[str, list[str]] = {}
    for kind, prediction_id in rows:
        kinds.setdefault(kind, []).append(prediction_id)
    return kinds


def test_retention_drops_the_deleted_predictions_from_the_cache(aged, monkeypatch):
    """GET /predictions/{id} served a deleted prediction from the cache (200, X-Cache: HIT) until its TTL ran out."""
    from candlecast import cache

    before = ids_of(aged.database_url)
    for prediction_id in before["over"] + before["young"]:
        assert cache.set_prediction_bytes(prediction_id, b"{}")
    report = run_retention(monkeypatch, "365", "4")
    assert report["deleted"] == 20
    assert [cache.get_prediction_bytes(i) for i in before["over"]] == [None] * 10
    assert all(cache.get_prediction_bytes(i) == b"{}" for i in before["young"])  # kept rows keep their entries
    assert report["cache_not_dropped"] == 0


def test_retention_with_the_cache_down_deletes_and_reports_what_stays_cached(aged, monkeypatch, needs_embedded_redis):
    needs_embedded_redis.stop()
    try:
        report = run_retention(monkeypatch, "365", "4")
    finally:
        needs_embedded_redis.start()
    assert report["deleted"] == 20 and report["complete"]
    assert report["cache_not_dropped"] == 20  # served from the cache until their TTL (15 min) runs out
