"""The Redis cache against a real server: TTLs per kind, SCAN-based pattern delete, and outage behaviour."""

import json
import logging
import threading
import time

import pytest
import redis

from candlecast import cache
from infra.slow_proxy import SlowProxy
from tests.conftest import redis_refusing_writes

pytestmark = pytest.mark.integration


@pytest.fixture
def server(clean_db):
    return redis.Redis.from_url(clean_db.redis_url)


@pytest.mark.parametrize(
    ("store", "key", "ttl"),
    [
        (lambda: cache.fill_candles("X:BTCUSD", "1h", b"packed", cache.lookup_candles("X:BTCUSD", "1h")),
         cache.keys.candles("X:BTCUSD", "1h"), 3600),
        (lambda: cache.set_prediction_bytes("p1", b"{}"), cache.keys.prediction("p1"), 900),
        (lambda: cache.fill_symbol("X:BTCUSD", b"{}", cache.lookup_symbol("X:BTCUSD")), cache.keys.symbol("X:BTCUSD"),
         3600),
        (lambda: cache.fill_top_symbols(10, b"[]", cache.lookup_top_symbols(10)), cache.keys.top_symbols(10), 3600),
    ],
    ids=["fresh-candles-1h", "prediction-15m", "symbol-1h", "top-symbols-1h"],
)
def test_domain_helpers_use_each_kinds_ttl(server, store, key, ttl):
    assert store() is True
    assert ttl - 5 <= server.ttl(key) <= ttl


@pytest.mark.parametrize("request_hash", ["abc123", None], ids=["unkeyed", "keyed"])
def test_a_created_prediction_and_its_request_pointer_are_cached_together(server, request_hash):
    _, looked_up = cache.lookup_candles_and_request("X:BTCUSD", "1h")
    server.config_resetstat()
    request = None if request_hash is None else ("X:BTCUSD", "1h", request_hash)
    assert cache.set_created_prediction("p2", b'{"id": "p2"}', request, looked_up) is True
    assert cache.get_prediction_bytes("p2") == b'{"id": "p2"}'
    assert 895 <= server.ttl(cache.keys.prediction("p2")) <= 900
    if request_hash is None:
        assert server.keys(cache.keys.prediction_request("*", "*")) == []
    else:
        assert cache.get_prediction_for_request("X:BTCUSD", "1h", request_hash) == "p2"
        assert 895 <= server.ttl(cache.keys.prediction_request("X:BTCUSD", "1h")) <= 900
    commands = server.info("commandstats")
    assert commands["cmdstat_set"]["calls"] == (1 if request_hash is None else 2)


def test_candles_and_the_request_pointer_come_in_one_round_trip_and_the_pointer_needs_its_hash(server):
    cache.fill_candles("X:BTCUSD", "1h", b"hourly", cache.lookup_candles("X:BTCUSD", "1h"))
    cache.set_prediction_for_request("X:BTCUSD", "1h", "hash-new", "p9", cache.lookup_candles_and_request(
        "X:BTCUSD", "1h")[1])
    server.config_resetstat()
    lookup, request = cache.lookup_candles_and_request("X:BTCUSD", "1h")
    pointer = request.value
    assert lookup.value == b"hourly"
    assert server.info("commandstats")["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in server.info(
        "commandstats")
    assert cache.prediction_for_request(pointer, "hash-new") == "p9"
    assert cache.prediction_for_request(pointer, "hash-older-candle") is None  # the same key, another request
    lookup, request = cache.lookup_candles_and_request("X:ETHUSD", "1h")
    assert (lookup.value, request.value) == (None, None)


def test_json_round_trip_and_delete(server):
    cache.set_json(f"{cache.NAMESPACE}:test:one", {"a": [1, 2]}, 60)
    assert cache.get_json(f"{cache.NAMESPACE}:test:one") == {"a": [1, 2]}
    assert cache.delete(f"{cache.NAMESPACE}:test:one") == 1
    assert cache.get_json(f"{cache.NAMESPACE}:test:one") is None


def test_pattern_delete_uses_scan_and_spares_other_keys(server):
    for index in range(1200):
        server.set(cache.keys.symbol(f"X:T{index}"), b"1")
    server.set(cache.keys.prediction("keep"), b"1")
    server.config_resetstat()
    assert cache.delete_pattern(cache.keys.all_symbol_keys()) == 1200
    commands = server.info("commandstats")
    assert "cmdstat_scan" in commands
    assert "cmdstat_keys" not in commands
    assert server.exists(cache.keys.prediction("keep")) == 1


def test_outage_misses_skips_writes_and_warns_once(server, needs_embedded_redis, caplog):
    cache.set_prediction_bytes("X:ETHUSD", b"{}")
    needs_embedded_redis.stop()
    try:
        with caplog.at_level(logging.WARNING):
            started = time.perf_counter()
            for _ in range(20):
                assert cache.get_prediction_bytes("X:ETHUSD") is None
                assert cache.set_prediction_bytes("X:ETHUSD", b"{}") is False
            elapsed = time.perf_counter() - started
        assert cache.ping() is False
    finally:
        needs_embedded_redis.start()
    warnings = [record for record in caplog.records if "cache unavailable" in record.getMessage()]
    assert len(warnings) == 1
    assert elapsed < 2.0  # the outage back-off skips Redis instead of timing out forty times
    cache.reset_client()
    assert cache.ping() is True


def test_every_parameter_is_part_of_its_key(server):
    """A list cached for one limit (or query, ticker, timeframe) is never served for another."""
    cache.fill_top_symbols(10, b"[ten]", cache.lookup_top_symbols(10))
    cache.fill_search("btc", 10, b"[btc ten]", cache.lookup_search("btc", 10))
    cache.fill_candles("X:BTCUSD", "1h", b"hourly", cache.lookup_candles("X:BTCUSD", "1h"))
    cache.fill_symbol("X:BTCUSD", b"{btc}", cache.lookup_symbol("X:BTCUSD"))
    cache.set_prediction_bytes("p1", b"{p1}")
    cache.set_prediction_for_request("X:BTCUSD", "1h", "hash-1", "p1", cache.lookup_candles_and_request(
        "X:BTCUSD", "1h")[1])
    cache.fill_track_record("1h", b"{1h}", cache.lookup_track_record("1h"))
    cache.fill_track_record(None, b"{all}", cache.lookup_track_record(None))
    assert cache.lookup_top_symbols(10).value == b"[ten]"
    assert cache.lookup_top_symbols(11).value is None
    assert cache.lookup_search("btc", 10).value == b"[btc ten]"
    assert cache.lookup_search("btc", 20).value is None
    assert cache.lookup_search("eth", 10).value is None
    assert cache.lookup_candles("X:BTCUSD", "1h").value == b"hourly"
    assert cache.lookup_candles("X:BTCUSD", "4h").value is None
    assert cache.lookup_candles("X:ETHUSD", "1h").value is None
    assert cache.lookup_symbol("X:BTCUSD").value == b"{btc}" and cache.lookup_symbol("X:ETHUSD").value is None
    assert cache.get_prediction_bytes("p1") == b"{p1}" and cache.get_prediction_bytes("p2") is None
    assert cache.get_prediction_for_request("X:BTCUSD", "1h", "hash-1") == "p1"
    assert cache.get_prediction_for_request("X:BTCUSD", "1h", "hash-2") is None
    assert cache.get_prediction_for_request("X:BTCUSD", "4h", "hash-1") is None
    assert cache.lookup_track_record("1h").value == b"{1h}" and cache.lookup_track_record("4h").value is None
    assert cache.lookup_track_record(None).value == b"{all}"
    assert len({cache.keys.search("a", 1), cache.keys.search("a", 2), cache.keys.search("b", 1),
                cache.keys.top_symbols(1), cache.keys.symbol("a"), cache.keys.prediction("a")}) == 6


@pytest.mark.parametrize(
    ("store", "key", "ttl"),
    [
        (lambda: cache.fill_search("btc", 5, b"[]", cache.lookup_search("btc", 5)), cache.keys.search("btc", 5), 300),
        (lambda: cache.set_prediction_for_request("X:A", "1h", "h", "p", cache.lookup_candles_and_request(
            "X:A", "1h")[1]), cache.keys.prediction_request("X:A", "1h"), 900),
        (lambda: cache.fill_track_record("1d", b"{}", cache.lookup_track_record("1d")), cache.keys.track_record("1d"),
         600),
        (lambda: cache.set_json(f"{cache.NAMESPACE}:test:ttl", [1], 42), f"{cache.NAMESPACE}:test:ttl", 42),
    ],
    ids=["search-5m", "request-15m", "track-record-10m", "json-as-given"],
)
def test_the_other_kinds_ttls(server, store, key, ttl):
    assert store() is True
    assert ttl - 5 <= server.ttl(key) <= ttl


def test_invalidate_symbols_drops_symbols_lists_and_searches_only(server):
    cache.fill_symbol("X:BTCUSD", b"{}", cache.lookup_symbol("X:BTCUSD"))
    cache.fill_top_symbols(20, b"[]", cache.lookup_top_symbols(20))
    cache.fill_search("btc", 20, b"[]", cache.lookup_search("btc", 20))
    cache.set_prediction_bytes("p1", b"{}")
    cache.fill_track_record(None, b"{}", cache.lookup_track_record(None))
    server.config_resetstat()
    assert cache.invalidate_symbols() is True
    assert "cmdstat_scan" not in server.info("commandstats")  # one SET, whatever the number of entries
    assert cache.lookup_symbol("X:BTCUSD").value is None
    assert cache.lookup_top_symbols(20).value is None
    assert cache.lookup_search("btc", 20).value is None
    assert cache.get_prediction_bytes("p1") == b"{}"  # other kinds stay
    assert cache.lookup_track_record(None).value == b"{}"
    assert cache.invalidate_track_record() is True
    assert cache.lookup_track_record(None).value is None


def test_an_invalidation_by_a_release_of_another_namespace_drops_this_ones_entries(server, monkeypatch):
    """During a deploy the older release's code still runs (a Refresh chunk, an operator's older checkout): its
    writes invalidated its own namespace only, and this release served the replaced candles and rows for a TTL."""
    cache.fill_symbol("X:BTCUSD", b"{}", cache.lookup_symbol("X:BTCUSD"))
    cache.fill_candles("X:BTCUSD", "1h", b"packed", cache.lookup_candles("X:BTCUSD", "1h"))
    with monkeypatch.context() as older:
        older.setattr(cache, "_PREFIX", cache._PREFIX.replace(cache.NAMESPACE, "cc:v3"))
        assert cache.invalidate_symbols() is True and cache.forget_candles([("X:BTCUSD", "1h")]) is True
    assert cache.lookup_symbol("X:BTCUSD").value is None
    assert cache.lookup_candles("X:BTCUSD", "1h").value is None


def test_a_fill_that_raced_an_invalidation_is_never_served(server):
    """A read that looked up, then read the old row from the database, and fills after an invalidation (the
    refresh committed and invalidated in between) used to leave the old row cached for the kind's whole TTL."""
    kinds = {"symbol": (lambda: cache.lookup_symbol("X:ETHUSD"),
                        lambda body, seen: cache.fill_symbol("X:ETHUSD", body, seen)),
             "top": (lambda: cache.lookup_top_symbols(20), lambda body, seen: cache.fill_top_symbols(20, body, seen)),
             "search": (lambda: cache.lookup_search("eth", 20),
                        lambda body, seen: cache.fill_search("eth", 20, body, seen))}
    for lookup, fill in kinds.values():
        seen = lookup()  # a miss; the request reads the old row from the database
        assert seen.value is None
        assert cache.invalidate_symbols() is True  # meanwhile, the refresh commits and invalidates
        assert fill(b"old row", seen) is True  # the request fills with what it read
        assert lookup().value is None  # never served: the next request reads the database
        fresh = lookup()
        assert fill(b"new row", fresh) is True
        assert lookup().value == b"new row"
    seen = cache.lookup_track_record("1h")
    assert cache.invalidate_track_record() is True
    cache.fill_track_record("1h", b"old record", seen)
    assert cache.lookup_track_record("1h").value is None


def test_a_flushed_generation_never_revives_an_older_entry(server):
    cache.lookup_symbol("X:ETHUSD")  # starts a generation
    cache.fill_symbol("X:ETHUSD", b"old", cache.lookup_symbol("X:ETHUSD"))
    server.delete(cache.keys.generation(cache.SYMBOLS))  # evicted (or an operator's DEL)
    assert cache.lookup_symbol("X:ETHUSD").value is None  # a new generation, not a restarted count
    assert cache.lookup_symbol("X:ETHUSD").value is None


def test_entries_a_restart_from_a_snapshot_brings_back_are_never_served(server, needs_embedded_redis):
    """Redis restarted from a snapshot (or a failover to a replica that lagged) brought back the generation and the
    entries an invalidation after the snapshot had replaced: the replaced candles were served for their hour."""
    cache.fill_candles("X:BTCUSD", "1h", b"old candles", cache.lookup_candles("X:BTCUSD", "1h"))
    assert cache.lookup_candles("X:BTCUSD", "1h").value == b"old candles"
    server.save()
    try:
        assert cache.forget_candles([("X:BTCUSD", "1h")]) is True  # the file was rewritten after the snapshot
        assert cache.lookup_candles("X:BTCUSD", "1h").value is None
        needs_embedded_redis.stop()
        needs_embedded_redis.start()  # from the snapshot
    finally:
        (needs_embedded_redis.work_dir / "dump.rdb").unlink(missing_ok=True)
    assert server.get(cache.keys.candles("X:BTCUSD", "1h")) is not None  # back, with its old generation
    cache.lookup_candles("X:BTCUSD", "1h")  # no reset_client: the connection finds the server restarted
    _wait_until_up()
    seen = cache.lookup_candles("X:BTCUSD", "1h")
    assert seen.value is None
    assert cache.fill_candles("X:BTCUSD", "1h", b"new candles", seen) is True
    assert cache.lookup_candles("X:BTCUSD", "1h").value == b"new candles"


def test_predictions_and_request_pointers_a_restart_from_a_snapshot_brings_back_are_never_served(
        server, needs_embedded_redis):
    """Retention deleted a prediction after the snapshot; Redis restarted from it brought the body and its request
    pointer back, and both were served (200 X-Cache: HIT for a row the database no longer had: DR audit, s2)."""
    assert cache.set_prediction_bytes("p1", b"{p1}") is True
    assert cache.set_prediction_for_request("X:ETHUSD", "1d", "h", "p1",
                                            cache.lookup_candles_and_request("X:ETHUSD", "1d")[1]) is True
    server.save()
    try:
        assert cache.forget_predictions(["p1"]) is True
        needs_embedded_redis.stop()
        needs_embedded_redis.start()  # from the snapshot
    finally:
        (needs_embedded_redis.work_dir / "dump.rdb").unlink(missing_ok=True)
    assert server.exists(cache.keys.prediction("p1"), cache.keys.prediction_request("X:ETHUSD", "1d")) == 2
    cache.get_prediction_bytes("p1")  # no reset_client: the connection finds the server restarted
    _wait_until_up()
    assert cache.get_prediction_bytes("p1") is None
    assert cache.get_prediction_for_request("X:ETHUSD", "1d", "h") is None


def test_pattern_delete_in_small_batches_deletes_everything(server):
    for index in range(7):
        server.set(cache.keys.search(f"q{index}", 20), b"1")
    assert cache.delete_pattern(cache.keys.all_search_keys(), batch_size=3) == 7
    assert server.keys(cache.keys.all_search_keys()) == []


def test_after_a_failure_requests_leave_redis_alone_until_the_probe_sees_it_answer(monkeypatch):
    """No request reaches Redis after a failure until a background ping succeeds: no timeout every time a
    back-off runs out (a Redis frozen by SIGSTOP costs each caller a socket timeout)."""
    attempts, answering = [], threading.Event()

    class Flaky:
        def get(self, key):
            attempts.append(key)
            raise redis.ConnectionError("refused")

        def ping(self):
            if not answering.is_set():
                raise redis.ConnectionError("refused")
            return True

    cache.reset_client()
    monkeypatch.setattr(cache, "PROBE_INTERVAL_SECONDS", 0.01)
    monkeypatch.setattr(cache, "get_client", lambda: Flaky())
    try:
        assert cache.get("cc:v1:k") is None
        assert attempts == ["cc:v1:k"] and cache.is_down()
        for _ in range(20):  # many probe intervals: the probe fails, requests never try
            assert cache.get("cc:v1:k") is None
            time.sleep(0.005)
        assert attempts == ["cc:v1:k"]
        answering.set()
        deadline = time.monotonic() + 5
        while cache.is_down() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not cache.is_down()
        assert cache.get("cc:v1:k") is None
        assert len(attempts) == 2  # Redis answered the probe: requests use it again
    finally:
        cache.reset_client()



def test_upstream_failures_are_remembered_briefly_per_symbol_and_timeframe(server):
    before = time.time()
    assert cache.set_upstream_failure("X:BTCUSD", "1h", 503, "upstream_unavailable", "Polygon is not answering") == 30
    failure = cache.get_upstream_failure("X:BTCUSD", "1h")
    assert {k: failure[k] for k in ("status", "code", "message")} == {
        "status": 503, "code": "upstream_unavailable", "message": "Polygon is not answering"}
    assert before + 30 <= failure["until"] <= time.time() + 30
    assert 25 <= server.ttl(cache.keys.upstream_failure("X:BTCUSD", "1h")) <= 30
    assert cache.get_upstream_failure("X:BTCUSD", "4h") is None
    assert cache.get_upstream_failure("X:ETHUSD", "1h") is None
    server.set(cache.keys.upstream_failure("X:ETHUSD", "1h"), b"[503]")
    assert cache.get_upstream_failure("X:ETHUSD", "1h") is None  # not a failure record


def test_upstream_failures_are_remembered_in_the_process_too_for_their_30_s_and_bounded(server, monkeypatch):
    monkeypatch.setattr(cache, "UPSTREAM_FAILURES_KEPT", 3)
    for index in range(4):
        cache.set_upstream_failure(f"X:C{index}USD", "1h", 503, "polygon_unavailable", "down")
    server.flushdb()  # Redis forgot them (restarted, evicted; or never took them)
    assert cache.get_upstream_failure("X:C0USD", "1h") is None  # the oldest, beyond the bound
    assert [cache.get_upstream_failure(f"X:C{index}USD", "1h")["code"] for index in (1, 2, 3)] == [
        "polygon_unavailable"] * 3
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + cache.TTL_SECONDS["upstream_failure"] + 1)
    assert cache.get_upstream_failure("X:C3USD", "1h") is None  # its 30 s are over


def test_every_operation_degrades_while_redis_is_stopped(server, needs_embedded_redis):
    cache.fill_candles("X:BTCUSD", "1h", b"hourly", cache.lookup_candles("X:BTCUSD", "1h"))
    needs_embedded_redis.stop()
    try:
        assert cache.lookup_candles_and_request("X:BTCUSD", "1h") == (cache.Lookup(None, None),) * 2
        assert cache.set_created_prediction("p1", b"{}", ("X:BTCUSD", "1h", "h"), cache.Lookup(None, b"g")) is False
        assert cache.delete(cache.keys.candles("X:BTCUSD", "1h")) == 0
        assert cache.delete_pattern(cache.keys.all_symbol_keys()) == 0
        assert cache.get_json(cache.keys.candles("X:BTCUSD", "1h")) is None
        assert cache.set_upstream_failure("X:BTCUSD", "1h", 503, "upstream_unavailable", "down") == 30
        assert cache.get_upstream_failure("X:BTCUSD", "1h")["code"] == "upstream_unavailable"  # in the process
        assert cache.invalidate_symbols() is False and cache.invalidate_track_record() is False
    finally:
        needs_embedded_redis.start()
    cache.reset_client()
    assert cache.lookup_candles("X:BTCUSD", "1h").value is None  # the restarted server is empty; it answers again


@pytest.fixture
def socket_timeout(monkeypatch):
    """A one-second socket timeout, so one timeout and two are told apart on a busy machine."""
    from candlecast.config import get_settings

    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "1")
    get_settings.cache_clear()
    cache.reset_client()
    yield 1.0
    monkeypatch.delenv("REDIS_SOCKET_TIMEOUT")
    get_settings.cache_clear()
    cache.reset_client()


def test_a_frozen_redis_costs_one_socket_timeout_once_and_the_probe_brings_it_back(
        server, needs_embedded_redis, socket_timeout):
    import signal

    assert cache.set_prediction_bytes("X:ETHUSD", b"{eth}") is True
    process = needs_embedded_redis._process
    process.send_signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        assert cache.get_prediction_bytes("X:ETHUSD") is None
        first = time.perf_counter() - started
        rest = 0.0
        for _ in range(30):  # over 3 probe intervals: no call waits out a timeout again
            started = time.perf_counter()
            assert cache.get_prediction_bytes("X:ETHUSD") is None
            rest += time.perf_counter() - started
            time.sleep(cache.PROBE_INTERVAL_SECONDS / 10)
        assert cache.is_down()  # the probe's pings time out too
    finally:
        process.send_signal(signal.SIGCONT)
    assert socket_timeout * 0.9 <= first < socket_timeout * 1.7  # one timeout: no retry, no back-off wait
    assert rest < 0.1  # the others never touch Redis
    deadline = time.monotonic() + 5
    while cache.is_down() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not cache.is_down()  # no reset: the background probe saw it answer
    assert cache.get_prediction_bytes("X:ETHUSD") == b"{eth}"


def test_reset_client_ends_an_outage_and_stops_its_probe(server, needs_embedded_redis, caplog):
    needs_embedded_redis.stop()
    try:
        with caplog.at_level(logging.WARNING):
            assert cache.get("cc:v1:k") is None and cache.is_down()
            probes = [thread for thread in threading.enumerate() if thread.name == "cache-probe"]
            assert probes
            cache.reset_client()
            assert not cache.is_down()
            for probe in probes:
                probe.join(2 * cache.PROBE_INTERVAL_SECONDS + 1)
                assert not probe.is_alive()  # an old client's probe stops
            assert cache.get("cc:v1:k") is None and cache.is_down()  # a new outage, warned about again
    finally:
        needs_embedded_redis.start()
    assert len([r for r in caplog.records if "cache unavailable" in r.getMessage()]) == 2
    cache.reset_client()
    for probe in [thread for thread in threading.enumerate() if thread.name == "cache-probe"]:
        probe.join(2 * cache.PROBE_INTERVAL_SECONDS + 1)
    assert cache.ping() is True


FOREIGN_VALUES = [b"\xff\xfe not utf-8", b"not json", b"42", b"", b"\xcc\x02\x00\x00\x00\x00{}"]


@pytest.mark.parametrize("foreign", FOREIGN_VALUES, ids=["binary", "text", "number", "empty", "forged-seal"])
def test_a_value_this_module_did_not_write_reads_as_a_miss(server, foreign):
    readers = {
        cache.keys.prediction("p1"): lambda: cache.get_prediction_bytes("p1"),
        cache.keys.symbol("X:BTCUSD"): lambda: cache.lookup_symbol("X:BTCUSD").value,
        cache.keys.top_symbols(20): lambda: cache.lookup_top_symbols(20).value,
        cache.keys.search("btc", 20): lambda: cache.lookup_search("btc", 20).value,
        cache.keys.track_record(None): lambda: cache.lookup_track_record(None).value,
        cache.keys.upstream_failure("X:BTCUSD", "1h"): lambda: cache.get_upstream_failure("X:BTCUSD", "1h"),
        cache.keys.candles("X:BTCUSD", "1h"): lambda: cache.lookup_candles("X:BTCUSD", "1h").value,
    }
    for key, read in readers.items():
        server.set(key, foreign)
        assert read() is None, key
    server.set(cache.keys.prediction_request("X:BTCUSD", "1h"), foreign)
    lookup, request = cache.lookup_candles_and_request("X:BTCUSD", "1h")
    assert (lookup.value, request.value) == (None, None)
    assert cache.get_prediction_for_request("X:BTCUSD", "1h", "h") is None


def test_a_truncated_or_altered_entry_reads_as_a_miss(server):
    cache.set_prediction_bytes("p1", b'{"id": "p1", "steps": []}')
    key = cache.keys.prediction("p1")
    whole = server.get(key)
    server.set(key, whole[:-3])
    assert cache.get_prediction_bytes("p1") is None
    server.set(key, whole.replace(b"p1", b"p2"))
    assert cache.get_prediction_bytes("p1") is None
    server.set(key, whole)
    assert cache.get_prediction_bytes("p1") == b'{"id": "p1", "steps": []}'


def test_a_key_of_another_type_is_a_miss_for_that_key_only_not_an_outage(server):
    server.rpush(cache.keys.prediction("p1"), b"a list, not a string")
    cache.set_prediction_bytes("X:BTCUSD", b"{}")
    assert cache.get_prediction_bytes("p1") is None
    assert not cache.is_down()
    assert cache.get_prediction_bytes("X:BTCUSD") == b"{}"  # the cache still serves every other key


def test_a_refused_write_skips_that_write_and_reads_go_on(server):
    cache.set_prediction_bytes("X:BTCUSD", b"{}")
    server.config_set("maxmemory", "1")  # every write is refused with OOM; reads still answer
    try:
        assert cache.set_prediction_bytes("p1", b"{}") is False
        assert not cache.is_down()
        assert cache.get_prediction_bytes("X:BTCUSD") == b"{}"
    finally:
        server.config_set("maxmemory", "0")


@pytest.mark.parametrize("how, code", [("oom", "OutOfMemoryError"), ("readonly", "ReadOnlyError")])
def test_a_refusal_of_writes_is_logged_by_its_kind_and_remembered_for_health(server, monkeypatch, caplog, how,
                                                                             code):
    """The warning's `error` said "command" (OOM) or "You" (READONLY): redis-py strips the code from the message."""
    monkeypatch.setattr(cache, "_refusal_logged_at", 0.0)
    assert cache.write_problem() is None
    with redis_refusing_writes(cache.get_settings().redis_url, how), caplog.at_level(logging.WARNING):
        assert cache.invalidate_symbols() is (how == "oom")  # out of memory, the generation is deleted instead
    (warning,) = [r for r in caplog.records if r.getMessage() == "cache refused a command"]
    assert warning.error == code
    assert cache.write_problem() == f"refusing writes ({code})"  # remembered: health says so without asking
    cache.reset_client()
    assert cache.write_problem() is None  # and asked: Redis takes writes again


def test_a_refusal_redis_py_does_not_map_is_named_by_its_code_alone():
    assert cache._refusal_code(redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ...")) \
        == "MISCONF"
    assert cache._refusal_code(redis.ResponseError("wrong number of arguments for 'get'")) == "ResponseError"


def test_stages_sharing_one_redis_never_read_each_others_entries():
    import subprocess
    import sys

    def key_in(stage: str | None) -> str:
        import os

        env = {name: value for name, value in os.environ.items() if name != "STAGE"} | (
            {"STAGE": stage} if stage else {})
        return subprocess.run([sys.executable, "-c", "from candlecast import cache; print(cache.keys.symbol('X:A'), "
                               "cache.keys.all_keys())"], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    dev, prod, unset = key_in("dev"), key_in("prod"), key_in(None)
    assert dev[0] != prod[0] and dev[1] != prod[1]
    assert unset == key_in("local")  # STAGE's default, as in the settings


@pytest.fixture
def slow_redis(clean_db, monkeypatch):
    from candlecast.config import get_settings

    proxy = SlowProxy(clean_db.redis_url)
    monkeypatch.setenv("REDIS_URL", proxy.url)
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "1")  # a 0.2 s answer stays well within it on a busy machine
    get_settings.cache_clear()
    cache.reset_client()
    yield proxy
    proxy.close()
    monkeypatch.undo()
    get_settings.cache_clear()
    cache.reset_client()


def test_a_redis_that_answers_slowly_is_skipped_until_it_answers_quickly_again(slow_redis, caplog):
    assert cache.get_settings().redis_slow_seconds < 0.2 < cache.get_settings().redis_socket_timeout
    assert cache.set_prediction_bytes("X:ETHUSD", b"{eth}") is True
    assert cache.get_prediction_bytes("X:ETHUSD") == b"{eth}" and not cache.is_down()

    slowed = time.monotonic()
    slow_redis.delay = 0.2  # each command answered, 0.2 s late: within the socket timeout, never an error
    with caplog.at_level(logging.WARNING):
        answers = [cache.get_prediction_bytes("X:ETHUSD") for _ in range(cache.SLOW_STRIKES)]
    assert answers == [b"{eth}"] * cache.SLOW_STRIKES  # slow, but answered: the values are still served
    assert cache.is_down()
    assert [r.getMessage() for r in caplog.records if "cache" in r.getMessage()] == [
        "cache too slow; serving without it"]
    reached = time.monotonic()
    assert slow_redis.commands(slowed, reached) == ["MGET"] * cache.SLOW_STRIKES
    for _ in range(20):  # skipped: misses and skipped writes, none of them sent to Redis
        assert cache.get_prediction_bytes("X:ETHUSD") is None
        assert cache.set_prediction_bytes("X:BTCUSD", b"{btc}") is False
    assert set(slow_redis.commands(since=reached)) <= {"PING"}  # the probe's alone

    slow_redis.delay = 0.0
    deadline = time.monotonic() + 30
    while cache.is_down():
        assert time.monotonic() < deadline, "the probe never saw a quick answer"
        time.sleep(0.05)
    assert cache.get_prediction_bytes("X:ETHUSD") == b"{eth}"


def test_one_slow_answer_among_quick_ones_is_not_an_outage(slow_redis):
    assert cache.set_prediction_bytes("X:ETHUSD", b"{eth}") is True
    for _ in range(3):
        slow_redis.delay = 0.2
        for _ in range(cache.SLOW_STRIKES - 1):
            assert cache.get_prediction_bytes("X:ETHUSD") == b"{eth}"
        slow_redis.delay = 0.0
        assert cache.get_prediction_bytes("X:ETHUSD") == b"{eth}"
    assert not cache.is_down()



OUT_OF_PROTOCOL = {"a string": b"$5\r\nhello\r\n", "a number": b":42\r\n", "a short array": b"*1\r\n$1\r\nx\r\n",
                   "an array of numbers": b"*2\r\n:1\r\n:2\r\n"}


def _wait_until_up() -> None:
    deadline = time.monotonic() + 10
    while cache.is_down():  # the probe's PING gets its PONG again
        assert time.monotonic() < deadline, "the probe never saw Redis answer"
        time.sleep(0.05)


@pytest.mark.parametrize("answer", OUT_OF_PROTOCOL.values(), ids=OUT_OF_PROTOCOL.keys())
def test_a_reply_of_the_wrong_shape_is_a_miss_never_an_error(slow_redis, answer, caplog):
    """A proxy (or a server that is not Redis) answering out of protocol: every operation degrades, none raises
    (MGET's reply used to raise TypeError or IndexError: POST /predictions answered 500)."""
    lookup = cache.lookup_candles("X:BTCUSD", "1h")
    assert cache.fill_candles("X:BTCUSD", "1h", b"hourly", lookup) is True  # connected, through the proxy
    slow_redis.answer = answer  # on the connection already open: no handshake to fail first
    with caplog.at_level(logging.WARNING):
        assert cache.lookup_candles_and_request("X:BTCUSD", "1h") == (cache.Lookup(None, None),) * 2
    assert cache.is_down()  # as a reply redis-py cannot read: the cache is skipped until the probe's PING
    assert [r.getMessage() for r in caplog.records if "cache" in r.getMessage()] == [
        "cache unavailable; serving without it"]
    operations = {"get": (lambda: cache.lookup_candles("X:BTCUSD", "1h").value, lambda value: value is None),
                  "set": (lambda: cache.fill_candles("X:BTCUSD", "1h", b"h", lookup), lambda done: done is False),
                  "delete": (lambda: cache.delete(cache.keys.candles("X:BTCUSD", "1h")),
                             lambda count: type(count) is int),  # :42 is a count, of course
                  "pipeline": (lambda: cache.set_created_prediction("p1", b"{}", ("X:BTCUSD", "1h", "h"),
                                                                    cache.Lookup(None, b"g")),
                               lambda done: done is False)}
    for name, (operation, degraded) in operations.items():
        slow_redis.answer = None
        _wait_until_up()
        slow_redis.answer = answer
        assert degraded(operation()), name
    slow_redis.answer = None
    _wait_until_up()
    assert cache.lookup_candles("X:BTCUSD", "1h").value == b"hourly"


@pytest.fixture
def cluster_mode_redis(clean_db, tmp_path, monkeypatch):
    """A Redis in cluster mode, as ElastiCache Serverless always is (one node holding every slot: what a client of
    its single endpoint sees), in place of the test stack's."""
    from candlecast.config import get_settings
    from infra.local_stack import EmbeddedRedis

    server = EmbeddedRedis(tmp_path, cluster=True)
    monkeypatch.setenv("REDIS_URL", server.url)
    get_settings.cache_clear()
    cache.reset_client()
    yield redis.Redis.from_url(server.url)
    server.stop()
    monkeypatch.undo()
    get_settings.cache_clear()
    cache.reset_client()


def test_every_cache_command_works_on_a_redis_in_cluster_mode(cluster_mode_redis):
    """ElastiCache Serverless is only in cluster mode, which refuses a command on keys of different hash slots
    (CROSSSLOT): each lookup (an entry and its generation in one MGET), creation and invalidation was refused, so
    the cache never served a hit there, and no invalidation was taken."""
    assert cluster_mode_redis.mget("{t}a", "{t}b") == [None, None]
    with pytest.raises(redis.exceptions.ResponseError, match="hash to the same slot"):
        cluster_mode_redis.mget("a", "c")  # the server does refuse keys of different slots
    assert cache.fill_candles("X:BTCUSD", "1h", b"hourly", cache.lookup_candles("X:BTCUSD", "1h")) is True
    lookup, request = cache.lookup_candles_and_request("X:BTCUSD", "1h")
    assert lookup.value == b"hourly"
    assert cache.set_created_prediction("p1", b"{p1}", ("X:BTCUSD", "1h", "h"), request) is True
    assert cache.prediction_for_request(cache.lookup_candles_and_request("X:BTCUSD", "1h")[1].value, "h") == "p1"
    assert cache.fill_symbol("X:BTCUSD", b"{}", cache.lookup_symbol("X:BTCUSD")) is True
    assert cache.lookup_symbol("X:BTCUSD").value == b"{}"
    assert cache.forget_candles([("X:BTCUSD", "1h"), ("X:ETHUSD", "1d")]) is True
    assert cache.lookup_candles("X:BTCUSD", "1h").value is None
    assert cache.invalidate_symbols() is True and cache.lookup_symbol("X:BTCUSD").value is None
    assert cache.invalidate_all() is not None
    assert cache.delete_pattern(cache.keys.all_keys()) is not None
    assert not cache.is_down()


def test_invalidate_all_drops_every_kind_and_each_candle_files_candles(server):
    cache.fill_symbol("X:BTCUSD", b"{}", cache.lookup_symbol("X:BTCUSD"))
    cache.fill_track_record(None, b"{}", cache.lookup_track_record(None))
    for ticker in ("X:BTCUSD", "X:ETHUSD"):
        cache.fill_candles(ticker, "1h", b"hourly", cache.lookup_candles(ticker, "1h"))
    _, request = cache.lookup_candles_and_request("X:BTCUSD", "1h")
    assert cache.set_created_prediction("p1", b"{p1}", ("X:BTCUSD", "1h", "h"), request) is True
    assert cache.invalidate_all() == 3 + 2
    assert cache.lookup_symbol("X:BTCUSD").value is None
    assert cache.lookup_track_record(None).value is None
    assert [cache.lookup_candles(ticker, "1h").value for ticker in ("X:BTCUSD", "X:ETHUSD")] == [None, None]
    assert cache.get_prediction_bytes("p1") is None
    assert cache.get_prediction_for_request("X:BTCUSD", "1h", "h") is None


def test_the_cache_invalidate_command_says_what_it_did(server, needs_embedded_redis, capsys):
    from candlecast import cli

    cache.fill_candles("X:BTCUSD", "1h", b"hourly", cache.lookup_candles("X:BTCUSD", "1h"))
    assert cache.set_prediction_bytes("p1", b"{p1}") is True
    assert cli.main(["cache-invalidate"]) == 0
    assert json.loads(capsys.readouterr().out) == {"invalidated": ["symbols", "track-record", "predictions"],
                                                   "candle_files": 1}
    assert cache.get_prediction_bytes("p1") is None and cache.lookup_candles("X:BTCUSD", "1h").value is None
    needs_embedded_redis.stop()
    try:
        cache.reset_client()
        assert cli.main(["cache-invalidate"]) == 1
        assert "Redis did not take it" in capsys.readouterr().err
    finally:
        needs_embedded_redis.start()
    cache.reset_client()
