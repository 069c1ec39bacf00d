"""Storage against moto's S3 server and a real Redis: keys, Parquet tails, caches, model bytes."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from candlecast import cache, storage
from candlecast.candles import COLUMNS, Candles
from tests.conftest import empty_bucket, redis_refusing_writes
from tests.s3_proxy import RewritingProxy, through

pytestmark = [pytest.mark.s3, pytest.mark.integration]

HOUR = 3600
DAY_START = 1_600_000_000 - 1_600_000_000 % 86400  # 1d candles open at midnight


def make_candles(count: int, start: int = 1_600_000_000 - 1_600_000_000 % HOUR, step: int = HOUR) -> Candles:
    times = start + step * np.arange(count, dtype=np.int64)
    close = 100.0 + np.arange(count, dtype=np.float64)
    return Candles(open_time=times, open=close - 0.5, high=close + 1, low=close - 1, close=close,
                   volume=np.full(count, 2.0))


@pytest.fixture
def bucket(app_env, stack):
    empty_bucket(stack.bucket)
    cache.delete_pattern(cache.keys.candles("*", "*"))
    yield stack.bucket
    storage.reset_clients()


def test_keys_follow_the_bucket_layout():
    assert storage.candles_key("X:BTCUSD", "1h") == "data/BTCUSD/1h.parquet"
    assert storage.candles_key("ETHUSDT", "1m") == "data/ETHUSDT/1m.parquet"
    assert storage.active_model_key("4h") == "models/4h.pkl"
    assert storage.versioned_model_key("1d", "2026.11.25") == "models/1d/2026.11.25.pkl"
    assert storage.signature_key("models/1d.pkl") == "models/1d.pkl.sig"


def test_merge_sorts_deduplicates_and_new_rows_win():
    old = make_candles(5)
    newer = make_candles(4, start=int(old.open_time[3]))  # overlaps the last two rows
    newer = Candles(newer.open_time, newer.open, newer.high, newer.low, newer.close + 1000, newer.volume)
    merged = storage.merge_candles(old, newer)
    assert merged.open_time.tolist() == sorted(set(old.open_time.tolist()) | set(newer.open_time.tolist()))
    assert len(merged) == 7
    assert merged.close[3] == newer.close[0]  # the overlapping row takes the new value
    assert merged.close[:3].tolist() == old.close[:3].tolist()


def test_write_then_read_tail_round_trips(bucket):
    candles = make_candles(3000)
    shuffled = np.random.default_rng(1).permutation(3000)
    duplicated = np.concatenate([shuffled, shuffled[:10]])
    messy = Candles(**{name: getattr(candles, name)[duplicated] for name in COLUMNS})
    assert storage.write_candles("X:BTCUSD", "1h", messy).rows == 3000

    tail = storage.read_candles("X:BTCUSD", "1h", 100, use_cache=False)
    assert tail.open_time.tolist() == candles.open_time[-100:].tolist()
    assert tail.close.tolist() == candles.close[-100:].tolist()
    everything = storage.read_all_candles("X:BTCUSD", "1h")
    assert everything.open_time.tolist() == candles.open_time.tolist()


def test_files_have_small_row_groups_and_only_the_tail_is_read(bucket, monkeypatch):
    storage.write_candles("X:ETHUSD", "1h", make_candles(5000))
    parquet = pq.ParquetFile(io.BytesIO(storage.get_bytes("data/ETHUSD/1h.parquet")))
    assert parquet.metadata.num_row_groups == 5
    assert parquet.metadata.row_group(0).num_rows == storage.ROW_GROUP_SIZE

    groups_read = []
    original = pq.ParquetFile.read_row_groups

    def recording(self, row_groups, *args, **kwargs):
        groups_read.append(list(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", recording)
    tail = storage.read_candles("X:ETHUSD", "1h", 1500, use_cache=False)
    assert len(tail) == 1500
    # 5000 rows = 4 full groups + 904: the last 1500 rows live in the last two groups only.
    assert groups_read == [[3, 4]]


def test_read_uses_memory_cache_until_the_etag_changes(bucket, monkeypatch):
    storage.write_candles("X:SOLUSD", "1d", make_candles(50, start=DAY_START, step=86400))
    reads = []
    original = storage._read_tail
    monkeypatch.setattr(storage, "_read_tail", lambda *args: reads.append(1) or original(*args))
    monkeypatch.setattr(storage, "cached_candles", lambda *_: None)  # look past Redis at the memory layer

    first = storage.read_candles("X:SOLUSD", "1d", 20)
    second = storage.read_candles("X:SOLUSD", "1d", 20)
    assert len(reads) == 1
    assert second.open_time.tolist() == first.open_time.tolist()

    storage.write_candles("X:SOLUSD", "1d", make_candles(60, start=DAY_START, step=86400))  # new object, new ETag
    third = storage.read_candles("X:SOLUSD", "1d", 20)
    assert len(reads) == 2
    assert third.open_time[-1] == first.open_time[-1] + 10 * 86400


def test_a_read_that_a_rewrite_lands_in_reads_one_version_and_no_damage(bucket, stack):
    """A read that a put-candles or ingest rewrite lands in is one version of the file, never a damaged file: the
    read was a HEAD, then ranged GETs of whatever object the key held by then (the new one at the old one's
    offsets), and answered 503 candle_file_invalid for a healthy file, telling the operator to delete it."""
    key = storage.candles_key("X:BTCUSD", "1h")
    old, new = make_candles(3000), make_candles(3500, start=1_500_000_000 - 1_500_000_000 % HOUR)
    storage.write_candles("X:BTCUSD", "1h", old)
    direct = storage.s3_client()  # moto itself, not through the proxy

    def rewrite():
        direct.put_object(Bucket=bucket, Key=key, Body=storage.candles_to_parquet(new))

    with through(RewritingProxy(stack.s3_endpoint_url, key, rewrite)) as proxy:
        first = storage.read_candles("X:BTCUSD", "1h", 100, use_cache=False)
        second = storage.read_candles("X:BTCUSD", "1h", 100, use_cache=False)
    assert len(proxy.requests) >= 2  # the rewrite did land between two requests
    assert first.close.tolist() == old.close[-100:].tolist()
    assert second.close.tolist() == new.close[-100:].tolist()


def test_a_read_that_a_rewrite_overtakes_does_not_put_the_old_candles_back_in_redis(bucket, stack):
    """A create read the file, the operator's put-candles rewrote it and dropped the cached candles, then the create
    filled the cache with what it had read: every forecast for the next hour came from the replaced file. The fill
    is made under the file's cache generation looked up before the read, which the rewrite replaced."""
    key = storage.candles_key("X:BTCUSD", "4h")
    old, new = make_candles(300, step=4 * HOUR), make_candles(310, step=4 * HOUR)
    storage.write_candles("X:BTCUSD", "4h", old)
    direct = storage.s3_client()

    def rewrite():  # what put_bytes does, straight at moto: the PUT, then the cache's invalidation
        direct.put_object(Bucket=bucket, Key=key, Body=storage.candles_to_parquet(new))
        assert storage.forget_cached_candles([key])

    with through(RewritingProxy(stack.s3_endpoint_url, key, rewrite)):
        raced = storage.read_candles("X:BTCUSD", "4h", 200)
        after = storage.read_candles("X:BTCUSD", "4h", 200)
    assert raced.close.tolist() == old.close[-200:].tolist()  # read before the rewrite: the old file
    assert after.close.tolist() == new.close[-200:].tolist()


def test_read_fills_redis_and_a_rewrite_invalidates_it(bucket):
    storage.write_candles("X:ADAUSD", "4h", make_candles(40, step=4 * HOUR))
    assert cache.lookup_candles("X:ADAUSD", "4h").value is None
    storage.read_candles("X:ADAUSD", "4h", 30)
    cached, requested = Candles.unpack(cache.lookup_candles("X:ADAUSD", "4h").value)
    assert (len(cached), requested) == (30, 30)

    # Served from Redis while it is fresh, even with the object gone.
    storage.s3_client().delete_object(Bucket=bucket, Key=storage.candles_key("X:ADAUSD", "4h"))
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 30
    # A longer history than cached goes to S3, which now has nothing.
    assert storage.read_candles("X:ADAUSD", "4h", 31) is None

    storage.write_candles("X:ADAUSD", "4h", make_candles(10, step=4 * HOUR))
    assert cache.lookup_candles("X:ADAUSD", "4h").value is None


def test_a_writer_that_counts_the_cache_down_still_drops_the_candles_it_replaced(bucket, monkeypatch):
    """A batch writer that had marked the cache down (slow answers, each within the socket timeout) skipped the
    invalidation of the file it wrote: once Redis was quick again, every container served the old candles for an
    hour. A candle file's invalidation is asked whatever this process thinks of the cache."""
    from candlecast.config import get_settings
    from infra.slow_proxy import SlowProxy

    storage.write_candles("X:ADAUSD", "4h", make_candles(40, step=4 * HOUR))
    storage.read_candles("X:ADAUSD", "4h", 30)  # cached
    proxy = SlowProxy(get_settings().redis_url)
    monkeypatch.setenv("REDIS_URL", proxy.url)
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "1")
    get_settings.cache_clear()
    cache.reset_client()
    try:
        proxy.delay = 0.2  # slow, never failing
        for _ in range(cache.SLOW_STRIKES):
            cache.lookup_candles("X:ETHUSD", "4h")
        assert cache.is_down()
        assert storage.write_candles("X:ADAUSD", "4h", make_candles(10, step=4 * HOUR)).rows == 10
        proxy.delay = 0.0
    finally:
        proxy.close()
        monkeypatch.undo()
        get_settings.cache_clear()
        cache.reset_client()
    assert cache.lookup_candles("X:ADAUSD", "4h").value is None
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 10


def test_a_candle_file_written_while_redis_refuses_writes_says_its_cached_candles_stay(bucket, caplog):
    """A read-only replica after a failover refused the file's invalidation, silently: the old candles were
    served for an hour and nobody was told. write_candles says so to its caller; put_bytes and upload_directory
    log it."""
    import logging

    from candlecast.config import get_settings

    key = storage.candles_key("X:ADAUSD", "4h")
    storage.write_candles("X:ADAUSD", "4h", make_candles(40, step=4 * HOUR))
    storage.read_candles("X:ADAUSD", "4h", 30)  # cached
    with redis_refusing_writes(get_settings().redis_url, "readonly"), caplog.at_level(logging.WARNING):
        written = storage.write_candles("X:ADAUSD", "4h", make_candles(10, step=4 * HOUR))
        assert not [r for r in caplog.records if "did not drop" in r.getMessage()]  # its caller reports it
        storage.put_bytes(key, storage.candles_to_parquet(make_candles(12, step=4 * HOUR)))
    assert (written.rows, written.cache_stale) == (10, True)
    (warning,) = [r for r in caplog.records if "did not drop" in r.getMessage()]
    assert (warning.files, warning.seconds) == (1, cache.TTL_SECONDS["candles"])
    assert not cache.is_down()
    assert storage.write_candles("X:ADAUSD", "4h", make_candles(11, step=4 * HOUR)).cache_stale is False
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 11


def test_a_candle_file_written_while_redis_is_out_of_memory_is_read_anew_at_once(bucket):
    """Out of memory with noeviction, Redis refuses the new generation but takes deletes: the file's generation is
    deleted, so its old candles are not served even while Redis refuses writes, and nothing is stale."""
    from candlecast.config import get_settings

    storage.write_candles("X:ADAUSD", "4h", make_candles(40, step=4 * HOUR))
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 30  # cached
    with redis_refusing_writes(get_settings().redis_url, "oom"):
        assert storage.write_candles("X:ADAUSD", "4h", make_candles(10, step=4 * HOUR)).cache_stale is False
        assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 10
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 10
    assert len(storage.read_candles("X:ADAUSD", "4h", 30)) == 10  # cached again, the new file's


def test_put_candles_says_on_stderr_and_in_its_exit_code_when_the_cache_kept_the_old_candles(bucket, tmp_path,
                                                                                             capsys):
    from candlecast import cli
    from candlecast.config import get_settings

    fixed = tmp_path / "fixed.parquet"
    fixed.write_bytes(storage.candles_to_parquet(make_candles(20, step=4 * HOUR)))
    put = ["put-candles", str(fixed), "--symbol", "ADA-USD", "--timeframe", "4h"]
    with redis_refusing_writes(get_settings().redis_url, "readonly"):
        assert cli.main(put) == 1
    out, err = capsys.readouterr()
    assert out == "put 20 4h candles of X:ADAUSD at data/ADAUSD/4h.parquet\n"
    assert err == ("candlecast put-candles: the file is written, but the cache (Redis) did not drop its cached "
                   "candles: forecasts may use the old ones for up to 3600 s; run put-candles again once Redis takes "
                   "writes\n")
    assert cli.main(put) == 0
    assert capsys.readouterr().err == ""


def test_a_write_over_the_version_read_is_refused_once_another_writer_replaced_it(bucket):
    """The ingest writes a candle file only over the version it read: another writer's file (an operator's
    put-candles) is never written over, and its cached candles are not dropped for a write that did not happen."""
    from candlecast.errors import FileChanged

    read = storage.read_candle_file("X:BTCUSD", "1d")
    assert read == storage.CandleFile(None, "")
    first = storage.write_candles("X:BTCUSD", "1d", make_candles(5, start=DAY_START, step=86400), over=read.etag)
    with pytest.raises(FileChanged):  # there was no file: there is one now
        storage.write_candles("X:BTCUSD", "1d", make_candles(6, start=DAY_START, step=86400), over="")
    stored = storage.read_candle_file("X:BTCUSD", "1d")
    assert (len(stored.candles), stored.etag) == (5, first.etag)

    repaired = storage.write_candles("X:BTCUSD", "1d", make_candles(7, start=DAY_START, step=86400))  # unconditional
    storage.read_candles("X:BTCUSD", "1d", 7)  # cached
    with pytest.raises(FileChanged):
        storage.write_candles("X:BTCUSD", "1d", make_candles(8, start=DAY_START, step=86400), over=first.etag)
    assert cache.lookup_candles("X:BTCUSD", "1d").value is not None
    assert storage.read_candle_file("X:BTCUSD", "1d").etag == repaired.etag
    latest = storage.write_candles("X:BTCUSD", "1d", make_candles(8, start=DAY_START, step=86400), over=repaired.etag)
    assert latest.rows == 8

    storage.s3_client().delete_object(Bucket=bucket, Key=storage.candles_key("X:BTCUSD", "1d"))
    with pytest.raises(FileChanged):  # deleted since it was read
        storage.write_candles("X:BTCUSD", "1d", make_candles(9, start=DAY_START, step=86400), over=latest.etag)


def test_missing_file_reads_as_none(bucket):
    assert storage.read_candles("X:NOPEUSD", "1h", 10) is None
    assert storage.read_all_candles("X:NOPEUSD", "1h") is None
    with pytest.raises(ValueError):
        storage.read_candles("X:NOPEUSD", "1h", 0)


def test_a_refused_write_is_storage_unavailable_logged_by_its_code_only(bucket, monkeypatch, caplog):
    """S3's own error text (an AccessDenied names the role and account; here moto's NoSuchBucket names the bucket
    and says it does not exist) stays out of the error and the logs: only its code is logged."""
    from candlecast.config import get_settings
    from candlecast.errors import StorageUnavailable

    monkeypatch.setenv("DATA_BUCKET", "candlecast-no-such-bucket")
    get_settings.cache_clear()
    storage.reset_clients()
    try:
        for write in (lambda: storage.write_candles("X:BTCUSD", "1h", make_candles(3)),
                      lambda: storage.list_keys("data/")):
            with pytest.raises(StorageUnavailable) as raised:
                write()
            assert str(raised.value) == "storage is unavailable; try again shortly"
    finally:
        get_settings.cache_clear()
        storage.reset_clients()
    ours = [vars(record) for record in caplog.records if "candlecast" in record.name]
    assert [record["error"] for record in ours] == ["NoSuchBucket", "NoSuchBucket"]
    assert "does not exist" not in str(ours) and "candlecast-no-such-bucket" not in str(ours)


def test_bytes_and_directory_upload(bucket, tmp_path):
    key = storage.active_model_key("1h")
    assert storage.get_bytes(key) is None
    storage.put_bytes(key, b"model")
    storage.put_bytes(storage.signature_key(key), b"abcd")
    assert storage.get_bytes(key) == b"model"
    assert storage.head_etag(key) is not None

    (tmp_path / "BTCUSD").mkdir()
    (tmp_path / "BTCUSD" / "1h.parquet").write_bytes(storage.candles_to_parquet(make_candles(3)))
    (tmp_path / "symbols.csv").write_text("ticker\nX:BTCUSD\n")
    (tmp_path / ".DS_Store").write_text("skip me")
    assert storage.upload_directory(tmp_path, "data", progress=False) == (2, 0)
    assert sorted(storage.list_keys("data/")) == ["data/BTCUSD/1h.parquet", "data/symbols.csv"]
    assert len(storage.read_candles("BTCUSD", "1h", 3, use_cache=False)) == 3


def test_every_write_of_a_candle_file_drops_its_cached_candles(bucket, tmp_path):
    """Audit K: a candle file fixed with `candlecast seed` (upload_directory) was still forecast from for up to an
    hour: only write_candles dropped the Redis entry. Now upload_directory and put_bytes do too, for the candle
    files they write and only those."""
    for ticker in ("X:BTCUSD", "X:ETHUSD"):
        cache.fill_candles(ticker, "1h", make_candles(3).pack(3), cache.lookup_candles(ticker, "1h"))
    (tmp_path / "BTCUSD").mkdir()
    (tmp_path / "BTCUSD" / "1h.parquet").write_bytes(storage.candles_to_parquet(make_candles(3)))
    (tmp_path / "symbols.csv").write_text("ticker\nX:BTCUSD\n")
    storage.upload_directory(tmp_path, "data", progress=False)
    assert cache.lookup_candles("X:BTCUSD", "1h").value is None
    assert cache.lookup_candles("X:ETHUSD", "1h").value is not None  # not written: kept

    storage.put_bytes(storage.candles_key("X:ETHUSD", "1h"), storage.candles_to_parquet(make_candles(4)))
    assert cache.lookup_candles("X:ETHUSD", "1h").value is None


@pytest.mark.parametrize(("key", "pair"), [
    ("data/BTCUSD/1h.parquet", ("X:BTCUSD", "1h")),
    ("data/ETHUSDT/1m.parquet", ("X:ETHUSDT", "1m")),
    ("data/symbols.csv", None), ("data/BTCUSD/2h.parquet", None), ("data/BTC-USD/1h.parquet", None),
    ("models/1h.pkl", None), ("data/x/BTCUSD/1h.parquet", None),
])
def test_a_candle_files_key_names_its_symbol_and_timeframe(key, pair):
    assert storage.candle_file(key) == pair


def test_a_history_shorter_than_asked_for_is_still_served_from_the_caches(bucket, monkeypatch):
    storage.write_candles("X:NEWUSD", "1d", make_candles(5, start=DAY_START, step=86400))
    assert len(storage.read_candles("X:NEWUSD", "1d", 30)) == 5
    assert Candles.unpack(cache.lookup_candles("X:NEWUSD", "1d").value)[1] == 30
    reads = []
    monkeypatch.setattr(storage, "_read_tail", lambda *args: reads.append(1))
    assert len(storage.read_candles("X:NEWUSD", "1d", 30)) == 5  # Redis
    cache.delete(cache.keys.candles("X:NEWUSD", "1d"))
    assert len(storage.read_candles("X:NEWUSD", "1d", 20)) == 5  # memory, same ETag
    assert reads == []


def test_the_committed_sample_reads_the_same_as_files_written_here(bucket):
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "data" / "BTCUSDT" / "1h.parquet"
    if not sample.is_file():
        pytest.skip("no committed sample yet")
    storage.put_bytes(storage.candles_key("X:BTCUSDT", "1h"), sample.read_bytes())
    tail = storage.read_candles("X:BTCUSDT", "1h", 50, use_cache=False)
    everything = storage.read_all_candles("X:BTCUSDT", "1h")
    assert tail.open_time.tolist() == everything.open_time[-50:].tolist()
    rewritten = storage.parquet_to_candles(storage.candles_to_parquet(everything))
    assert rewritten.open_time.tolist() == everything.open_time.tolist()
    assert pq.read_schema(io.BytesIO(storage.candles_to_parquet(everything))) == pq.read_schema(sample)


def test_packed_candles_round_trip_and_refuse_foreign_bytes():
    candles = make_candles(7)
    unpacked, requested = Candles.unpack(candles.pack(requested=20))
    assert requested == 20
    for name in COLUMNS:
        assert getattr(unpacked, name).tolist() == getattr(candles, name).tolist()
    assert Candles.unpack(b'{"open_time": [1]}') is None
    assert Candles.unpack(candles.pack(20)[:-8]) is None


def test_a_foreign_cache_entry_is_ignored_and_read_from_s3(bucket):
    storage.write_candles("X:DOTUSD", "1h", make_candles(12))
    older_json = b'{"open_time": [1, 2, 3]}'
    cache.fill_candles("X:DOTUSD", "1h", older_json, cache.lookup_candles("X:DOTUSD", "1h"))
    assert len(storage.read_candles("X:DOTUSD", "1h", 10)) == 10


def test_a_bundled_model_is_used_only_when_it_is_the_registered_file(tmp_path, monkeypatch):
    import hashlib

    models = tmp_path / "models"
    models.mkdir()
    (models / "1h.pkl").write_bytes(b"model bytes")
    sha256 = hashlib.sha256(b"model bytes").hexdigest()
    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)
    assert storage.bundled_model("1h", sha256) is None  # outside Lambda: the bucket
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))
    assert storage.bundled_model("1h", sha256) == b"model bytes"
    assert storage.bundled_model("1h", "0" * 64) is None  # another model is registered: the bucket
    assert storage.bundled_model("4h", sha256) is None  # not shipped


class _Answer:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


@pytest.mark.parametrize(("attempts", "outcome"), [(1, "storage_unavailable"), (3, "read")])
def test_a_batch_read_tries_again_after_one_s3_error_and_a_waited_read_does_not(bucket, monkeypatch, attempts,
                                                                                  outcome):
    """S3 answers an occasional 500 InternalError or 503 SlowDown that a second try gets past. One try suits a read a
    request waits on (a 503 with Retry-After at once); Refresh and Score had it too: one such answer failed a symbol
    after Polygon was asked, or skipped a series' predictions for an hour. Their template sets S3_READ_ATTEMPTS 3."""
    from botocore.awsrequest import AWSResponse

    from candlecast.config import get_settings
    from candlecast.errors import StorageUnavailable
    from infra import template_checks

    candles = make_candles(5)
    storage.write_candles("X:BTCUSD", "1h", candles)
    monkeypatch.setenv("S3_READ_ATTEMPTS", str(attempts))
    get_settings.cache_clear()
    storage.reset_clients()
    sent = []

    def one_slowdown(request, **_):
        sent.append(request.method)
        if request.method == "GET" and len(sent) == 1:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Answer(body))
        return None

    storage.read_client().meta.events.register("before-send.s3.GetObject", one_slowdown)
    if outcome == "read":
        assert storage.read_all_candles("X:BTCUSD", "1h").close.tolist() == candles.close.tolist()
    else:
        with pytest.raises(StorageUnavailable):
            storage.read_all_candles("X:BTCUSD", "1h")
    assert len(sent) == min(attempts, 2)
    resources = template_checks.load_template()["Resources"]
    for function in ("RefreshFunction", "ScoreFunction"):
        assert resources[function]["Properties"]["Environment"]["Variables"]["S3_READ_ATTEMPTS"] == "3"
    get_settings.cache_clear()


def test_a_seed_keeps_a_file_written_since_it_listed_the_bucket(bucket, tmp_path, monkeypatch):
    """Audit: seed (replace=False) listed the bucket, then wrote each file it had not seen, unconditionally: a
    Refresh writing the same file in between had its new candles replaced by the sample's old ones."""
    key = storage.candles_key("X:BTCUSD", "1h")
    newer = storage.candles_to_parquet(make_candles(5))
    (tmp_path / "BTCUSD").mkdir()
    (tmp_path / "BTCUSD" / "1h.parquet").write_bytes(storage.candles_to_parquet(make_candles(3)))
    (tmp_path / "symbols.csv").write_text("ticker\nX:BTCUSD\n")
    listed = storage._held_keys

    def listed_then_written(client, bucket_name, prefix):
        held = listed(client, bucket_name, prefix)
        storage.put_bytes(key, newer)  # the Refresh, between the listing and the writes
        return held

    monkeypatch.setattr(storage, "_held_keys", listed_then_written)
    assert storage.upload_directory(tmp_path, "data", progress=False, replace=False) == (1, 1)
    assert storage.get_bytes(key) == newer
    assert storage.get_bytes("data/symbols.csv") == b"ticker\nX:BTCUSD\n"
