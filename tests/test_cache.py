"""The Redis cache against a real server: TTLs per kind, SCAN-based pattern delete, and outage behaviour."""

import logging
import time

import pytest
import redis

from candlecast import cache

pytestmark = pytest.mark.integration


@pytest.fixture
def server(clean_db):
    return redis.Redis.from_url(clean_db.redis_url)


@pytest.mark.parametrize(
    ("store", "key", "ttl"),
    [
        (lambda: cache.set_candles("X:BTCUSD", "1h", b"packed"), cache.keys.candles("X:BTCUSD", "1h"), 3600),
        (lambda: cache.set_prediction_bytes("p1", b"{}"), cache.keys.prediction("p1"), 900),
        (lambda: cache.set_symbol_bytes("X:BTCUSD", b"{}"), cache.keys.symbol("X:BTCUSD"), 86400),
        (lambda: cache.set_top_symbols_bytes(10, b"[]"), cache.keys.top_symbols(10), 3600),
    ],
    ids=["fresh-candles-1h", "prediction-15m", "symbol-24h", "top-symbols-1h"],
)
def test_domain_helpers_use_each_kinds_ttl(server, store, key, ttl):
    assert store() is True
    assert ttl - 5 <= server.ttl(key) <= ttl


def test_json_round_trip_and_delete(server):
    cache.set_json("cc:v1:test:one", {"a": [1, 2]}, 60)
    assert cache.get_json("cc:v1:test:one") == {"a": [1, 2]}
    assert cache.delete("cc:v1:test:one") == 1
    assert cache.get_json("cc:v1:test:one") is None


def test_pattern_delete_uses_scan_and_spares_other_keys(server):
    for index in range(1200):
        server.set(f"cc:v1:symbol:X:T{index}", b"1")
    server.set("cc:v1:prediction:keep", b"1")
    server.config_resetstat()
    assert cache.delete_pattern(cache.keys.all_symbol_keys()) == 1200
    commands = server.info("commandstats")
    assert "cmdstat_scan" in commands
    assert "cmdstat_keys" not in commands
    assert server.exists("cc:v1:prediction:keep") == 1


def test_outage_misses_skips_writes_and_warns_once(server, needs_embedded_redis, caplog):
    cache.set_symbol_bytes("X:ETHUSD", b"{}")
    needs_embedded_redis.stop()
    try:
        with caplog.at_level(logging.WARNING):
            started = time.perf_counter()
            for _ in range(20):
                assert cache.get_symbol_bytes("X:ETHUSD") is None
                assert cache.set_symbol_bytes("X:ETHUSD", b"{}") is False
            elapsed = time.perf_counter() - started
        assert cache.ping() is False
    finally:
        needs_embedded_redis.start()
    warnings = [record for record in caplog.records if "cache unavailable" in record.getMessage()]
    assert len(warnings) == 1
    assert elapsed < 2.0  # the outage back-off skips Redis instead of timing out forty times
    cache.reset_client()
    assert cache.ping() is True
