"""The live track record: scoring matured steps, the live metrics per model, /models and health's drift.

Real PostgreSQL, Redis and S3 (moto server); later candles come through the fake Polygon and the refresh.
"""

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row

from candlecast import cache, db, storage
from candlecast.candles import Candles
from candlecast.ingest import SETTLE_SECONDS
from candlecast.repositories import scores as score_repository
from candlecast.services import scoring
from candlecast.timeframes import add_steps
from infra.events import create_event
from tests.conftest import EVENTS, empty_bucket, invoke, load_event, path_event
from tests.fake_polygon import HOUR, FakePolygon, make_market
from tests.test_ingest import RefreshContext, point_settings_at

pytestmark = [pytest.mark.integration, pytest.mark.s3]


@pytest.fixture
def track(clean_db, monkeypatch):
    """The committed models registered (no sample track record), an empty bucket besides them."""
    from candlecast import polygon, seed
    from candlecast.config import get_settings
    from candlecast.services import model_loading

    empty_bucket(clean_db.bucket)
    model_loading.forget_models()
    seed.seed(progress=False)
    yield monkeypatch
    polygon.reset_client()
    get_settings.cache_clear()


def url() -> str:
    return os.environ["DATABASE_URL"]


def rows(database_url: str, query: str, *params) -> list[tuple]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def create(symbol: str, timeframe: str = "1h") -> dict:
    status, _, body = invoke("predictions_create", create_event({"symbol": symbol, "timeframe": timeframe}))
    assert status == 201, body
    return body


def get_model(timeframe: str) -> tuple[int, dict]:
    status, _, body = invoke("symbols", path_event("model_get.json", f"/models/{timeframe}", timeframe=timeframe))
    return status, body


def health() -> dict:
    return invoke("health", load_event("health.json"))[2]


def active_model_id(database_url: str, timeframe: str = "1h") -> uuid.UUID:
    return rows(database_url, "SELECT id FROM models WHERE timeframe = %s AND is_active", timeframe)[0][0]


# --- scoring through the refresh ------------------------------------------------------------------


@contextmanager
def one_symbol_refreshed(track):
    """(refresh again, ticker, the first refresh's report): one symbol's 1h candles through the refresh, from a
    market whose clock the second refresh moves on by twelve hours."""
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    now = int(time.time()) - SETTLE_SECONDS  # the refresh takes a bar only once it has settled
    market = make_market(1, now=now - now % HOUR - 12 * HOUR, history_days=20)
    ticker = market.symbols[0].ticker

    def refresh_again() -> dict:
        market.now += 12 * HOUR  # twelve more hourly candles close
        return handler({"tickers": [ticker], "timeframes": ["1h"]}, RefreshContext(remaining_seconds=900))

    with FakePolygon(market) as fake:
        point_settings_at(track, fake)
        # The seeded symbols stay active (a listing of one would retire nearly all of them: refused), so the
        # market's symbol is named rather than taken as the top one.
        first = handler({"tickers": [ticker], "refresh_symbols": True, "timeframes": ["1h"]},
                        RefreshContext(remaining_seconds=900))
        yield refresh_again, ticker, first


def test_steps_are_scored_when_their_candles_arrive_through_the_refresh(track):
    with one_symbol_refreshed(track) as (refresh_again, ticker, first):
        assert first["candles_added"] > 0 and first["scoring"] == "inline"
        prediction = create(ticker)
        second = refresh_again()
    assert second["candles_added"] >= 11 and second["scoring"] == "inline"

    stored = storage.read_all_candles(ticker, "1h")
    close_at = dict(zip(stored.open_time.tolist(), stored.close.tolist(), strict=True))
    scored = rows(url(), "SELECT step, ts, realised_close, inside_80, inside_95, in_sample FROM prediction_scores "
                       "WHERE prediction_id = %s ORDER BY step", uuid.UUID(prediction["id"]))
    steps = {step["step"]: step for step in prediction["steps"]}
    matured = [step for step in prediction["steps"]
               if int(datetime.fromisoformat(step["ts"]).timestamp()) in close_at]
    assert len(matured) >= 11 and [row[0] for row in scored] == [step["step"] for step in matured]
    for step, ts, realised, inside_80, inside_95, in_sample in scored:
        assert realised == close_at[int(ts.timestamp())]
        assert inside_80 == (steps[step]["lower_80"] <= realised <= steps[step]["upper_80"])
        assert inside_95 == (steps[step]["lower_95"] <= realised <= steps[step]["upper_95"])
        assert in_sample is False  # made long after the model's training window

    status, body = get_model("1h")
    assert status == 200 and body["live"]["n_scored"] == len(scored)
    assert sum(item["n"] for item in body["live"]["coverage_by_horizon"]) == len(scored)
    assert body["model"]["accuracy"] == pytest.approx(sum(row[3] for row in scored) / len(scored))


def test_a_forecast_of_a_symbol_outside_the_top_list_is_scored_after_the_next_refresh(track):
    """Audit (a year fast-forwarded): a symbol outside the refresh's top N is forecast from Polygon's candles on
    demand, which are not stored, and Score reads stored files only: 360 forecasts of one, every one a 201, and
    not one step scored. The refresh now keeps the files of symbols whose forecasts wait for candles."""
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    now = int(time.time()) - SETTLE_SECONDS
    market = make_market(1, now=now - now % HOUR - 12 * HOUR, history_days=20)
    ticker = market.symbols[0].ticker
    with FakePolygon(market) as fake:
        point_settings_at(track, fake)
        listed = handler({"tickers": [], "refresh_symbols": True, "timeframes": ["1h"]},
                         RefreshContext(remaining_seconds=900))
        assert listed["symbols_upserted"] >= 1 and listed["files_written"] == 0
        from candlecast import ingest

        assert ticker not in ingest.top_tickers(1)
        prediction = create(ticker)  # from Polygon's candles: no file is stored for it
        assert storage.list_keys(storage.candles_key(ticker, "1h")) == []
        market.now += 12 * HOUR
        report = handler({"symbols": 1, "refresh_symbols": False, "timeframes": ["1h"]},
                         RefreshContext(remaining_seconds=900))
    assert report["awaiting_scores"] == [ticker] and report["scoring"] == "inline"
    scored = rows(url(), "SELECT count(*) FROM prediction_scores WHERE prediction_id = %s",
                  uuid.UUID(prediction["id"]))
    assert scored[0][0] >= 11


# --- idempotence, missing candles, retention's predicate ---------------------------------------------


def hourly_candles(start: int, closes: list[float]) -> Candles:
    times = start + HOUR * np.arange(len(closes))
    close = np.asarray(closes, dtype=float)
    return Candles(open_time=times, open=close, high=close * 1.001, low=close * 0.999, close=close,
                   volume=np.full(len(closes), 10.0))


def wavy_history(count: int, start: int) -> Candles:
    return hourly_candles(start, (100 * np.exp(0.01 * np.sin(np.arange(count) / 3.0))).tolist())


def with_later(history: Candles, closes: list[float]) -> Candles:
    later = hourly_candles(int(history.open_time[-1]) + HOUR, closes)
    return storage.merge_candles(history, later)


SYMBOL = "X:ETHUSD"  # in data/symbols.csv; the sample has no candle file for it


def stored_history(count: int = 200) -> Candles:
    """`count` wavy 1h candles of SYMBOL, the last about 40 hours old, written to the bucket."""
    now = int(time.time())
    history = wavy_history(count, now - now % HOUR - (count + 40) * HOUR)
    storage.write_candles(SYMBOL, "1h", history)
    return history


def test_a_step_is_counted_once_however_often_it_is_scored(track):
    stored_history()
    prediction = create(SYMBOL)
    storage.write_candles(SYMBOL, "1h", with_later(storage.read_all_candles(SYMBOL, "1h"), [100.0] * 5))

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(scoring.run(60).scored)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) in ([0, 5], [1, 4], [2, 3])  # concurrent runs split the steps, never repeat one
    assert scoring.run(60).scored == 0  # and a third run finds nothing new

    assert rows(url(), "SELECT count(*) FROM prediction_scores")[0][0] == 5
    assert rows(url(), "SELECT sum(n) FROM model_live_stats")[0][0] == 5
    # Replaying the very rows (an older invocation retried) inserts and counts nothing.
    with db.connection() as conn:
        again = conn.execute("SELECT * FROM prediction_scores").fetchall()
        assert score_repository.record_scores(conn, [{**row, "ts": row["ts"].isoformat()} for row in again]) == 0
    assert rows(url(), "SELECT sum(n) FROM model_live_stats")[0][0] == 5
    assert get_model("1h")[1]["live"]["n_scored"] == 5
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {
        uuid.UUID(prediction["id"])}


def test_predictions_from_one_origin_count_its_outcomes_once(track):
    """Copies of one forecast (other Idempotency-Keys, or the same request after the repeat window) are scored
    each, so retention may settle them, but the track record counts each outcome once."""
    stored_history()
    copies = [invoke("predictions_create", create_event({"symbol": SYMBOL, "timeframe": "1h"}, f"copy-{n}"))
              for n in range(3)]
    assert [status for status, _, _ in copies] == [201, 201, 201]
    assert len({body["last_candle_at"] for _, _, body in copies}) == 1
    storage.write_candles(SYMBOL, "1h", with_later(storage.read_all_candles(SYMBOL, "1h"), [100.0] * 5))

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(scoring.run(60, batch=1).scored)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 15  # every copy's steps are scored ...
    assert rows(url(), "SELECT count(*) FROM prediction_scores")[0][0] == 15
    assert rows(url(), "SELECT sum(n) FROM model_live_stats")[0][0] == 5  # ... and each outcome counted once
    assert rows(url(), "SELECT count(*) FROM live_outcomes")[0][0] == 5
    assert get_model("1h")[1]["live"]["n_scored"] == 5
    with db.connection() as conn:
        ids = [uuid.UUID(body["id"]) for _, _, body in copies]
        assert sorted(score_repository.get_settled_prediction_ids(conn, ids)) == []  # 25 steps still to come


def test_a_prediction_whose_origin_left_the_stored_file_fails_alone_and_the_run_goes_on(track):
    history = stored_history()
    storage.write_candles("X:SOLUSD", "1h", history)
    lost, other = create(SYMBOL), create("X:SOLUSD")
    later = with_later(history, [100.0] * 3)
    storage.write_candles("X:SOLUSD", "1h", later)
    rebuilt = later.tail(2)  # rebuilt with less history: the origin is gone
    storage.write_candles(SYMBOL, "1h", rebuilt)
    for _ in range(2):  # and it stops no later run either
        report = scoring.run(60)
        assert report.failed == [f"{lost['id']}: the stored 1h candles do not hold this prediction's last candle "
                                 f"({datetime.fromisoformat(lost['last_candle_at'])})"]
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {
        uuid.UUID(other["id"])}


def test_a_defect_met_on_one_prediction_is_logged_by_its_class_and_the_run_goes_on(track, caplog):
    history = stored_history()
    storage.write_candles("X:SOLUSD", "1h", history)
    ids = {uuid.UUID(create(SYMBOL)["id"]), uuid.UUID(create("X:SOLUSD")["id"])}
    for ticker in (SYMBOL, "X:SOLUSD"):
        storage.write_candles(ticker, "1h", with_later(history, [100.0] * 3))
    real = scoring.baseline_log_quantiles
    calls = []

    def fails_first(*args):  # the first prediction looked at meets a defect
        calls.append(args)
        if len(calls) == 1:
            raise IndexError("index 0 is out of bounds (secret-looking text)")
        return real(*args)

    track.setattr(scoring, "baseline_log_quantiles", fails_first)
    report = scoring.run(60)
    scored = {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")}
    assert report.scored == 3 and len(scored) == 1
    assert report.failed == [f"{(ids - scored).pop()}: IndexError"]
    [failure] = [record for record in caplog.records if record.getMessage() == "scoring failed"]
    assert failure.error == "IndexError"
    assert not any("secret-looking" in str(record.__dict__) for record in caplog.records)


def test_a_step_whose_candle_is_missing_stays_unscored_and_keeps_its_prediction(track):
    history = stored_history()
    prediction = create(SYMBOL)
    later = with_later(history, [101.0, 102.0, 103.0, 104.0])
    gap = int(history.open_time[-1]) + 2 * HOUR  # step 2's candle never came
    keep = later.open_time != gap
    storage.write_candles(SYMBOL, "1h", Candles(*(getattr(later, name)[keep] for name in
                                                  ("open_time", "open", "high", "low", "close", "volume"))))
    assert scoring.run(60).scored == 3

    prediction_id = uuid.UUID(prediction["id"])
    scored = [row[0] for row in rows(url(), "SELECT step FROM prediction_scores WHERE prediction_id = %s "
                                          "ORDER BY step", prediction_id)]
    assert scored == [1, 3, 4]
    with db.connection() as conn:
        assert score_repository.get_settled_prediction_ids(conn, [prediction_id]) == []

    storage.write_candles(SYMBOL, "1h", later)  # the missing candle arrives late
    assert scoring.run(60).scored == 1
    assert rows(url(), "SELECT count(*) FROM prediction_scores WHERE prediction_id = %s", prediction_id)[0][0] == 4


def test_a_step_whose_candle_is_a_bad_print_is_not_scored_from_it_and_stays_due(track):
    """The forecaster drops a bad print (`usable_candles`); the scorer took it as the realised close, for good: a
    1h step's pin5 went from 0.3 to 113 and its 95 % band missed."""
    history = stored_history()
    prediction = create(SYMBOL)
    prediction_id = uuid.UUID(prediction["id"])
    storage.write_candles(SYMBOL, "1h", with_later(history, [101.0, 1020.0, 103.0, 104.0]))  # step 2: ×10
    report = scoring.run(60)
    assert [row[0] for row in rows(url(), "SELECT step FROM prediction_scores WHERE prediction_id = %s "
                                          "ORDER BY step", prediction_id)] == [1, 3, 4]
    assert (report.scored, report.bad_prints, report.unmatured) == (3, 1, 26)
    assert next_look(prediction_id) == datetime.fromisoformat(prediction["steps"][1]["ts"])  # not lost: still due
    with db.connection() as conn:
        assert score_repository.get_settled_prediction_ids(conn, [prediction_id]) == []

    storage.write_candles(SYMBOL, "1h", with_later(history, [101.0, 102.0, 103.0, 104.0]))  # the file fixed
    report = scoring.run(60)
    assert (report.scored, report.bad_prints) == (1, 0)
    assert rows(url(), "SELECT realised_close FROM prediction_scores WHERE prediction_id = %s AND step = 2",
                prediction_id) == [(102.0,)]
    assert get_model("1h")[1]["live"]["n_scored"] == 4


@pytest.mark.parametrize("damage", [b"PAR1 not parquet PAR1", "no-close-column"])
def test_a_damaged_candle_file_fails_its_predictions_only_and_the_run_scores_the_others(track, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    history = stored_history()
    storage.write_candles("X:SOLUSD", "1h", history)
    damaged, intact = create("X:SOLUSD"), create(SYMBOL)
    for ticker in (SYMBOL, "X:SOLUSD"):
        storage.write_candles(ticker, "1h", with_later(storage.read_all_candles(ticker, "1h"), [100.0] * 3))
    if isinstance(damage, bytes):
        data = damage
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"open_time": history.open_time[:1], "open": [1.0]}), sink)
        data = sink.getvalue().to_pybytes()
    storage.put_bytes(storage.candles_key("X:SOLUSD", "1h"), data)
    report = scoring.run(60)
    assert report.scored == 3
    assert [line.split(":")[0] for line in report.failed] == [damaged["id"]]
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {
        uuid.UUID(intact["id"])}


def next_look(prediction_id: uuid.UUID) -> datetime | None:
    return rows(url(), "SELECT score_next_at FROM predictions WHERE id = %s", prediction_id)[0][0]


def test_a_prediction_is_looked_at_again_only_when_its_next_step_can_have_matured(track):
    history = stored_history()
    prediction_id = uuid.UUID(create(SYMBOL)["id"])
    origin = datetime.fromtimestamp(int(history.open_time[-1]), UTC)
    assert next_look(prediction_id) is None  # never looked at: due at once
    storage.write_candles(SYMBOL, "1h", with_later(history, [101.0, 102.0, 103.0]))
    assert scoring.run(60).scored == 3
    assert next_look(prediction_id) == origin + timedelta(hours=4)  # step 4's candle is not stored yet

    with db.connection() as conn:  # not due before step 4's ts, due from it
        assert score_repository.get_due_predictions(conn, origin + timedelta(hours=3), NO_ONE, 10) == []
        [due] = score_repository.get_due_predictions(conn, origin + timedelta(hours=4), NO_ONE, 10)
        assert due["id"] == prediction_id and [step["step"] for step in due["steps"]] == [4]

    # Step 4's candle never comes: the prediction stays due while step 4 is inside the scoring window ...
    later = origin + timedelta(hours=20)
    assert scoring.run(60, now=later).scored == 0 and next_look(prediction_id) == origin + timedelta(hours=4)
    # ... and once it has left it, the next look moves to the first step still inside (the window's edge).
    past_window = origin + timedelta(hours=10) + scoring.SCORING_WINDOW
    assert scoring.run(60, now=past_window).scored == 0
    assert next_look(prediction_id) == origin + timedelta(hours=11)
    # After the last step has left it, the prediction is never looked at again.
    scoring.run(60, now=origin + timedelta(hours=31) + scoring.SCORING_WINDOW)
    assert rows(url(), "SELECT score_next_at = 'infinity' FROM predictions WHERE id = %s", prediction_id)[0][0]


NO_ONE = score_repository.NO_PREDICTION


def due_pages(conn, now: datetime, limit: int) -> list[tuple[str, str, uuid.UUID]]:
    """Every due prediction, a page of `limit` at a time from the cursor, as a run takes them."""
    taken, after = [], NO_ONE
    while page := score_repository.get_due_predictions(conn, now, after, limit):
        taken += [score_repository.due_cursor(prediction) for prediction in page]
        after = taken[-1]
    return taken


def test_the_due_query_takes_the_same_predictions_in_series_order_whether_it_walks_or_sorts(track):
    """A backlog walks predictions_score_series_idx from the cursor (migration 0009), an hourly run sorts the due
    ones: both answer every due prediction once, in (ticker, timeframe, id) order, with its unscored steps."""
    now = datetime(2026, 1, 10, tzinfo=UTC)
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute("INSERT INTO symbols (ticker, name, base_currency, quote_currency) VALUES "
                     "('X:AAAUSD', 'A', 'AAA', 'USD'), ('X:BBBUSD', 'B', 'BBB', 'USD')")
        conn.execute("""
            WITH new AS (
                INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close,
                                         request_hash, score_next_at)
                SELECT s.id, s.ticker, m.timeframe, m.id, %(now)s - i * interval '1 day', 100, 'due-' || i,
                       (ARRAY[NULL, %(now)s - interval '1 hour', %(now)s + interval '1 hour',
                              'infinity'])[1 + i %% 4]::timestamptz
                FROM symbols s CROSS JOIN generate_series(1, 12) i
                JOIN models m ON m.is_active AND m.timeframe = (ARRAY['1h', '1d'])[1 + i %% 2]
                WHERE s.ticker IN ('X:AAAUSD', 'X:BBBUSD')
                RETURNING id, last_candle_at
            )
            INSERT INTO prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80, upper_80,
                                          lower_95, upper_95, confidence)
            SELECT id, n, last_candle_at + n * interval '1 hour', 100, 101, 99, 100, 98, 102, 97, 103, 0.5
            FROM new, generate_series(1, 30) n
            """, {"now": now})
        conn.execute("ANALYZE predictions")
        expected = sorted((ticker, timeframe, prediction_id) for prediction_id, ticker, timeframe in conn.execute(
            "SELECT id, ticker, timeframe FROM predictions "
            "WHERE COALESCE(score_next_at, last_candle_at) <= %s AND score_next_at IS DISTINCT FROM 'infinity'",
            (now,)))
    assert len(expected) == 12  # NULL or past, of 2 symbols x 12 (2 timeframes)
    for forced in ("enable_sort", "enable_indexscan"):  # off: walks the series index; off: sorts the due ones
        with psycopg.connect(url(), row_factory=dict_row) as conn:
            conn.execute(f"SET {forced} = off")
            plan = "\n".join(row["QUERY PLAN"] for row in conn.execute(
                "EXPLAIN " + score_repository._DUE, {"now": now, "after_ticker": "", "after_timeframe": "",
                                                     "after_id": NO_ONE[2], "limit": 5}))
            assert ("predictions_score_series_idx" in plan) == (forced == "enable_sort"), plan
            assert due_pages(conn, now, 5) == expected
            [first] = score_repository.get_due_predictions(conn, now, NO_ONE, 1)
            steps = [(step["step"], datetime.fromisoformat(step["ts"])) for step in first["steps"]]
            assert steps and [n for n, _ in steps] == sorted(n for n, _ in steps) and max(ts for _, ts in steps) <= now


def copies_of_one_forecast(count: int) -> list[uuid.UUID]:
    """`count` predictions of SYMBOL from one origin (other Idempotency-Keys), in the order a run takes them."""
    bodies = [invoke("predictions_create", create_event({"symbol": SYMBOL, "timeframe": "1h"}, f"copy-{n}"))[2]
              for n in range(count)]
    return sorted(uuid.UUID(body["id"]) for body in bodies)


def three_copies_and_another_symbols_matured() -> tuple:
    """(the stored history, three predictions of SYMBOL from one origin, one of X:SOLUSD), their next 3 candles
    stored."""
    history = stored_history()
    storage.write_candles("X:SOLUSD", "1h", history)
    copies = copies_of_one_forecast(3)
    other = uuid.UUID(create("X:SOLUSD")["id"])
    for ticker in (SYMBOL, "X:SOLUSD"):
        storage.write_candles(ticker, "1h", with_later(history, [100.0] * 3))
    return history, copies, other


@pytest.mark.parametrize("failure", ["stalled", "damaged", "off the grid"])
def test_a_candle_file_that_fails_is_read_once_per_run_and_its_other_predictions_are_skipped(track, failure):
    """A stalled S3 (StorageUnavailable after the client's timeouts, ~2 s a read) or a corrupt file used to be read
    again for every due prediction of its series: 200 reads, ~400 s, in a batch of a 270 s chunk. A file every read
    refuses (audit N: off its grid) skips its series with the reason, and the run goes on."""
    from candlecast.errors import StorageUnavailable

    history, failing, other = three_copies_and_another_symbols_matured()
    if failure == "damaged":
        storage.put_bytes(storage.candles_key(SYMBOL, "1h"), b"PAR1 not parquet PAR1")
    elif failure == "off the grid":
        later = storage.normalize_candles(with_later(history, [100.0] * 3))
        storage.write_candles(SYMBOL, "1h", Candles(later.open_time + 1800, later.open, later.high, later.low,
                                                    later.close, later.volume))
    reads: list[str] = []
    real = storage.read_all_candles

    def read(ticker: str, timeframe: str):
        reads.append(ticker)
        if failure == "stalled" and ticker == SYMBOL:
            raise StorageUnavailable("storage did not answer in time")
        return real(ticker, timeframe)

    track.setattr(storage, "read_all_candles", read)
    report = scoring.run(60)
    assert reads.count(SYMBOL) == 1 and reads.count("X:SOLUSD") == 1
    assert [line.split(":")[0] for line in report.failed] == [str(failing[0])]
    assert report.skipped == 2 and report.predictions == 4
    [unreadable] = report.unreadable_files
    assert unreadable.startswith(f"{SYMBOL} 1h: ") and unreadable.endswith(report.failed[0].split(": ", 1)[1])
    if failure != "stalled":
        assert unreadable.endswith("is unreadable or not a 1h candle series; it must be repaired before it is "
                                   "forecast from")
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {other}
    # The skipped predictions stay due: the next run tries the file again, and scores them once it can read it.
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0] * 3))
    track.setattr(storage, "read_all_candles", real)
    assert scoring.run(60).scored == 9


def test_a_model_that_fails_to_load_is_fetched_once_per_run_and_its_other_predictions_are_skipped(track):
    """A model file replaced or deleted in the bucket (audit: stores rolled back one by one) was fetched again for
    every due prediction made with it, each logging its own warning; the run now fetches it once, names it once,
    and scores the predictions of other models."""
    from candlecast.errors import ModelIntegrityError

    _, failing, other = three_copies_and_another_symbols_matured()
    with psycopg.connect(url(), autocommit=True) as conn:  # SYMBOL's predictions were made with another model row
        conn.execute("INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, is_active) SELECT timeframe, "
                     "name, 'replaced', kind, s3_key || '.replaced', sha256, false FROM models WHERE is_active "
                     "AND timeframe = '1h'")
        conn.execute("UPDATE predictions SET model_id = (SELECT id FROM models WHERE version = 'replaced') "
                     "WHERE id = ANY(%s)", [failing])
    fetched: list[str] = []
    real = scoring.verified_model

    def verified(row: dict):
        fetched.append(row["version"])
        if row["version"] == "replaced":
            raise ModelIntegrityError("model file sha256 does not match its models row; refusing to load it")
        return real(row)

    track.setattr(scoring, "verified_model", verified)
    report = scoring.run(60)
    assert fetched.count("replaced") == 1
    assert [line.split(":")[0] for line in report.failed] == [str(failing[0])]
    assert report.skipped == 2 and report.predictions == 4
    assert report.unusable_models == ["1h " + report.unusable_models[0].split(" ", 2)[1] + " replaced: model file "
                                      "sha256 does not match its models row; refusing to load it"]
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {other}


def test_a_retired_models_lost_file_is_logged_as_unscored_predictions_not_as_a_model_to_activate(track, caplog):
    """A killed local run lost the files of models it had already retired; Score's one line for each told the
    operator to 'activate another model', which the active one made no sense of."""
    _, failing, _ = three_copies_and_another_symbols_matured()
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute("INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, is_active) SELECT timeframe, "
                     "name, 'retired', kind, s3_key || '.lost', repeat('0', 64), false FROM models WHERE is_active "
                     "AND timeframe = '1h'")
        conn.execute("UPDATE predictions SET model_id = (SELECT id FROM models WHERE version = 'retired') "
                     "WHERE id = ANY(%s)", [failing])
    with caplog.at_level("ERROR"):
        report = scoring.run(60)
    assert report.skipped == 2 and [entry.split(" ")[2] for entry in report.unusable_models] == ["retired:"]
    refused = [record.getMessage() for record in caplog.records if record.getMessage().startswith("model file")]
    assert refused == ["model file refused: the predictions it made are not scored until the registered file and "
                       "its signature are restored"]


def test_a_run_stops_at_its_deadline_inside_a_batch_and_records_what_it_did(track):
    """The deadline used to be looked at between batches only, and scores were written at a batch's end: a batch
    slower than the margin (a stalled S3) was cut off by Lambda's timeout, and lost with its continuation."""
    history = stored_history()
    first, second, third = copies_of_one_forecast(3)
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0] * 3))
    clock = [0.0]
    real = scoring.score_prediction

    def takes_100_seconds(*args):
        clock[0] += 100.0
        return real(*args)

    track.setattr(scoring, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    track.setattr(scoring, "score_prediction", takes_100_seconds)
    report = scoring.run(150)  # one batch of three, the budget spent during the second
    assert report.predictions == 2 and report.scored == 6 and report.batches == 1
    assert report.continuation["after"] == [SYMBOL, "1h", str(second)]
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {first, second}

    rest = scoring.scheduled_run(json.loads(json.dumps(report.continuation)), 150)  # as Lambda hands it on
    assert rest["predictions"] == 1 and rest["scored"] == 3 and rest["continuation"] is None
    assert {row[0] for row in rows(url(), "SELECT prediction_id FROM prediction_scores")} == {first, second, third}


def test_between_refreshes_a_run_reads_no_candle_file_in_vain(track):
    """The refresh records each file's last candle; a prediction whose next step is past it is not due, however
    late it is, so the hourly run reads no file until a refresh has stored the candle it waits for."""
    with one_symbol_refreshed(track) as (refresh_again, ticker, _first):
        prediction_id = uuid.UUID(create(ticker)["id"])
        stored = storage.read_all_candles(ticker, "1h")
        through = rows(url(), "SELECT metadata->'candles_through'->>'1h' FROM symbols WHERE ticker = %s", ticker)
        assert datetime.fromisoformat(through[0][0]) == datetime.fromtimestamp(int(stored.open_time[-1]), UTC)

        reads = []
        real = storage.read_all_candles
        track.setattr(storage, "read_all_candles", lambda *args, **kwargs: reads.append(args) or real(*args, **kwargs))
        later = datetime.now(UTC) + timedelta(days=3)  # step 1 is long past, but its candle is not stored
        first = scoring.run(60, now=later)  # the first look at a new prediction, which sets its next step
        assert first.predictions == 1 and first.scored == 0 and len(reads) == 1
        again = scoring.run(60, now=later)
        assert again.predictions == 0 and len(reads) == 1  # not due: no file read

        refresh_again()  # stores twelve more candles, and scores what they matured
    scored = rows(url(), "SELECT count(*) FROM prediction_scores WHERE prediction_id = %s", prediction_id)[0][0]
    assert scored >= 11  # the refresh's own scoring run found it due


def test_retention_may_delete_only_what_is_scored_or_past_the_scoring_window(track):
    history = stored_history()
    prediction_id = uuid.UUID(create(SYMBOL)["id"])

    def settled() -> bool:
        with db.connection() as conn:
            return score_repository.get_settled_prediction_ids(conn, [prediction_id]) == [prediction_id]

    assert not settled()  # nothing matured yet
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0] * 30))
    assert scoring.run(60).scored == 30
    assert settled()  # every step scored, so aggregated
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute("DELETE FROM prediction_scores")
    assert not settled()  # unscored steps inside the window
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute("UPDATE prediction_steps SET ts = ts - interval '90 days'")
    assert settled()  # given up: their candles never came within the scoring window


# --- live metrics against a hand computation ------------------------------------------------------


def pin5_by_hand(outcome: float, quantiles: list[float]) -> float:
    levels = (0.025, 0.1, 0.5, 0.9, 0.975)
    losses = []
    for level, quantile in zip(levels, quantiles, strict=True):
        error = 100 * (math.log(outcome) - math.log(quantile))
        losses.append(max(level * error, (level - 1) * error))
    return sum(losses) / len(losses)


def test_live_metrics_match_a_hand_computation(track):
    from candlecast.forecast.evaluate import calibration_error, series_origins
    from candlecast.services.model_loading import verified_model

    history = stored_history()
    prediction = create(SYMBOL)
    realised = [101.0, 99.0, 100.2, 97.0]
    storage.write_candles(SYMBOL, "1h", with_later(history, realised))
    assert scoring.run(60).scored == 4

    with db.connection() as conn:
        model_row = conn.execute("SELECT * FROM models WHERE timeframe = '1h' AND is_active").fetchone()
    model = verified_model(model_row)
    tolerance = model.config.tolerance
    steps = prediction["steps"][:4]
    inside_80 = [s["lower_80"] <= c <= s["upper_80"] for s, c in zip(steps, realised, strict=True)]
    inside_95 = [s["lower_95"] <= c <= s["upper_95"] for s, c in zip(steps, realised, strict=True)]
    events = [abs(c / s["close"] - 1) <= tolerance for s, c in zip(steps, realised, strict=True)]
    confidence = [s["confidence"] for s in steps]
    own = [pin5_by_hand(c, [s["lower_95"], s["lower_80"], s["close"], s["upper_80"], s["upper_95"]])
           for s, c in zip(steps, realised, strict=True)]
    # The baseline at the same origin, from the backtest's own origin code (σ of the whole series).
    origins = series_origins(0, history, model.config)
    sigma = float(origins.sigma[-1])
    last_close = prediction["last_close"]
    base = []
    for h, close in enumerate(realised, start=1):
        z = model.baseline_z_quantiles(origins.features[-1:])[0, h - 1][[0, 1, 3, 5, 6]]
        base.append(pin5_by_hand(close, [last_close * math.exp(sigma * math.sqrt(h) * q) for q in z]))

    status, body = get_model("1h")
    live = body["live"]
    assert status == 200 and live["n_scored"] == 4 and live["in_sample"] is False
    assert live["coverage_80"] == pytest.approx(sum(inside_80) / 4)
    assert live["coverage_95"] == pytest.approx(sum(inside_95) / 4)
    assert live["hit_rate"] == pytest.approx(sum(events) / 4)
    assert live["mean_confidence"] == pytest.approx(sum(confidence) / 4)
    assert live["ece"] == pytest.approx(calibration_error(np.array(confidence), np.array(events, dtype=float)))
    assert live["pinball"] == pytest.approx(sum(own) / 4)
    assert live["baseline_pinball"] == pytest.approx(sum(base) / 4, rel=1e-6)
    assert live["pinball_skill"] == pytest.approx(1 - sum(own) / sum(base), rel=1e-6)
    assert [item["h"] for item in live["coverage_by_horizon"]] == [1, 2, 3, 4]
    assert sum(item["n"] for item in live["reliability"]) == 4
    first_ts = datetime.fromtimestamp(int(history.open_time[-1]) + HOUR, UTC)
    assert datetime.fromisoformat(live["period_start"]) == first_ts
    assert datetime.fromisoformat(live["period_end"]) == first_ts + timedelta(hours=3)
    assert body["model"]["accuracy"] == pytest.approx(sum(inside_80) / 4)
    assert body["backtest"]["coverage_80"] == model_row["metrics"]["test"]["coverage_80"]
    assert body["replay"] is None


def test_models_routes_are_cached_until_new_scores_and_refuse_a_bad_timeframe(track):
    status, body = get_model("1h")
    assert status == 200 and body["live"]["n_scored"] == 0
    assert cache.lookup_track_record("1h").value is not None
    status, listing = invoke("symbols", load_event("models_list.json"))[0:3:2]
    assert status == 200 and [item["timeframe"] for item in listing] == ["1h", "4h", "1d", "1w", "1m"]
    assert cache.lookup_track_record(None).value is not None

    history = stored_history()
    create(SYMBOL)
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0, 100.5]))
    assert scoring.run(60).scored == 2
    assert cache.lookup_track_record("1h").value is None and cache.lookup_track_record(None).value is None
    assert get_model("1h")[1]["live"]["n_scored"] == 2

    status, body = get_model("2h")
    assert status == 400 and "timeframe" in body["error"]["message"]


# --- drift -------------------------------------------------------------------------------------------


def steps_for(origin: datetime) -> list[dict]:
    return [{"step": step, "ts": add_steps(origin, "1h", step), "open": 100.0, "high": 101.0, "low": 99.0,
             "close": 100.0, "lower_80": 98.0, "upper_80": 102.0, "lower_95": 96.0, "upper_95": 104.0,
             "confidence": 0.3} for step in range(1, 31)]


def score_predictions(count: int, inside_every: int | None, origin: datetime, hours_apart: int = 1) -> None:
    """`count` stored predictions of the active 1h model, every step scored; 1 in `inside_every` inside the 80 %
    band (None: none)."""
    from candlecast.repositories.predictions import create_prediction
    from candlecast.schemas import PredictionCreate

    with db.connection() as conn:
        symbol_id = conn.execute("SELECT id FROM symbols WHERE ticker = %s", (SYMBOL,)).fetchone()["id"]
        model_id = conn.execute("SELECT id FROM models WHERE timeframe = '1h' AND is_active").fetchone()["id"]
        for index in range(count):
            at = origin + timedelta(hours=index * hours_apart)
            prediction = PredictionCreate(symbol_id=symbol_id, ticker=SYMBOL, timeframe="1h", model_id=model_id,
                                          last_candle_at=at, last_close=100.0, steps=steps_for(at))
            stored = create_prediction(conn, prediction, uuid.uuid4().hex)
            score_repository.record_scores(conn, [
                {"prediction_id": str(stored["id"]), "step": step["step"], "model_id": str(model_id),
                 "ts": step["ts"].isoformat(), "realised_close": 100.0,
                 "inside_80": inside_every is not None and step["step"] % inside_every == 0,
                 "inside_95": True, "confidence": 0.3, "event": False, "pinball": 1.0, "baseline_pinball": 1.0,
                 "in_sample": False}
                for step in prediction.model_dump()["steps"]
            ])
    cache.invalidate_track_record()


def test_drift_is_called_on_evidence_from_blocks_of_outcome_times_not_on_a_count_of_steps(track):
    """Session 34's replay of the held-out walk-forward: a fixed band over >= 500 steps called drift in 24-84 % of
    checks with nothing wrong, since 500 steps of a day or two are one window of co-moving outcomes. Drift now
    needs 5 blocks of outcome days (a week each at 1h) and a coverage outside the band, 3 standard errors (as
    Student's t) from 0.80, the standard error from the spread between blocks (candlecast.drift.live_coverage)."""
    from candlecast.drift import student_t_quantile

    origin = datetime(2026, 1, 1, tzinfo=UTC)
    score_predictions(17, inside_every=2, origin=origin)  # 510 steps at 50 % over 46 hours: no evidence
    assert health()["drift"] == {} and get_model("1h")[1]["drift"] is False
    assert get_model("1h")[1]["live"]["coverage_80"] == pytest.approx(0.5)
    assert get_model("1h")[1]["live"]["coverage_80_standard_error"] is None  # 2 days: no blocks of a week
    # 39 days of hours, 3 steps each, none inside the band
    score_predictions(90, inside_every=None, origin=origin + timedelta(days=10), hours_apart=10)
    report = health()
    assert report["drift"]["1h"]["matured_steps"] == 510 + 2700
    coverage = report["drift"]["1h"]["live_coverage_80"]
    assert coverage == pytest.approx(255 / 3210, abs=1e-4)
    with db.connection() as conn:
        days = conn.execute("SELECT count(*) AS days FROM model_live_days").fetchone()["days"]
    blocks = days // 7
    assert (days, blocks) == (2 + 39, 5)
    assert 0 < report["drift"]["1h"]["standard_error"] < (0.80 - coverage) / student_t_quantile(3.0, blocks - 1)
    assert report["models"]["1h"]["drift"] is True and get_model("1h")[1]["drift"] is True
    served = get_model("1h")[1]["live"]["coverage_80_standard_error"]
    assert served == pytest.approx(report["drift"]["1h"]["standard_error"], abs=1e-4)
    # as long again, every step inside: 0.5 overall, but its blocks swing from none inside to all, so no evidence
    score_predictions(90, inside_every=1, origin=origin + timedelta(days=60), hours_apart=10)
    report = health()
    assert report["drift"] == {} and "drift" not in report["models"]["1h"]
    assert get_model("1h")[1]["drift"] is False
    assert get_model("1h")[1]["live"]["coverage_80"] == pytest.approx(2955 / 5910)


def test_a_drop_after_a_good_year_is_drift_with_the_run_that_dropped(track):
    """A year whose weekly blocks cover 0.75 and 0.85 in turn, then six weeks at 0.45, then today's first hours: the
    whole record still covers 0.76 (inside the band), and the CUSUM over the blocks names the six weeks
    (candlecast.drift)."""
    with db.connection() as conn:
        model_id = conn.execute("SELECT id FROM models WHERE timeframe = '1h' AND is_active").fetchone()["id"]
        shares = [0.75, 0.85] * 26 + [0.45] * 6
        first = date.today() - timedelta(days=7 * len(shares))
        rows = [(first + timedelta(days=day), 700, round(700 * shares[day // 7])) for day in range(7 * len(shares))]
        rows.append((date.today(), 30, 24))
        conn.cursor().executemany("INSERT INTO model_live_days (model_id, day, n, inside_80) VALUES (%s, %s, %s, %s)",
                                  [(model_id, *row) for row in rows])
    cache.invalidate_track_record()
    drift = health()["drift"]["1h"]
    assert 0.72 < drift["live_coverage_80"] == pytest.approx((26 * 0.8 * 2 + 6 * 0.45) / 58, abs=1e-3)
    assert (drift["recent_coverage_80"], drift["recent_days"], drift["recent_steps"]) == (0.45, 42, 42 * 700)
    assert get_model("1h")[1]["drift"] is True


def test_in_sample_replays_are_reported_apart_and_never_drift(track):
    with db.connection() as conn:
        conn.execute("UPDATE models SET train_end = now() + interval '1 day' WHERE timeframe = '1h'")
    history = stored_history()
    create(SYMBOL)
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0, 100.5, 99.0]))
    assert scoring.run(60).scored == 3
    body = get_model("1h")[1]
    assert body["live"]["n_scored"] == 0 and body["replay"]["n_scored"] == 3 and body["replay"]["in_sample"]
    assert body["model"]["accuracy"] is None  # the live accuracy counts out-of-sample steps only


def test_score_function_hands_what_is_left_to_a_new_invocation(track):
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/score")
    history = stored_history()
    create(SYMBOL)
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0, 100.5, 99.0]))
    track.setenv("REFRESH_CHAIN", "false")
    from candlecast.config import get_settings

    get_settings.cache_clear()
    scheduled = json.loads((EVENTS / "score_scheduled.json").read_text())
    first = handler(scheduled, RefreshContext(remaining_seconds=30))  # nothing left beyond the margin
    assert first["scored"] == 0 and first["continuation"]["after"] == ["", "", str(uuid.UUID(int=0))]
    assert first["chained"] is False  # REFRESH_CHAIN=false: returned, not invoked
    continuation = json.loads(json.dumps(first["continuation"]))  # as Lambda hands it to the next chunk
    assert scoring.ScoreEvent.parse(continuation).now.isoformat() == continuation["now"]
    second = handler(continuation, RefreshContext(remaining_seconds=300))
    assert second["scored"] == 3 and second["continuation"] is None
    assert handler(scheduled, RefreshContext(remaining_seconds=300))["scored"] == 0
    # A continuation from before series order (a bare id) starts over, and scores nothing twice.
    assert handler({**first["continuation"], "after": str(uuid.uuid4())},
                   RefreshContext(remaining_seconds=300))["scored"] == 0
    assert handler({}, RefreshContext(remaining_seconds=300))["scored"] == 0  # as Refresh starts it


def test_a_score_chunk_emits_the_counts_its_failed_share_alarm_reads(track, capsys):
    """Score emitted no metric: a chunk whose predictions failed (the bucket unreachable, a damaged file) completed,
    queued no failed run, and nothing could alarm on it or show what a run scored. Its report's counts now go out as
    EMF metrics, with the namespace, names and dimensions ScoreFailedShareAlarm reads."""
    from candlecast.config import get_settings
    from candlecast.errors import StorageUnavailable
    from infra import template_checks
    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    handler = load_handler("functions/score")
    history = stored_history()
    storage.write_candles("X:SOLUSD", "1h", history)
    copies_of_one_forecast(3)
    create("X:SOLUSD")
    for ticker in (SYMBOL, "X:SOLUSD"):
        storage.write_candles(ticker, "1h", with_later(history, [100.0] * 3))
    real = storage.read_all_candles

    def read(ticker: str, timeframe: str):
        if ticker == SYMBOL:
            raise StorageUnavailable("storage did not answer in time")
        return real(ticker, timeframe)

    track.setattr(storage, "read_all_candles", read)
    track.setenv("REFRESH_CHAIN", "false")
    get_settings.cache_clear()
    capsys.readouterr()
    report = handler(json.loads((EVENTS / "score_scheduled.json").read_text()), RefreshContext(remaining_seconds=300))
    assert (report["predictions"], len(report["failed"]), report["skipped"], report["scored"]) == (4, 1, 2, 3)
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "ScorePredictions" in blob]
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    assert {metric["Name"]: metric["Unit"] for metric in directive["Metrics"]} == {
        "ScorePredictions": "Count", "ScorePredictionsFailed": "Count", "ScorePredictionsSkipped": "Count",
        "ScoreStepsScored": "Count", "ModelsDrifting": "Count"}
    assert ([blob["ScorePredictions"], blob["ScorePredictionsFailed"], blob["ScorePredictionsSkipped"],
             blob["ScoreStepsScored"]] == [[4.0], [1.0], [2.0], [3.0]])
    assert (blob["stage"], blob["function"]) == ("local", "score")

    template = template_checks.load_template()
    alarm = template["Resources"]["ScoreFailedShareAlarm"]["Properties"]
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    assert queries["share"]["Expression"] == "(failed + skipped) / predictions"
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0.2, "GreaterThanOrEqualToThreshold")
    assert {name: query["MetricStat"]["Metric"]["MetricName"] for name, query in queries.items()
            if "MetricStat" in query} == {"failed": "ScorePredictionsFailed", "skipped": "ScorePredictionsSkipped",
                                          "predictions": "ScorePredictions"}
    for query in queries.values():
        if "MetricStat" not in query:
            continue
        stat = query["MetricStat"]
        # CloudWatch matches a metric by its namespace and its whole set of dimensions: `service` comes from
        # POWERTOOLS_SERVICE_NAME as the process had it when the module was loaded (the template sets it for every
        # function; a test that loaded the function earlier may not have)
        dimensions = {item["Name"]: item["Value"] for item in stat["Metric"]["Dimensions"]}
        assert {"function", "stage"} <= set(directive["Dimensions"][0]) <= set(dimensions)
        assert set(dimensions) == {"function", "service", "stage"}
        assert stat["Metric"]["Namespace"] == "Candlecast" and dimensions["stage"] == {"Ref": "Stage"}
        assert (dimensions["function"], dimensions["service"]) == (blob["function"], "candlecast")
        assert stat["Stat"] == "Sum"
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    assert variables["POWERTOOLS_METRICS_NAMESPACE"] == "Candlecast"  # the tests' is CandlecastTest


def test_a_score_run_emits_how_old_the_newest_stored_candle_is_for_the_stale_candles_alarm(track, capsys):
    """Nothing went off when the weekly Refresh stopped storing candles (its schedule disabled, or every run failing
    before a file was written): no run failed or was queued. Each Score chunk now reports the hours from the newest
    candle the refresh recorded (any active symbol, any timeframe) to its now, as StaleCandlesAlarm reads it."""
    from candlecast.config import get_settings
    from candlecast.repositories import symbols as symbol_repository
    from infra import template_checks
    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    handler = load_handler("functions/score")
    track.setenv("REFRESH_CHAIN", "false")
    get_settings.cache_clear()
    now = {"now": "2026-11-30T06:00:00+00:00"}
    capsys.readouterr()
    assert handler(now, RefreshContext(remaining_seconds=300))["stored_candles_age_hours"] is None  # only seeded
    assert not [blob for blob in emf_blobs(capsys.readouterr().out) if "StoredCandlesAgeHours" in blob]
    with db.connection() as conn:
        for ticker, through in (("X:ETHUSD", {"1h": "2026-11-20T05:00:00+00:00", "1d": "2026-11-19T00:00:00+00:00"}),
                                ("X:SOLUSD", {"1d": "2026-11-10T00:00:00+00:00"})):
            symbol_repository.set_candle_timeframes(conn, ticker, list(through), through, lock_timeout=1.0)
    report = handler(now, RefreshContext(remaining_seconds=300))
    assert report["stored_candles_age_hours"] == 241.0  # from X:ETHUSD's 1h, the newest
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "StoredCandlesAgeHours" in blob]
    assert blob["StoredCandlesAgeHours"] in (241.0, [241.0])
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    assert {metric["Name"]: metric["Unit"] for metric in directive["Metrics"]}["StoredCandlesAgeHours"] == "None"

    alarm = template_checks.load_template()["Resources"]["StaleCandlesAlarm"]["Properties"]
    dimensions = {item["Name"]: item["Value"] for item in alarm["Dimensions"]}
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == (
        "Candlecast", "StoredCandlesAgeHours", "Maximum")
    assert dimensions == {"service": "candlecast", "stage": {"Ref": "Stage"}, "function": blob["function"]}
    assert {"function", "stage"} <= set(directive["Dimensions"][0])
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (192, "GreaterThanThreshold")
    assert report["stored_candles_age_hours"] > alarm["Threshold"]  # this run's figure would set it off


def test_a_score_run_emits_how_many_models_drift_for_the_model_drift_alarm(track, capsys, caplog):
    """`drift` was seen only by whoever read GET /health: nothing told an operator. The Score chunk that finishes a
    run now judges it after recording its scores, reports and logs the drifted models and emits `ModelsDrifting`,
    which ModelDriftAlarm reads (above 0 in two consecutive hours)."""
    from candlecast.config import get_settings
    from infra import template_checks
    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    handler = load_handler("functions/score")
    track.setenv("REFRESH_CHAIN", "false")
    get_settings.cache_clear()
    now = {"now": "2026-11-30T06:00:00+00:00"}
    capsys.readouterr()
    assert handler(now, RefreshContext(remaining_seconds=300))["drifting"] == {}
    assert [blob["ModelsDrifting"] for blob in emf_blobs(capsys.readouterr().out) if "ModelsDrifting" in blob] in (
        [0.0], [[0.0]])
    score_predictions(90, inside_every=None, origin=datetime(2026, 1, 1, tzinfo=UTC), hours_apart=10)  # 38 days
    report = handler(now, RefreshContext(remaining_seconds=300))
    assert report["drifting"] == health()["drift"] and set(report["drifting"]) == {"1h"}
    assert report["drifting"]["1h"]["live_coverage_80"] == 0.0
    out = capsys.readouterr().out
    (blob,) = [blob for blob in emf_blobs(out) if "ModelsDrifting" in blob]
    assert blob["ModelsDrifting"] in (1.0, [1.0])
    # a chunk whose time is spent hands on its continuation and says nothing: the alarm keeps its state
    spent = handler(now, RefreshContext(remaining_seconds=30))
    assert spent["continuation"] is not None and spent["drifting"] is None
    assert not [blob for blob in emf_blobs(capsys.readouterr().out) if "ModelsDrifting" in blob]
    (line,) = [record for record in caplog.records if record.getMessage().startswith("model drifting")]
    assert line.levelno == logging.WARNING and line.drift == report["drifting"]

    alarm = template_checks.load_template()["Resources"]["ModelDriftAlarm"]["Properties"]
    dimensions = {item["Name"]: item["Value"] for item in alarm["Dimensions"]}
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == ("Candlecast", "ModelsDrifting", "Maximum")
    assert dimensions == {"service": "candlecast", "stage": {"Ref": "Stage"}, "function": blob["function"]}
    assert (alarm["Threshold"], alarm["ComparisonOperator"], alarm["EvaluationPeriods"], alarm["TreatMissingData"]) == (
        0, "GreaterThanThreshold", 2, "ignore")
    notify = {"Fn::If": ["AlarmTopicOn", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    assert alarm["AlarmActions"] == alarm["OKActions"] == notify


SCORE_NOW = datetime(2026, 11, 30, 6, tzinfo=UTC)


@pytest.mark.parametrize(("event", "field"), [
    ({"now": "yesterday"}, "now"), ({"now": "2026-11-30T06:00:00"}, "now"),  # no timezone: which 06:00?
    ({"now": "in 30 days"}, "now"),  # would give up a month of steps (made when the test runs, below)
    ({"now": "0001-01-01T00:00:00+00:00"}, "now"),  # an OverflowError's traceback
    ({"now": SCORE_NOW.isoformat(), "since": (SCORE_NOW + timedelta(hours=1)).isoformat()}, "since"),
    ({"since": "1969-12-31T00:00:00+00:00"}, "since"),
    ({"after": "abc"}, "after"), ({"after": 7}, "after"), ({"after": [SYMBOL, "1h"]}, "after.2"),
    ({"after": [SYMBOL, "2h", str(uuid.uuid4())]}, "after.1"),
    ({"after": [SYMBOL, "1h", "not-an-id"]}, "after.2"),  # a ValueError's traceback
    ({"after": [5, "1h", str(uuid.uuid4())]}, "after.0"), ({"afer": None}, "afer"),
])
def test_a_score_event_out_of_bounds_is_refused_naming_the_field_before_anything_runs(monkeypatch, event, field):
    """The event was taken raw: a word or a bad id was a traceback, a `now` in the future gave up every step
    older than 45 days before it, a bad cursor started the run over without a word, an unknown field was ignored."""
    from candlecast.errors import InvalidEvent

    monkeypatch.setattr(scoring, "run", lambda *args, **kwargs: pytest.fail("a refused event ran"))
    if event.get("now") == "in 30 days":  # from the clock at the test, not at collection (make test-clock moves it)
        event = {"now": (datetime.now(UTC) + timedelta(days=30)).isoformat()}
    with pytest.raises(InvalidEvent, match=f"^score event refused, nothing was run: {re.escape(field)}: "):
        scoring.scheduled_run(event, 300)


def test_the_score_function_refuses_a_bad_event_in_one_line_without_a_traceback(monkeypatch, caplog):
    from candlecast.errors import InvalidEvent
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/score")
    monkeypatch.setattr(scoring, "run", lambda *args, **kwargs: pytest.fail("a refused event ran"))
    with caplog.at_level(logging.INFO), pytest.raises(InvalidEvent) as raised:
        handler({"now": "today", "after": "abc"}, RefreshContext(remaining_seconds=300))
    assert str(raised.value).startswith("score event refused, nothing was run: now: Input should be a valid datetime")
    assert "; after: " in str(raised.value)
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert record.getMessage() == "run refused" and record.exc_info is None
    assert record.event == {"now": "today", "after": "abc"}



@contextmanager
def models_locked():
    """models held as migration 0008's deploy held it (SHARE ROW EXCLUSIVE, for about 40 s)."""
    with psycopg.connect(url()) as conn:
        conn.execute("LOCK TABLE models IN SHARE ROW EXCLUSIVE MODE")
        yield
        conn.rollback()


def test_an_accuracy_update_that_cannot_run_is_reported_and_the_continuation_still_handed_on(track):
    """The accuracy update ran after the loop and raised (LockNotAvailable after the Score function's 30 s
    lock_timeout, behind a migration), so run_chunk raised: the report and the continuation were lost."""
    from infra.lambda_loader import load_handler
    from tests.conftest import reset_clients

    track.setenv("DB_STATEMENT_TIMEOUT", "60")  # as the template sets it for Score: lock_timeout 30 s
    track.setenv("REFRESH_CHAIN", "false")
    reset_clients()
    handler = load_handler("functions/score")
    history = stored_history()
    create(SYMBOL)
    storage.write_candles(SYMBOL, "1h", with_later(history, [100.0, 100.5, 99.0]))
    scheduled = json.loads((EVENTS / "score_scheduled.json").read_text())
    with models_locked():
        started = time.monotonic()
        first = handler(scheduled, RefreshContext(remaining_seconds=30))  # nothing left beyond the margin
        waited = time.monotonic() - started
        assert first["continuation"] is not None and first["accuracy_error"].startswith("models was locked")
        assert waited < 10, waited  # the update's own lock_timeout (2 s), not the function's 30 s
        second = handler(first["continuation"], RefreshContext(remaining_seconds=300))
        assert second["scored"] == 3 and second["accuracy_error"].startswith("models was locked")
    assert rows(url(), "SELECT accuracy FROM models WHERE timeframe = '1h' AND is_active")[0][0] is None
    assert get_model("1h")[1]["live"]["n_scored"] == 3  # the scores are recorded and served all the same
    third = handler(scheduled, RefreshContext(remaining_seconds=300))  # the next run brings accuracy up to date
    assert third["scored"] == 0 and third["accuracy_error"] is None
    assert rows(url(), "SELECT accuracy FROM models WHERE timeframe = '1h' AND is_active")[0][0] is not None


def test_backtest_figures_read_the_peer_comparison_of_newer_manifests():
    from candlecast.services.track_record import backtest_figures

    per_horizon = {"coverage_80": [0.79, 0.81], "coverage_95": [0.95, 0.96], "pin5": [0.5, 0.6]}
    comparison = {"reference": "learned", "methods": {
        "learned": {"pin5": 0.9, "coverage_80": 0.8, "coverage_95": 0.955, "ece": 0.01, "n_pairs": 60,
                    "n_origins": 30, "per_horizon": per_horizon,
                    "reliability": [{"confidence": 0.15, "observed": 0.14, "count": 40},
                                    {"confidence": 0.45, "observed": 0.5, "count": 20}]},
        "baseline": {"pin5": 1.0}, "garch-t": {"pin5": 0.95}}}
    figures = backtest_figures({"comparison": comparison}, detail=True)
    assert (figures.coverage_80, figures.coverage_95, figures.ece, figures.n_pairs) == (0.8, 0.955, 0.01, 60)
    assert figures.pinball_skill == pytest.approx(0.1)  # against its own baseline, as the live figure
    assert [(c.h, c.coverage_80, c.coverage_95) for c in figures.coverage_by_horizon] == [(1, 0.79, 0.95),
                                                                                        (2, 0.81, 0.96)]
    assert [(b.mean_confidence, b.observed, b.n) for b in figures.reliability] == [(0.15, 0.14, 40), (0.45, 0.5, 20)]


# --- the seed's track record: past origins after the model's training window ----------------------------

SAMPLE_SERIES = "BTCUSDT"  # a committed 1h sample file (data/BTCUSDT/1h.parquet)


@pytest.fixture
def one_series(tmp_path):
    """A data folder holding one committed series (the track fixture's seed already put it in the bucket)."""
    from candlecast.forecast.dataset import read_ohlcv
    from tests.conftest import ROOT

    source = ROOT / "data" / SAMPLE_SERIES / "1h.parquet"
    (tmp_path / SAMPLE_SERIES).mkdir()
    (tmp_path / SAMPLE_SERIES / "1h.parquet").write_bytes(source.read_bytes())
    return tmp_path, read_ohlcv(source).open_time


def set_train_end(moment: datetime | None) -> None:
    with db.connection() as conn:
        conn.execute("UPDATE models SET train_end = %s WHERE timeframe = '1h' AND is_active", (moment,))
    cache.invalidate_track_record()


def at(epoch) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)


def test_past_origins_lie_after_the_training_window_with_a_candle_left_to_score():
    from candlecast.seed import past_origins

    times = 1_600_000_000 + HOUR * np.arange(300)
    chosen = past_origins(times, train_end=at(times[199]), min_history=48, stride=4, most=15)
    assert len(chosen) == 15 and chosen[0] == 200 and chosen[-1] == 298  # spread over 200..298
    assert min(np.diff(chosen)) >= 4
    assert past_origins(times, train_end=at(times[-2])) == []  # only the last candle follows: nothing to score
    assert past_origins(times, train_end=at(times[-1])) == []
    assert past_origins(times, train_end=at(times[0] - HOUR), min_history=48, most=15)[0] == 48  # history first
    assert past_origins(times, as_of=at(times[250]), stride=4) == list(range(250, 299, 4))  # operator: every 4th
    assert past_origins(times, stride=4, most=15) == list(range(242, 299, 4))  # the last 15, as a replay


def test_seed_scores_origins_after_the_training_window_as_live_figures(track, one_series, capsys):
    from candlecast.seed import build_track_record

    data_dir, times = one_series
    train_end = at(times[-101])  # the model's window ends 100 candles before the sample does
    set_train_end(train_end)
    created, scored, [plan] = build_track_record(data_dir, progress=False)
    assert plan.mode == "live" and "live" in capsys.readouterr().out
    origins = [index for _, _, index in plan.origins]
    assert created == len(origins) == 15 and all(times[i] > train_end.timestamp() for i in origins)
    expected = sum(min(30, len(times) - 1 - index) for index in origins)  # steps whose candle is stored
    assert scored == expected

    made = rows(url(), "SELECT min(last_candle_at) FROM predictions WHERE timeframe = '1h'")[0][0]
    assert made > train_end
    status, body = get_model("1h")
    live = body["live"]
    assert status == 200 and live["n_scored"] == expected > 0 and body["replay"] is None
    assert datetime.fromisoformat(live["period_start"]) > train_end
    assert datetime.fromisoformat(live["period_end"]) == at(times[-1])
    assert body["model"]["accuracy"] == pytest.approx(live["coverage_80"])
    assert build_track_record(data_dir, progress=False)[:2] == (0, 0)  # a second seed adds nothing


def test_seed_says_so_when_no_stored_candle_follows_the_training_window(track, one_series, capsys):
    from candlecast.seed import SeedReport, build_track_record

    data_dir, times = one_series
    set_train_end(at(times[-1]))  # trained up to the sample's last candle
    created, scored, [plan] = build_track_record(data_dir, progress=False)
    out = capsys.readouterr().out
    assert plan.mode == "replay" and "NO LIVE FIGURES" in out and at(times[-1]).strftime("%Y-%m-%d") in out
    assert created == 15 and scored > 0
    body = get_model("1h")[1]
    assert body["live"]["n_scored"] == 0 and body["replay"]["n_scored"] == scored
    assert body["model"]["accuracy"] is None
    assert "NO LIVE FIGURES for 1h" in SeedReport(no_live=["1h"]).summary()


def test_seed_without_a_train_end_makes_no_track_record(track, one_series, capsys):
    from candlecast.seed import build_track_record

    data_dir, _ = one_series
    set_train_end(None)
    created, scored, [plan] = build_track_record(data_dir, progress=False)
    assert (plan.mode, created, scored) == ("none", 0, 0) and "no train_end" in capsys.readouterr().out


def test_operator_as_of_may_start_inside_the_training_window_and_is_reported_apart(track, one_series):
    from candlecast.seed import build_track_record

    data_dir, times = one_series
    train_end = at(times[-41])
    set_train_end(train_end)
    created, scored, [plan] = build_track_record(data_dir, as_of=at(times[-81]), progress=False)
    assert plan.mode == "as-of" and created == 20  # every 4th candle from the 81st last to the 2nd last
    body = get_model("1h")[1]
    assert body["live"]["n_scored"] > 0 and body["replay"]["n_scored"] > 0
    assert body["live"]["n_scored"] + body["replay"]["n_scored"] == scored
    assert datetime.fromisoformat(body["replay"]["period_start"]) <= train_end
