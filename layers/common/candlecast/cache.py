"""Redis cache: key generators, operations and domain helpers with per-kind TTLs.

A cache outage costs latency, never a request: reads miss, writes are skipped, and one warning is
logged per outage (not one per request). Only the requests in flight when Redis stops answering wait
(at most the socket timeout, once); after that no request touches Redis until a background probe sees
it answer again, so there is no spike of timeouts each time a back-off expires. A Redis that answers, but
slowly (SLOW_STRIKES commands in a row slower than REDIS_SLOW_SECONDS, each within the socket timeout), is
an outage too: the cache is skipped until the probe's ping answers quickly again.

Every value is sealed (a marker and the CRC-32 of the value) when written and checked when read: a value this
module did not write whole (a foreign writer, a truncated or corrupted entry) reads as a miss, never as a body
served to a client nor as an error.

Symbols (one symbol, top lists, searches), track records, prediction bodies with their request pointers, and each
candle file's fresh candles are read through the cache and invalidated when they change (predictions: when the
database loses rows, a restore). Each of those kinds (each candle file) has a generation (a random token at
keys.generation) that invalidation replaces; a lookup reads it with the entry (one MGET), an entry counts only under
the generation it was written with, and a fill is written under the generation looked up before the database (the
file) was read. A fill that raced an invalidation (read the old row, written after the invalidation) is so never
served. The tag written into an entry is its generation and the server's replication id (`INFO replication`'s
master_replid, read on each connect): a server restarted from a snapshot, or a replica promoted by a failover, has a
new one, so the older generations and entries it brings back (an invalidation lost with the writes after the
snapshot) are never served.

A reply of the wrong shape (a proxy or server out of protocol: a string where
MGET's array belongs, an array of another length, a number for a value) is a miss too, and marks the cache down
as an unreadable reply from redis-py does.
"""

import json
import os
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import redis
from aws_lambda_powertools import Logger
from redis.backoff import NoBackoff
from redis.retry import Retry

from candlecast import tls
from candlecast.config import get_settings

logger = Logger(child=True)

TTL_SECONDS = {
    "candles": 60 * 60,
    "prediction": 15 * 60,
    # Symbols change weekly and are invalidated then, but an invalidation the cache missed (down meanwhile) leaves
    # them served this long: 1 h, not 24 h, for at most 23 more indexed reads a day per symbol (README, Routes).
    "symbol": 60 * 60,
    "top_symbols": 60 * 60,
    "search": 5 * 60,
    "track_record": 10 * 60,  # dropped whenever a scoring run records new scores
    "upstream_failure": 30,  # a failing upstream is asked again at most this often per symbol and timeframe
}
DATABASE_IDENTITY_SECONDS = 90 * 24 * 60 * 60  # renewed by every new connection
# While Redis is down, a background probe pings it this often; requests skip it until a ping succeeds.
PROBE_INTERVAL_SECONDS = 0.5
# This many commands in a row slower than REDIS_SLOW_SECONDS mark the cache down: one slow answer (a pause of
# this process, a busy moment) is not an outage, a Redis that adds latency to every request is.
SLOW_STRIKES = 3
# v2: values are sealed; v3: read-through kinds' values carry their generation; v4: predictions' too. A new prefix
# each time, so that during a deploy older code never serves a value of the newer format as it is.
NAMESPACE = "cc:v4"
# Stages may share one Redis (the template takes its endpoint as a parameter): each keeps to its own keys. The stage
# in braces is every key's hash tag: a Redis in cluster mode (ElastiCache Serverless is only that) refuses a command
# on keys of different hash slots (CROSSSLOT), and a lookup reads an entry with its generation in one MGET.
_STAGE = os.environ.get("STAGE") or "local"
_PREFIX = f"{NAMESPACE}:{{{_STAGE}}}"
# A generation is a random token whatever the values' format: outside NAMESPACE, so that an invalidation by either
# release running during a deploy (a Refresh chunk of the older one, an operator's older checkout) drops both's
# entries. Under their own namespaces, each release's writes left the other serving replaced rows for a TTL.
_GENERATIONS = f"cc:{{{_STAGE}}}:generation"
_SEAL = b"\xcc\x02"
_SEALED_HEADER = len(_SEAL) + 4


SYMBOLS = "symbols"  # the generation of one symbol, top lists and searches: they all show symbol rows
TRACK_RECORD = "track-record"
PREDICTIONS = "predictions"  # prediction bodies and request pointers: a database restore loses rows they name
GLOBAL_KINDS = (SYMBOLS, TRACK_RECORD, PREDICTIONS)  # one generation each; every candle file has its own


def _candles_kind(ticker: str, timeframe: str) -> str:
    """One generation per candle file: a write replaces its file's only."""
    return f"candles:{ticker}:{timeframe}"


class keys:
    @staticmethod
    def generation(kind: str) -> str:
        return f"{_GENERATIONS}:{kind}"

    @staticmethod
    def all_candle_generations() -> str:
        return f"{_GENERATIONS}:candles:*"

    @staticmethod
    def candles(ticker: str, timeframe: str) -> str:
        return f"{_PREFIX}:candles:{ticker}:{timeframe}"

    @staticmethod
    def prediction(prediction_id: str) -> str:
        return f"{_PREFIX}:prediction:{prediction_id}"

    @staticmethod
    def prediction_request(ticker: str, timeframe: str) -> str:
        """The newest create without Idempotency-Key of a symbol and timeframe: its request's hash (symbol,
        timeframe, model and the candles' content, hashed by the service) and its prediction's id. Keyed without the
        hash, so it is read with the candles that give the hash, in one round trip."""
        return f"{_PREFIX}:prediction-request:{ticker}:{timeframe}"

    @staticmethod
    def upstream_failure(ticker: str, timeframe: str) -> str:
        return f"{_PREFIX}:upstream-failure:{ticker}:{timeframe}"

    @staticmethod
    def symbol(ticker: str) -> str:
        return f"{_PREFIX}:symbol:{ticker}"

    @staticmethod
    def top_symbols(limit: int) -> str:
        return f"{_PREFIX}:top-symbols:{limit}"

    @staticmethod
    def search(query: str, limit: int) -> str:
        return f"{_PREFIX}:search:{limit}:{query}"

    @staticmethod
    def track_record(timeframe: str | None) -> str:
        """GET /models (timeframe None) or GET /models/{timeframe}."""
        return f"{_PREFIX}:track-record:{timeframe or 'all'}"

    @staticmethod
    def database_identity() -> str:
        """The database's identity when a connection was last opened (`follow_database`)."""
        return f"{_PREFIX}:database-identity"

    @staticmethod
    def health() -> str:
        """Health's write check (`write_problem`)."""
        return f"{_PREFIX}:health"

    @staticmethod
    def all_prediction_keys() -> str:
        """Predictions and their request pointers (benchmarks and tests start afresh with it)."""
        return f"{_PREFIX}:prediction*"

    @staticmethod
    def all_keys() -> str:
        return f"{_PREFIX}:*"

    @staticmethod
    def all_symbol_keys() -> str:
        return f"{_PREFIX}:symbol:*"

    @staticmethod
    def all_search_keys() -> str:
        return f"{_PREFIX}:search:*"


_client: redis.Redis | None = None
_client_lock = threading.Lock()
_down = False
_slow_in_a_row = 0
_generation = 0  # reset_client starts a new one; a probe of an older one stops
# The server's replication id, read on every connect (`_connect`): a restart or a failover changes it.
_history = b""


class _SharedContextConnection(redis.SSLConnection):
    """redis-py's TLS connection on the container's shared context (`candlecast.tls`) where the URL sets no TLS
    option of its own; otherwise redis-py's, which builds a context for every connection."""

    def _wrap_socket_with_ssl(self, sock):
        own_options = (self.certfile, self.keyfile, self.ca_certs, self.ca_path, self.ca_data, self.ssl_min_version,
                       self.ssl_ciphers, self.ssl_include_verify_flags, self.ssl_exclude_verify_flags,
                       self.ssl_validate_ocsp, self.ssl_validate_ocsp_stapled)
        if self.cert_reqs != ssl.CERT_REQUIRED or not self.check_hostname or any(own_options):
            return super()._wrap_socket_with_ssl(sock)
        return tls.default_context().wrap_socket(sock, server_hostname=self.host)


def _uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


def prepare() -> None:
    """At init: the TLS context that the first connection to a rediss:// Redis would build in the first invoke."""
    if _uses_tls(get_settings().redis_url):
        tls.default_context()


def _connect(connection: redis.connection.AbstractConnection) -> None:
    """redis-py's handshake, then the server's replication id into `_history` (empty where INFO is refused)."""
    global _history
    connection.on_connect()
    connection.send_command("INFO", "replication", check_health=False)
    try:
        info = connection.read_response()
    except redis.ResponseError:
        _history = b""
        return
    info = info.encode() if isinstance(info, str) else info
    _history = next((line.partition(b":")[2].strip() for line in info.splitlines()
                     if line.startswith(b"master_replid:")), b"")


def get_client() -> redis.Redis:
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                settings = get_settings()
                tls_options = {"connection_class": _SharedContextConnection} if _uses_tls(settings.redis_url) else {}
                _client = redis.Redis.from_url(
                    settings.redis_url,
                    **tls_options,
                    socket_timeout=settings.redis_socket_timeout,
                    socket_connect_timeout=settings.redis_socket_timeout,
                    # No retry: a request waits at most one socket timeout for a cache.
                    retry=Retry(NoBackoff(), retries=0),
                    retry_on_timeout=False,
                    health_check_interval=30,
                    redis_connect_func=_connect,
                )
    return _client


def reset_client() -> None:
    global _client, _down, _generation, _slow_in_a_row, _write_refused
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None
        _down = False
        _slow_in_a_row = 0
        _write_refused = None
        _generation += 1
    with _upstream_failures_lock:  # a new container remembers none
        _upstream_failures.clear()


def is_down() -> bool:
    return _down


def _mark_down(message: str, error: str) -> None:
    global _down, _slow_in_a_row
    with _client_lock:
        if _down:
            return
        _down = True
        _slow_in_a_row = 0
        generation = _generation
    logger.warning(message, extra={"error": error})
    threading.Thread(target=_probe, args=(generation,), name="cache-probe", daemon=True).start()


def _slow_seconds() -> float:
    return get_settings().redis_slow_seconds


def _timed(seconds: float) -> None:
    """Count a command's time: SLOW_STRIKES slow ones in a row mark the cache down."""
    global _slow_in_a_row
    if seconds <= _slow_seconds():
        _slow_in_a_row = 0
        return
    _slow_in_a_row += 1
    if _slow_in_a_row >= SLOW_STRIKES:
        _mark_down("cache too slow; serving without it", f"{SLOW_STRIKES} answers over {_slow_seconds()} s")


def _probe(generation: int) -> None:
    """Ping until Redis answers quickly, then let requests use it again (only this thread waits on a dead or
    slow cache)."""
    global _down
    while True:
        time.sleep(PROBE_INTERVAL_SECONDS)
        if generation != _generation:  # reset_client superseded this probe while it slept
            return
        started = time.monotonic()
        try:
            answered = get_client().ping()
        except redis.RedisError:
            continue
        if answered is not True or time.monotonic() - started > _slow_seconds():  # True: it said PONG
            continue
        with _client_lock:
            if generation == _generation:
                _down = False
        logger.info("cache available again")
        return


def _sealed(value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else bytes(value)
    return _SEAL + zlib.crc32(data).to_bytes(4, "big") + data


def _opened(raw: bytes | None) -> bytes | None:
    """The value inside a sealed entry; None (a miss) for anything else."""
    if raw is None or len(raw) < _SEALED_HEADER or not raw.startswith(_SEAL):
        return None
    data = raw[_SEALED_HEADER:]
    return data if zlib.crc32(data).to_bytes(4, "big") == raw[len(_SEAL):_SEALED_HEADER] else None


_refusal_logged_at = 0.0
REFUSAL_LOG_SECONDS = 60.0  # a refusal (out of memory, a key of another type) is logged this often at most
# When Redis last refused a write in this process (out of memory, a read-only replica, a failed snapshot), and how.
_write_refused: tuple[float, str] | None = None
WRITE_REFUSAL_SECONDS = 60.0  # health reports the cache degraded this long after one


def _is_value(reply: Any) -> bool:
    return reply is None or isinstance(reply, bytes)


def _are_values(count: int) -> Callable[[Any], bool]:
    return lambda reply: isinstance(reply, list) and len(reply) == count and all(map(_is_value, reply))


def _is_flag(reply: Any) -> bool:
    return reply is None or isinstance(reply, bool)


def _is_count(reply: Any) -> bool:
    return isinstance(reply, int) and not isinstance(reply, bool)


def _guarded(operation: Callable[[redis.Redis], Any], default: Any = None, timed: bool = True,
             expected: Callable[[Any], bool] = _is_value, even_if_down: bool = False) -> Any:
    """`operation`'s result, or `default` while the cache is down (unless `even_if_down`), when it fails or when
    its reply is not `expected`; `timed`: one round trip, whose time counts towards marking a slow cache down."""
    global _refusal_logged_at
    if _down and not even_if_down:
        return default
    started = time.monotonic()
    try:
        client = get_client()
        result = operation(client)
        if timed:
            _timed(time.monotonic() - started)
        if not expected(result):
            client.connection_pool.disconnect()  # a reply out of step with its command: the next could be too
            raise redis.InvalidResponse(f"unexpected reply: {type(result).__name__}")
        return result
    except redis.ResponseError as error:
        # Redis answered, refusing this one command: the cache is up, and only this read or write is skipped.
        _note_refusal(error)
        if time.monotonic() - _refusal_logged_at > REFUSAL_LOG_SECONDS:
            _refusal_logged_at = time.monotonic()
            logger.warning("cache refused a command", extra={"error": _refusal_code(error)})
        return default
    except redis.RedisError as error:
        _mark_down("cache unavailable; serving without it", type(error).__name__)
        return default


def _refusal_code(error: redis.ResponseError) -> str:
    """The refusal's kind, never its text: redis-py's class (it strips the code of those it maps, such as OOM and
    READONLY), or for one it does not map the code the message starts with (MISCONF, WRONGTYPE)."""
    if type(error) is not redis.ResponseError:
        return type(error).__name__
    code = str(error).split(" ", 1)[0]
    return code if code.isalpha() and code.isupper() and len(code) <= 20 else "ResponseError"


def _note_refusal(error: redis.ResponseError) -> None:
    """Remember a refusal of writes as a whole (not one key's: WRONGTYPE), for health."""
    global _write_refused
    code = _refusal_code(error)
    if code in {"OutOfMemoryError", "ReadOnlyError", "MISCONF"}:
        _write_refused = (time.monotonic(), code)


def write_problem() -> str | None:
    """Why Redis refuses writes (out of memory with noeviction, a read-only replica, a failed snapshot), or None
    when it takes them: a write this process made in the last WRITE_REFUSAL_SECONDS was refused, or a SET of a
    small key now is. Health's cache check, after `ping_problem`; words safe for a public page."""
    if _write_refused is not None and time.monotonic() - _write_refused[0] < WRITE_REFUSAL_SECONDS:
        return f"refusing writes ({_write_refused[1]})"
    try:
        get_client().set(keys.health(), b"1", ex=60)
    except redis.ResponseError as error:
        _note_refusal(error)
        return f"refusing writes ({_refusal_code(error)})"
    except redis.RedisError as error:
        return f"no answer ({type(error).__name__})"
    return None


def ping() -> bool:
    return ping_problem() is None


def ping_problem() -> str | None:
    """Why Redis does not answer a PING with PONG now, or None when it does. Checked directly (no outage back-off):
    health must see the real state. Words safe for a public page: redis-py's messages can name the host."""
    try:
        answered = get_client().ping()
    except redis.RedisError as error:
        return f"no answer ({type(error).__name__})"
    return None if answered is True else "answered PING without PONG"


def get(key: str) -> bytes | None:
    return _opened(_guarded(lambda client: client.get(key)))


def set(key: str, value: bytes | str, ttl_seconds: int) -> bool:
    sealed = _sealed(value)
    return bool(_guarded(lambda client: client.set(key, sealed, ex=ttl_seconds), default=False, expected=_is_flag))


def delete(*keys_to_delete: str) -> int:
    return _guarded(lambda client: client.delete(*keys_to_delete), default=0, expected=_is_count)


def delete_pattern(pattern: str, batch_size: int = 500) -> int:
    """Delete every key matching `pattern` using SCAN (never KEYS, which blocks Redis)."""

    def scan_and_delete(client: redis.Redis) -> int:
        deleted, batch = 0, []
        for key in client.scan_iter(match=pattern, count=batch_size):
            batch.append(key)
            if len(batch) >= batch_size:
                deleted += unlink(client, batch)
                batch = []
        if batch:
            deleted += unlink(client, batch)
        return deleted

    def unlink(client: redis.Redis, batch: list) -> int:
        count = client.unlink(*batch)
        if not _is_count(count):
            raise redis.InvalidResponse(f"unexpected reply: {type(count).__name__}")
        return count

    return _guarded(scan_and_delete, default=0, timed=False, expected=_is_count)  # many round trips


def get_json(key: str) -> Any | None:
    raw = get(key)
    return None if raw is None else json.loads(raw)  # sealed: written by set_json


def set_json(key: str, value: Any, ttl_seconds: int) -> bool:
    return set(key, json.dumps(value, separators=(",", ":"), default=str), ttl_seconds)


# Domain helpers: one place that knows each kind's key and TTL.


def forget_candles(pairs: list[tuple[str, str]]) -> bool:
    """A new generation for the fresh candles of each of these (ticker, timeframe) pairs, in one command: their
    files were just written, and no entry filled before (a read of the old file that fills after this, too) is
    served again. Asked even while this process counts the cache down (only batch writers write candle files, and
    they can wait a socket timeout; skipped, the old candles would be served for an hour). False when the cache
    did not take it (each is then served until its TTL, 1 h, runs out)."""
    if not pairs:
        return True
    return _new_generations([keys.generation(_candles_kind(*pair)) for pair in pairs], even_if_down=True)


def _new_generations(generation_keys: list[str], even_if_down: bool) -> bool:
    """A new generation under each of these keys, in one command. Where Redis refuses it but still takes deletes
    (out of memory with noeviction), the generations are deleted instead: a lookup then starts another (or, while
    writes are refused, fills nothing), so no entry written before is served either. False when neither was taken."""
    generations = {key: _new_generation() for key in generation_keys}
    refused_before = _write_refused
    if _guarded(lambda client: client.mset(generations), expected=_is_flag, even_if_down=even_if_down):
        return True
    if _write_refused is refused_before:  # not a refusal of writes (unreachable: a delete would wait as long)
        return False
    return _guarded(lambda client: client.delete(*generations), default=None, expected=_is_count,
                    even_if_down=even_if_down) is not None


def lookup_prediction(prediction_id: str) -> "Lookup":
    return _lookup(PREDICTIONS, keys.prediction(prediction_id))


def get_prediction_bytes(prediction_id: str) -> bytes | None:
    return lookup_prediction(prediction_id).value


def fill_prediction(prediction_id: str, body: bytes, lookup: "Lookup") -> bool:
    return _fill(keys.prediction(prediction_id), body, TTL_SECONDS["prediction"], lookup)


def set_prediction_bytes(prediction_id: str, body: bytes) -> bool:
    """A body under the current generation (two round trips: tools and tests; reads fill after their lookup)."""
    return fill_prediction(prediction_id, body, lookup_prediction(prediction_id))


def forget_predictions(prediction_ids: list[str]) -> bool:
    """Drop the cached bodies of deleted predictions, in one command; False when the cache did not take it (each
    is then served until its TTL, 15 min, runs out)."""
    if not prediction_ids:
        return True
    return _guarded(lambda client: client.delete(*map(keys.prediction, prediction_ids)), default=None,
                    expected=_is_count) is not None


def lookup_candles_and_request(ticker: str, timeframe: str) -> tuple["Lookup", "Lookup"]:
    """The fresh-candles lookup and the request pointer's (its value: the pointer; its generation: the predictions'
    a create writes under) of a symbol and timeframe, in one round trip (MGET). `prediction_for_request` reads the
    pointer once the candles have given the request's hash."""
    candles, request = _lookups([(_candles_kind(ticker, timeframe), keys.candles(ticker, timeframe)),
                                 (PREDICTIONS, keys.prediction_request(ticker, timeframe))])
    return candles, request


def prediction_for_request(pointer: bytes | None, request_hash: str) -> str | None:
    """The prediction id of a request pointer ("<hash> <id>") when it is `request_hash`'s."""
    if pointer is None:
        return None
    pointed_hash, _, prediction_id = pointer.decode("ascii", "replace").partition(" ")
    return prediction_id if pointed_hash == request_hash and prediction_id else None


def get_prediction_for_request(ticker: str, timeframe: str, request_hash: str) -> str | None:
    return prediction_for_request(_lookup(PREDICTIONS, keys.prediction_request(ticker, timeframe)).value,
                                  request_hash)


def set_prediction_for_request(ticker: str, timeframe: str, request_hash: str, prediction_id: str,
                               lookup: "Lookup") -> bool:
    """The pointer from a request to its prediction, under the predictions' generation `lookup` saw."""
    return _fill(keys.prediction_request(ticker, timeframe), f"{request_hash} {prediction_id}".encode(),
                 TTL_SECONDS["prediction"], lookup)


def set_created_prediction(prediction_id: str, body: bytes, request: tuple[str, str, str] | None,
                           lookup: "Lookup") -> bool:
    """A new prediction's body and (for a request without Idempotency-Key: `request` is its ticker, timeframe
    and hash) the pointer from its request to it, in one round trip, under the predictions' generation `lookup`
    (`lookup_candles_and_request`'s second) saw before the row was written."""
    if lookup.generation is None:
        return False
    tag = lookup.generation + b" "

    def write(client: redis.Redis) -> bool:
        pipeline = client.pipeline(transaction=False)
        pipeline.set(keys.prediction(prediction_id), _sealed(tag + body), ex=TTL_SECONDS["prediction"])
        if request is not None:
            ticker, timeframe, request_hash = request
            pipeline.set(keys.prediction_request(ticker, timeframe),
                         _sealed(tag + f"{request_hash} {prediction_id}".encode()), ex=TTL_SECONDS["prediction"])
        return all(pipeline.execute())

    return bool(_guarded(write, default=False, expected=_is_flag))


# Upstream failures are remembered in this process too, so that Redis down or refusing writes does not turn one
# failing symbol into a call upstream per request: (ticker, timeframe) -> failure, the newest last.
_upstream_failures: "OrderedDict[tuple[str, str], dict]" = OrderedDict()
_upstream_failures_lock = threading.Lock()
UPSTREAM_FAILURES_KEPT = 256


def get_upstream_failure(ticker: str, timeframe: str) -> dict | None:
    """The failure remembered for this symbol and timeframe ({status, code, message, until}), if any: this
    process's, else Redis's (another container's)."""
    with _upstream_failures_lock:
        failure = _upstream_failures.get((ticker, timeframe))
    if failure is not None and failure["until"] > time.time():
        return failure
    failure = get_json(keys.upstream_failure(ticker, timeframe))
    return failure if isinstance(failure, dict) else None


def set_upstream_failure(ticker: str, timeframe: str, status: int, code: str, message: str) -> int:
    """Remember a failed upstream fetch briefly, in this process and in Redis; returns the seconds it is
    remembered for."""
    ttl = TTL_SECONDS["upstream_failure"]
    failure = {"status": status, "code": code, "message": message, "until": time.time() + ttl}
    with _upstream_failures_lock:
        _upstream_failures[(ticker, timeframe)] = failure
        _upstream_failures.move_to_end((ticker, timeframe))
        while len(_upstream_failures) > UPSTREAM_FAILURES_KEPT:
            _upstream_failures.popitem(last=False)
    set_json(keys.upstream_failure(ticker, timeframe), failure, ttl)
    return ttl


class Lookup(NamedTuple):
    """A read-through entry (value None: a miss) and its kind's generation when it was looked up (with the server's
    replication id: `_tag`), which the fill after a miss hands back; generation None: no fill (the cache is
    unavailable)."""

    value: bytes | None
    generation: bytes | None


def _new_generation() -> bytes:
    return os.urandom(8).hex().encode()


def _tag(generation: bytes) -> bytes:
    """What an entry of `generation` carries on this server's history. Read after the command that fetched the
    generation: a reconnect to a restarted server updates `_history` before the command is sent."""
    return _history + b"." + generation


def _lookups(entries: list[tuple[str, str]]) -> list[Lookup]:
    """The lookup of each (kind, key), with each kind's generation, in one round trip."""
    names = [name for kind, key in entries for name in (keys.generation(kind), key)]
    replies = _guarded(lambda client: client.mget(names), expected=_are_values(len(names)))
    if replies is None:
        return [Lookup(None, None)] * len(entries)
    return [_entry(names[index], replies[index], replies[index + 1]) for index in range(0, len(names), 2)]


def _entry(generation_key: str, generation: bytes | None, raw: bytes | None) -> Lookup:
    if generation is None:
        # Never invalidated, flushed or evicted: start a generation no entry can carry (a counter restarted
        # from nothing could meet an old entry's). Whoever sets it first wins; the others skip this fill.
        generation = _new_generation()
        started = _guarded(lambda client: client.set(generation_key, generation, nx=True), expected=_is_flag)
        return Lookup(None, _tag(generation) if started else None)
    tag, _, value = (_opened(raw) or b"").partition(b" ")
    generation = _tag(generation)
    return Lookup(value if tag == generation else None, generation)


def _lookup(kind: str, key: str) -> Lookup:
    return _lookups([(kind, key)])[0]


def _fill(key: str, body: bytes, ttl_seconds: int, lookup: Lookup) -> bool:
    """Cache `body`, read after `lookup`, under the generation `lookup` saw."""
    return lookup.generation is not None and set(key, lookup.generation + b" " + body, ttl_seconds)


def _invalidate(kind: str, retry: bool) -> bool:
    """A new generation for `kind`: no entry written before is served again. False when the cache did not take it
    (entries cached before are served until their TTL runs out): the caller reports it and, with `retry`, tries
    again even while an outage is on (its probe may not have seen Redis back yet; a batch job can wait)."""
    return _new_generations([keys.generation(kind)], even_if_down=retry)


def lookup_candles(ticker: str, timeframe: str) -> Lookup:
    """The fresh-candles entry (Candles.pack's bytes: storage owns the format; this module stays free of numpy)."""
    return _lookup(_candles_kind(ticker, timeframe), keys.candles(ticker, timeframe))


def fill_candles(ticker: str, timeframe: str, packed: bytes, lookup: Lookup) -> bool:
    """Cache candles read after `lookup` (from the file, Polygon or both): a write of the file since is not undone."""
    return _fill(keys.candles(ticker, timeframe), packed, TTL_SECONDS["candles"], lookup)


def lookup_symbol(ticker: str) -> Lookup:
    return _lookup(SYMBOLS, keys.symbol(ticker))


def fill_symbol(ticker: str, body: bytes, lookup: Lookup) -> bool:
    return _fill(keys.symbol(ticker), body, TTL_SECONDS["symbol"], lookup)


def lookup_top_symbols(limit: int) -> Lookup:
    return _lookup(SYMBOLS, keys.top_symbols(limit))


def fill_top_symbols(limit: int, body: bytes, lookup: Lookup) -> bool:
    return _fill(keys.top_symbols(limit), body, TTL_SECONDS["top_symbols"], lookup)


def lookup_search(query: str, limit: int) -> Lookup:
    return _lookup(SYMBOLS, keys.search(query, limit))


def fill_search(query: str, limit: int, body: bytes, lookup: Lookup) -> bool:
    return _fill(keys.search(query, limit), body, TTL_SECONDS["search"], lookup)


# The longest a symbol row stays served after an invalidation the cache did not take.
SYMBOLS_STALE_SECONDS = max(TTL_SECONDS[kind] for kind in ("symbol", "top_symbols", "search"))


def invalidate_symbols(retry: bool = False) -> bool:
    """After symbols change (seed, refresh, a symbol's stored timeframes): symbol entries, top lists and searches.
    False: not taken, and the change is served at most SYMBOLS_STALE_SECONDS late."""
    return _invalidate(SYMBOLS, retry)


def lookup_track_record(timeframe: str | None) -> Lookup:
    return _lookup(TRACK_RECORD, keys.track_record(timeframe))


def fill_track_record(timeframe: str | None, body: bytes, lookup: Lookup) -> bool:
    return _fill(keys.track_record(timeframe), body, TTL_SECONDS["track_record"], lookup)


def invalidate_track_record() -> bool:
    """After new scores or a new active model: the cached /models answers."""
    return _invalidate(TRACK_RECORD, retry=False)


def invalidate_all(retry: bool = False) -> int | None:
    """After a restore from a backup (the database, Redis or the bucket): a new generation for every kind, each candle
    file's too (found with SCAN), in one MSET. The generations replaced, or None when the cache did not take it."""
    candle_generations = _guarded(lambda client: list(client.scan_iter(match=keys.all_candle_generations(),
                                                                       count=500)),
                                  timed=False, expected=lambda reply: isinstance(reply, list), even_if_down=retry)
    if candle_generations is None:
        return None
    generation_keys = [keys.generation(kind) for kind in GLOBAL_KINDS] + candle_generations
    return len(generation_keys) if _new_generations(generation_keys, even_if_down=retry) else None


def follow_database(identity: str) -> None:
    """On each new database connection (one SET ... GET): when the database's identity differs from the one recorded,
    its history changed (a restore, or a restart or failover, which cost one invalidation each) and every kind is
    invalidated, by the one connection that swapped the identity. When the cache does not take that, the old
    identity is put back for the next connection to try again. Redis unavailable: nothing."""
    sealed = _sealed(identity)
    previous = _opened(_guarded(lambda client: client.set(keys.database_identity(), sealed,
                                                          ex=DATABASE_IDENTITY_SECONDS, get=True)))
    if previous is None or previous == identity.encode():
        return
    replaced = invalidate_all()
    if replaced is None:
        logger.warning("database history changed (a restore, a restart or a failover); caches NOT invalidated: "
                       "the cache did not take it")
        set(keys.database_identity(), previous, DATABASE_IDENTITY_SECONDS)
        return
    logger.warning("database history changed (a restore, a restart or a failover); caches invalidated",
                   extra={"generations": replaced})
