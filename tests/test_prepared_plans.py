"""The hot queries keep an index plan once psycopg prepares them and PostgreSQL plans them generically.

psycopg prepares a statement after DB_PREPARE_THRESHOLD (5) executions and PostgreSQL may then switch it to
a generic plan, parameters unknown. These tests run each hot path more than ten times through the pool,
against tables big enough that a scan loses, and read the plan of the prepared statement itself (forced
generic, the case that hurt: a `$1 IS NULL` branch kept the duplicate check off its indexes), not a timing.
"""

import re
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from candlecast import db
from candlecast.repositories import predictions as prediction_repository
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import PredictionCreate, PredictionStepCreate
from infra.plans import explain_prepared, recording

pytestmark = pytest.mark.integration

PREDICTIONS = 30_000
SYMBOLS = 20_000
RUNS = 12  # past psycopg's prepare threshold (5) and PostgreSQL's five custom plans


@pytest.fixture
def big_tables(clean_db, monkeypatch):
    """30k predictions (a fifth on one symbol) and 20k symbols, built with generate_series, then analysed."""
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "1")  # one pooled connection: the one whose statements we inspect
    monkeypatch.setenv("DB_PREPARE_THRESHOLD", "5")
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO symbols (ticker, name, base_currency, quote_currency, volume_24h)
            SELECT 'X:' || base || 'USD', 'Coin ' || base, base, 'USD', i
            FROM (SELECT i, chr(65 + i %% 26) || i AS base FROM generate_series(1, %s) i) g
        """, (SYMBOLS,))
        model_id = conn.execute("""
            INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, is_active)
            VALUES ('1h', 'plan-test', '1', 'baseline', 'models/1h.pkl', repeat('0', 64), true) RETURNING id
        """).fetchone()[0]
        conn.execute("""
            INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close,
                                     idempotency_key, request_hash, created_at)
            SELECT s.id, s.ticker, (ARRAY['1h', '4h', '1d', '1w', '1m'])[1 + i %% 5], %(model)s,
                   now() - i * interval '1 minute', 100,
                   CASE WHEN i %% 3 = 0 THEN 'key-' || i END, md5(i::text), now() - i * interval '1 minute'
            FROM generate_series(1, %(count)s) i
            JOIN symbols s ON s.id = CASE WHEN i %% 5 = 0 THEN 1 ELSE 1 + i %% %(symbols)s END
        """, {"model": model_id, "count": PREDICTIONS, "symbols": SYMBOLS})
        conn.execute("ANALYZE symbols, models, predictions")
    from tests.conftest import reset_clients

    reset_clients()
    yield model_id
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE prediction_steps, predictions, models, symbols RESTART IDENTITY CASCADE")
    reset_clients()


def a_prediction(model_id, idempotency_key: str | None) -> PredictionCreate:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return PredictionCreate(
        symbol_id=1, ticker="X:B1USD", timeframe="1h", model_id=model_id, last_candle_at=start, last_close=100,
        idempotency_key=idempotency_key,
        steps=[PredictionStepCreate(step=n, ts=start + timedelta(hours=n), open=100, high=101, low=99, close=100,
                                    lower_80=98, upper_80=102, lower_95=97, upper_95=103, confidence=0.5)
               for n in range(1, 31)],
    )


def generic_plan(executed) -> str:
    with db.connection() as conn:
        prepared = explain_prepared(conn, executed, force_generic=True)
    assert prepared is not None, f"not prepared after {RUNS} runs: {executed.query[:80]}"
    return prepared.plan


def rows_read(plan: str, relation: str) -> list[float]:
    """Actual rows of each index scan on `relation` (times its loops)."""
    pattern = re.compile(rf"Index (?:Only )?Scan (?:Backward )?using \w+ on {relation}\b.*rows=([\d.]+) loops=(\d+)")
    return [float(rows) * int(loops) for rows, loops in pattern.findall(plan)]


def last_run_of(executed: list, statement: str):
    return [run for run in executed if run.query == statement][-1]


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_create_duplicate_check_keeps_its_index_under_a_generic_plan(big_tables, keyed):
    with recording() as executed:
        for _ in range(RUNS):
            key = f"test-{uuid.uuid4()}" if keyed else None
            with db.connection() as conn:
                stored = prediction_repository.create_prediction(conn, a_prediction(big_tables, key),
                                                                 uuid.uuid4().hex)
            assert stored["created"]
    statement = prediction_repository.CREATE_KEYED if keyed else prediction_repository.CREATE_UNKEYED
    plan = generic_plan(last_run_of(executed, statement))
    twin_lookup = plan.split("CTE inserted")[0]
    index = "predictions_idempotency_key_unique" if keyed else "predictions_request_hash_created_idx"
    assert f"Index Scan using {index} on predictions" in twin_lookup, plan
    # Not a walk through the newest rows of the whole table, filtering each (what the generic plan did).
    assert "Seq Scan on predictions" not in plan and "predictions_created_idx" not in plan, plan
    with db.connection() as conn:
        generic_runs = conn.execute("SELECT sum(generic_plans) AS n FROM pg_prepared_statements "
                                    "WHERE statement LIKE '%%INSERT INTO predictions%%'").fetchone()["n"]
    assert generic_runs >= 1  # PostgreSQL did choose the generic plan for some of the runs


@pytest.mark.parametrize("timeframe", ["1h", None], ids=["timeframe", "any-timeframe"])
def test_recent_by_symbol_reads_only_the_newest_rows_under_a_generic_plan(big_tables, timeframe):
    with recording() as executed:
        for _ in range(RUNS):
            with db.connection() as conn:
                rows = prediction_repository.get_recent_predictions_by_symbol(conn, 1, timeframe, 20)
            assert len(rows) == 20
    plan = generic_plan(executed[-1])
    assert "Seq Scan on predictions" not in plan, plan
    assert "predictions_symbol_timeframe_created_idx" in plan, plan
    # The symbol has 6,000 predictions; each index scan stops at the limit (and one row more, which closes the
    # last created_at group of the incremental sort on created_at, id).
    assert rows_read(plan, "predictions") and max(rows_read(plan, "predictions")) <= 21, plan


@pytest.mark.parametrize("query", ["B", "B1USD", "coin b", "COIN B"])
def test_search_reads_at_most_the_limit_per_part_under_a_generic_plan(big_tables, query):
    with recording() as executed:
        for _ in range(RUNS):
            with db.connection() as conn:
                rows = symbol_repository.search_symbols(conn, query, 5)
            assert rows
    plan = generic_plan(executed[-1])
    assert "Seq Scan on symbols" not in plan, plan
    for index in ("symbols_ticker_prefix_idx", "symbols_lower_name_prefix_idx"):
        assert f"Index Scan using {index}" in plan, plan
    # "B" starts about 770 tickers; each part stops at the limit (the name part one row more, which closes the
    # last group of its incremental sort on lower(name), ticker).
    assert max(rows_read(plan, "symbols")) <= 6, plan


def deep_anchor(conn: psycopg.Connection, statement: str, depth: int, *params) -> tuple:
    return conn.execute(statement + " OFFSET %s LIMIT 1", (*params, depth)).fetchone()


@pytest.mark.parametrize("timeframe", ["1h", None], ids=["timeframe", "any-timeframe"])
def test_a_deep_page_of_recent_by_symbol_reads_only_its_rows_under_a_generic_plan(big_tables, timeframe):
    with psycopg.connect(db.get_settings().database_url.get_secret_value()) as conn:
        after = deep_anchor(conn, "SELECT created_at, id FROM predictions WHERE symbol_id = 1 AND (timeframe = %s "
                            "OR %s::text IS NULL) ORDER BY created_at DESC, id DESC", 1000, timeframe, timeframe)
    with recording() as executed:
        for _ in range(RUNS):
            with db.connection() as conn:
                rows = prediction_repository.get_recent_predictions_by_symbol(conn, 1, timeframe, 20, after)
            assert len(rows) == 20 and (rows[0]["created_at"], rows[0]["id"]) < after
    plan = generic_plan(executed[-1])
    assert "predictions_symbol_timeframe_created_idx" in plan and "Seq Scan on predictions" not in plan, plan
    # 1,000 rows deep (6,000 on the symbol), each index scan starts at the anchor and stops at the limit.
    assert rows_read(plan, "predictions") and max(rows_read(plan, "predictions")) <= 21, plan


@pytest.mark.parametrize("listing", ["top", "search B", "search coin b"])
def test_a_deep_page_of_symbols_reads_only_its_rows_under_a_generic_plan(big_tables, listing):
    query = listing.removeprefix("search ")
    with psycopg.connect(db.get_settings().database_url.get_secret_value()) as conn:
        if listing == "top":
            statement = "SELECT ticker, volume_24h FROM symbols ORDER BY volume_24h DESC NULLS LAST, ticker"
        elif query == "B":
            statement = "SELECT ticker, volume_24h, name, 1 FROM symbols WHERE ticker LIKE 'X:B%%' " \
                        "ORDER BY ticker COLLATE \"C\""
        else:
            statement = "SELECT ticker, volume_24h, name, 2 FROM symbols WHERE lower(name) LIKE 'coin b%%' " \
                        "ORDER BY lower(name) COLLATE \"C\", ticker"
        after = tuple(deep_anchor(conn, statement, 500))
    with recording() as executed:
        for _ in range(RUNS):
            with db.connection() as conn:
                rows = (symbol_repository.get_top_symbols_by_volume(conn, 5, after) if listing == "top"
                        else symbol_repository.search_symbols(conn, query, 5, after))
            assert len(rows) == 5 and after[0] not in [row["ticker"] for row in rows]
    plan = generic_plan(executed[-1])
    assert "Seq Scan on symbols" not in plan, plan
    # 500 rows deep: each part starts at the anchor and stops at the limit (and the row closing a sort group).
    assert max(rows_read(plan, "symbols")) <= 6, plan
