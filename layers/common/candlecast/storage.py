"""The bucket: S3 keys (only here), candle Parquet files and model files.

Layout: data/{STORAGE_NAME}/{tf}.parquet, models/{tf}.pkl (active), models/{tf}/{version}.pkl, key + ".sig".

Clients are created once per container, at init by functions that read (prepare_reads). numpy, pyarrow and boto3
are imported inside functions, so importing this module stays cheap for health and search.
"""

import http.client
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from aws_lambda_powertools import Logger

from candlecast import cache, tls
from candlecast.config import get_settings
from candlecast.errors import CandleFileInvalid, FileChanged, StorageUnavailable
from candlecast.tickers import storage_name

if TYPE_CHECKING:
    import pyarrow as pa

    from candlecast.candles import Candles

logger = Logger(child=True)

ROW_GROUP_SIZE = 1024
# Warm containers keep this many candle tails in memory (each is at most a few hundred KB).
MEMORY_CACHE_ENTRIES = 64

_lock = threading.Lock()
_clients: dict[str, Any] = {}
# key -> (ETag, candles, rows asked for): a file shorter than asked for is still a complete answer.
_memory: "OrderedDict[str, tuple[str, Candles, int]]" = OrderedDict()
# key -> (ETag, client message, monotonic deadline): a candle file found invalid is not read again while it is
# unchanged, for as long as its answer's Retry-After.
_refused: "OrderedDict[str, tuple[str, str, float]]" = OrderedDict()


# --- keys ---------------------------------------------------------------------------------------


def candles_key(ticker: str, timeframe: str) -> str:
    return f"data/{storage_name(ticker)}/{timeframe}.parquet"


def active_model_key(timeframe: str) -> str:
    return f"models/{timeframe}.pkl"


def versioned_model_key(timeframe: str, version: str) -> str:
    return f"models/{timeframe}/{version}.pkl"


def signature_key(model_key: str) -> str:
    return model_key + ".sig"


# Where every model file and its signature live (active_model_key's folder): one LIST finds them all.
MODELS_PREFIX = active_model_key("").rsplit("/", 1)[0] + "/"


# --- clients ------------------------------------------------------------------------------------


def bundled_model(timeframe: str, sha256: str) -> bytes | None:
    """The active model file shipped in the function (models/{tf}.pkl beside app.py), when its sha256 is the
    registered one; None sends the caller to the bucket. Its bytes are then the registered file's, and the
    function's code package is written only by a deploy, so no signature is read: the committed `.sig` files
    carry the development key, which no deployed stage accepts."""
    import hashlib
    import os

    task_root = os.environ.get("LAMBDA_TASK_ROOT")
    path = Path(task_root or "/nonexistent") / "models" / f"{timeframe}.pkl"
    if not task_root or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        logger.info("bundled model is not the registered one; reading the bucket", extra={"timeframe": timeframe})
        return None
    return data


def _client(name: str, factory: Callable[[], Any]) -> Any:
    client = _clients.get(name)
    if client is None:
        with _lock:
            client = _clients.get(name)
            if client is None:
                client = _clients[name] = factory()
    return client


def _make_boto3_client(read_timeout: float = 2, attempts: int = 2) -> Any:
    import boto3
    from botocore.config import Config

    settings = get_settings()
    # A stalled S3 must fail a request well inside its Lambda timeout, as storage_unavailable.
    config = Config(connect_timeout=1, read_timeout=read_timeout,
                    retries={"total_max_attempts": attempts, "mode": "standard"})
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region, config=config
    )


def s3_client() -> Any:
    return _client("s3", _make_boto3_client)


def read_client() -> Any:
    """For reads (candles, a model), each try at most a second. Where a request waits, one try
    (S3_READ_ATTEMPTS): a stalled S3 is answered at once as storage_unavailable with Retry-After (two tries of two
    seconds made a create wait 4.9 s in `make faults`; most candle reads hit the Redis copy). The batch functions
    try again: one 500 or SlowDown failed a Refresh's symbol after Polygon was asked, and skipped a Score's series."""
    return _client("s3-read", lambda: _make_boto3_client(read_timeout=1, attempts=get_settings().s3_read_attempts))


def prepare_reads() -> None:
    """Import the candle reading path (numpy, pyarrow's Parquet reader, boto3) and build its S3 client now, during
    a function's init, which Lambda runs on a full vCPU: a request that skips the Redis copy then loads none of
    it. Building it sends no request, so init succeeds with S3 down."""
    import botocore.exceptions  # noqa: F401 - _unavailable_as_503's
    import pyarrow.compute  # _table_to_candles casts timestamps with it
    import pyarrow.parquet  # noqa: F401

    import candlecast.candles  # noqa: F401 - numpy

    read_client()


def reset_clients() -> None:
    """Forget clients and the in-memory candle cache (tests, or after settings change)."""
    with _lock:
        _clients.clear()
        _memory.clear()
        _refused.clear()


def _bucket() -> str:
    return get_settings().data_bucket


def _code(error: Exception) -> str:
    """S3's error code of a ClientError ("unknown" when it has none)."""
    return str((getattr(error, "response", None) or {}).get("Error", {}).get("Code", "unknown"))


def _is_missing(error: Exception) -> bool:
    return _code(error) in {"404", "NoSuchKey", "NotFound"}


@dataclass
class _Outage:
    since: float  # time.monotonic() of its first failed request
    failed: int = 0  # requests failed since


_outage: _Outage | None = None  # S3 failing since; each failed request logs its own line


@contextmanager
def _unavailable_as_503(key: str) -> Iterator[None]:
    """An unreachable or failing S3 becomes StorageUnavailable (503); a missing key is the caller's to handle.
    The first request S3 answers after failures logs "storage up again", with how long and how many failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except FileNotFoundError:
        _storage_answered()
        raise
    except ClientError as error:
        if _is_missing(error):
            _storage_answered()
            raise
        # The error's code, not S3's text: an upstream's words stay out of logs and answers.
        logger.warning("storage request failed", extra={"key": key, "error": _code(error)})
        _storage_failed()
        raise _logged_unavailable() from error
    except (BotoCoreError, OSError) as error:
        logger.warning("storage unreachable", extra={"key": key, "error": type(error).__name__})
        _storage_failed()
        raise _logged_unavailable() from error
    _storage_answered()


def _storage_failed() -> None:
    global _outage
    with _lock:
        if _outage is None:
            _outage = _Outage(time.monotonic())
        _outage.failed += 1


def _storage_answered() -> None:
    global _outage
    if _outage is None:
        return
    with _lock:
        outage, _outage = _outage, None
    if outage is not None:
        logger.info("storage up again", extra={"down_seconds": round(time.monotonic() - outage.since, 3),
                                               "failed_requests": outage.failed})


def _logged_unavailable() -> StorageUnavailable:
    """The 503 for a failed S3 request whose cause (key, error code) was just logged: marked so, or the API's error
    handler logged 'request failed' for it too (two lines per request for one cause)."""
    error = StorageUnavailable("storage is unavailable; try again shortly")
    error.logged = True
    return error


# --- plain objects ------------------------------------------------------------------------------


def put_bytes(key: str, data: bytes, content_type: str = "application/octet-stream", *, over: str | None = None
              ) -> str:
    """One PUT of the whole object (atomic for readers). Returns the new ETag. A failure is StorageUnavailable,
    logged with S3's error code only: its text (an AccessDenied names the role and account) stays out.
    A candle file's cached candles are dropped once it is written (a warning when the cache did not take it;
    `write_candles` hands that to its caller instead).

    `over` writes only over the version read: its ETag (If-Match), or "" for no object (If-None-Match: *). Another
    version by then is FileChanged, nothing written: S3's 412, its 409 to a conditional write racing another,
    or a 404 (deleted). None (an operator's repair, a seed) writes whatever the key holds."""
    etag = _put_object(key, data, content_type, over)
    if not forget_cached_candles([key]):
        warn_cached_candles_stale(1)
    return etag


def _put_object(key: str, data: bytes, content_type: str, over: str | None) -> str:
    """`put_bytes`' PUT alone: the caller drops a candle file's cached candles."""
    from botocore.exceptions import ClientError

    condition = {} if over is None else {"IfMatch": over} if over else {"IfNoneMatch": "*"}
    with _unavailable_as_503(key):
        try:
            response = s3_client().put_object(Bucket=_bucket(), Key=key, Body=data, ContentType=content_type,
                                              **condition)
        except ClientError as error:
            if condition and (_is_missing(error) or _code(error) in {"412", "PreconditionFailed", "409",
                                                                     "ConditionalRequestConflict"}):
                raise FileChanged(f"{key} was written by another writer since it was read") from error
            raise
    return response["ETag"]


def candle_file(key: str) -> tuple[str, str] | None:
    """(ticker, timeframe) of a candle file's key (the inverse of candles_key), None for any other key."""
    from candlecast.errors import BadRequest
    from candlecast.tickers import normalize_ticker
    from candlecast.timeframes import TIMEFRAMES

    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "data" or not parts[2].endswith(".parquet"):
        return None
    timeframe = parts[2].removesuffix(".parquet")
    try:
        ticker = normalize_ticker(parts[1])
    except BadRequest:
        return None
    return (ticker, timeframe) if timeframe in TIMEFRAMES and candles_key(ticker, timeframe) == key else None


def forget_cached_candles(written: Iterable[str]) -> bool:
    """After candle files were written (any path: write_candles, put_bytes, upload_directory): drop their
    fresh-candles entries in Redis, which are otherwise served for up to an hour (TTL_SECONDS["candles"]) and
    would go on forecasting from the file that was replaced. Keys that are no candle files are ignored. False
    when the cache did not take it (unreachable, or refusing writes): the caller reports it."""
    pairs = sorted({pair for key in written if (pair := candle_file(key)) is not None})
    return not pairs or cache.forget_candles(pairs)


def warn_cached_candles_stale(files: int) -> None:
    logger.warning("cache did not drop the candles of files just written; they are served until their TTL",
                   extra={"files": files, "seconds": cache.TTL_SECONDS["candles"]})


class StoredObject(NamedTuple):
    data: bytes | None  # None: the object is still the version get_object was told it has (304)
    etag: str


def get_object(key: str, unless: str = "") -> StoredObject | None:
    """The object's bytes and ETag from one GET, so both are one version's whatever is written meanwhile; None when
    there is no such key. With `unless` (an ETag), no bytes when the object is still that version."""
    from botocore.exceptions import ClientError

    try:
        with _unavailable_as_503(key):
            try:
                response = read_client().get_object(Bucket=_bucket(), Key=key, **({"IfNoneMatch": unless} if unless
                                                                                    else {}))
            except ClientError as error:
                if unless and _code(error) in {"304", "NotModified"}:
                    return StoredObject(None, unless)
                raise
            return StoredObject(response["Body"].read(), response["ETag"])
    except ClientError as error:
        if _is_missing(error):
            return None
        raise


def get_bytes(key: str) -> bytes | None:
    """The object's bytes, or None when there is no such key."""
    stored = get_object(key)
    return None if stored is None else stored.data


def head_etag(key: str) -> str | None:
    """The object's ETag, or None when there is no such key (pyarrow's FileInfo does not expose it)."""
    from botocore.exceptions import ClientError

    try:
        with _unavailable_as_503(key):
            return s3_client().head_object(Bucket=_bucket(), Key=key)["ETag"]
    except ClientError as error:
        if _is_missing(error):
            return None
        raise


def _keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under `prefix`: a LIST, one request per 1,000 keys; names only."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def list_keys(prefix: str) -> list[str]:
    with _unavailable_as_503(prefix):
        return _keys_under(s3_client(), _bucket(), prefix)


def model_keys() -> set[str]:
    """Every key under MODELS_PREFIX (model files and their signatures): a LIST, one request per 1,000 keys, on
    the read client (one try of at most a second). Names only: nothing is downloaded. Failures are raised as they
    are, unlogged: the caller (Health, which HEADs the bucket first) reports them once (`failure_code`)."""
    return set(_keys_under(read_client(), _bucket(), MODELS_PREFIX))


def missing_model_files(model_key: str, held: set[str]) -> list[str] | None:
    """The keys of a model file and its signature (which a load reads, file first) that `held` (`model_keys()`)
    lacks; None when the file lies outside MODELS_PREFIX, which that listing does not cover."""
    if not model_key.startswith(MODELS_PREFIX):
        return None
    return [key for key in (model_key, signature_key(model_key)) if key not in held]


def failure_code(error: Exception) -> str:
    """What a public answer may say of a failed S3 request: S3's error code, or the error's class (S3's text and
    the request's URL name the bucket)."""
    from botocore.exceptions import ClientError

    return _code(error) if isinstance(error, ClientError) else type(error).__name__


def prepare_model_listing() -> None:
    """Build `model_keys`' client (and import boto3) now, during a function's init; it sends no request."""
    read_client()


def _held_keys(client: Any, bucket: str, prefix: str) -> set[str]:
    """The bucket's keys under `prefix`; a failure names the bucket (list_keys' is a request's "try again")."""
    from botocore.exceptions import ClientError

    try:
        return set(_keys_under(client, bucket, prefix))
    except ClientError as error:
        raise StorageUnavailable(f"could not list s3://{bucket}/{prefix}: {_code(error)}") from error


class Uploaded(NamedTuple):
    written: int
    kept: int  # files the bucket held already, left as they were (replace=False)


def upload_directory(local_dir: str | Path, prefix: str = "", *, progress: bool = True,
                     replace: bool = True) -> Uploaded:
    """Upload every file under `local_dir` to `prefix/<relative path>`; with `replace=False`, only those whose
    key the bucket does not hold yet, each written only if it is still absent (If-None-Match): a refresh may have
    written it since the listing, and a seed then put the sample's old candles over the new file."""
    root = Path(local_dir)
    files = sorted(path for path in root.rglob("*") if path.is_file() and not path.name.startswith("."))
    client, bucket = s3_client(), _bucket()
    held = set() if replace else _held_keys(client, bucket, prefix.strip("/"))

    def key_of(path: Path) -> str:
        return "/".join(part for part in (prefix.strip("/"), path.relative_to(root).as_posix()) if part)

    absent = [path for path in files if key_of(path) not in held]
    items: Iterable[Path] = absent
    if progress:
        from tqdm import tqdm  # CLI only (train extra); never called inside a Lambda

        items = tqdm(absent, desc=f"upload {root.name}", unit="file")
    written = []
    try:
        for path in items:
            key = key_of(path)
            if replace:
                client.upload_file(str(path), bucket, key)
            else:
                try:
                    _put_object(key, path.read_bytes(), "application/octet-stream", over="")
                except FileChanged:
                    continue  # written by another since the listing: kept
            written.append(key)
    finally:  # the files uploaded before a failure are new too
        if not forget_cached_candles(written):
            warn_cached_candles_stale(len(written))
    return Uploaded(len(written), len(files) - len(written))


# --- candles ------------------------------------------------------------------------------------


def _schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema(
        [
            ("open_time", pa.int64()),  # epoch seconds UTC, as in Candles and the committed sample
            ("open", pa.float64()),
            ("high", pa.float64()),
            ("low", pa.float64()),
            ("close", pa.float64()),
            ("volume", pa.float64()),
        ]
    )


def _as_candles(data: Any) -> "Candles":
    """Candles from Candles, a pyarrow Table or a mapping of columns."""
    from candlecast.candles import Candles

    if isinstance(data, Candles):
        return data
    if hasattr(data, "column_names"):  # pyarrow Table
        return _table_to_candles(data)
    return Candles.from_dict(data)


def _table_to_candles(table: "pa.Table") -> "Candles":
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from candlecast.candles import COLUMNS, Candles

    name = "open_time" if "open_time" in table.column_names else "timestamp"
    times = table.column(name)
    if pa.types.is_timestamp(times.type):
        times = pc.cast(times, pa.timestamp("s", tz="UTC")).cast(pa.int64())
    columns = {"open_time": np.asarray(times.to_numpy(), dtype=np.int64)}
    for column in COLUMNS[1:]:
        columns[column] = np.asarray(table.column(column).to_numpy(), dtype=np.float64)
    return Candles(**columns)


def _candles_to_table(candles: "Candles") -> "pa.Table":
    import pyarrow as pa

    from candlecast.candles import COLUMNS

    schema = _schema()
    arrays = [pa.array(candles.open_time, type=pa.int64())]
    arrays += [pa.array(getattr(candles, column), type=pa.float64()) for column in COLUMNS[1:]]
    return pa.Table.from_arrays(arrays, schema=schema)


def normalize_candles(data: Any) -> "Candles":
    """Sorted by open_time, one row per open_time (the last occurrence wins)."""
    import numpy as np

    from candlecast.candles import COLUMNS, Candles

    candles = _as_candles(data)
    times = candles.open_time
    if len(times) and bool(np.all(times[1:] > times[:-1])):
        return candles
    # Stable sort, then keep the last row of each run of equal times: later rows are newer data.
    order = np.argsort(times, kind="stable")
    sorted_times = times[order]
    keep = np.ones(len(order), dtype=bool)
    keep[:-1] = sorted_times[:-1] != sorted_times[1:]
    picked = order[keep]
    return Candles(**{column: getattr(candles, column)[picked] for column in COLUMNS})


def merge_candles(existing: Any | None, new: Any) -> "Candles":
    """Existing rows plus new ones, sorted and deduplicated by open_time; new rows replace old ones."""
    import numpy as np

    from candlecast.candles import COLUMNS, Candles

    new = _as_candles(new)
    if existing is None or len(existing) == 0:
        return normalize_candles(new)
    existing = _as_candles(existing)
    joined = Candles(
        **{column: np.concatenate([getattr(existing, column), getattr(new, column)]) for column in COLUMNS}
    )
    return normalize_candles(joined)


def candles_to_parquet(data: Any) -> bytes:
    """Parquet bytes with row groups of ROW_GROUP_SIZE rows, so the tail is cheap to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _candles_to_table(normalize_candles(data))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return sink.getvalue().to_pybytes()


def parquet_to_candles(data: bytes) -> "Candles":
    import pyarrow as pa
    import pyarrow.parquet as pq

    return _table_to_candles(pq.read_table(pa.BufferReader(data)))


class WrittenFile(NamedTuple):
    rows: int
    etag: str
    # The cache did not drop the file's cached candles (unreachable, or refusing writes): the old candles may be
    # served for up to cache.TTL_SECONDS["candles"]; the caller reports it (and may retry forget_cached_candles).
    cache_stale: bool = False


def write_candles(ticker: str, timeframe: str, data: Any, *, over: str | None = None) -> WrittenFile:
    """Replace the symbol's file with `data` (sorted, deduplicated) in one PUT: readers see the old
    object or the new one, never a partial one. `over`: only over that version (`put_bytes`; a CandleFile's
    `etag`). Returns the number of rows written, the new version and whether its cached candles stayed."""
    candles = normalize_candles(data)
    key = candles_key(ticker, timeframe)
    etag = _put_object(key, candles_to_parquet(candles), "application/vnd.apache.parquet", over)
    return WrittenFile(len(candles), etag, not forget_cached_candles([key]))


def _read_tail(handle: Any, last_n: int | None) -> "Candles":
    """Only the row groups that hold the last `last_n` rows (all of them when last_n is None), sorted and
    deduplicated by `normalize_candles`. Rows read out of order or repeated (a file this module did not write)
    mean the last row groups may not hold the newest candles: then the whole file is read and normalized."""
    import numpy as np
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    metadata = parquet.metadata
    groups: list[int] = []
    rows = 0
    for index in range(metadata.num_row_groups - 1, -1, -1):
        if last_n is not None and rows >= last_n:
            break
        groups.append(index)
        rows += metadata.row_group(index).num_rows
    groups.reverse()
    table = parquet.read_row_groups(groups) if groups else _schema().empty_table()
    candles = _table_to_candles(table)
    times = candles.open_time
    if len(groups) < metadata.num_row_groups and not bool(np.all(times[1:] > times[:-1])):
        candles = _table_to_candles(parquet.read())
    candles = normalize_candles(candles)
    return candles if last_n is None else candles.tail(last_n)


def candle_damage(read: Callable[[], "Candles"], timeframe: str) -> tuple["Candles | None", str | None]:
    """(`read()`'s candles, None) when they are a stored `timeframe` series, else (None, why not): not Parquet,
    other columns or types, open times that are no date or off the timeframe's grid (a forecast would continue the
    wrong candle; the ingest drops such bars from Polygon, `ingest.bars_to_candles`), or later than a bar after
    now (a forecast would start years ahead). Rows out of order or repeated are not damage: `read` sorts and
    deduplicates them (`normalize_candles`). The one check of every read (`_checked`) and of every file an
    operator puts in the bucket (`seed`, `candlecast put-candles`), so nothing is written that reads refuse."""
    try:
        candles = read()
        damage = candles.damage(timeframe, int(time.time()))
    except (ValueError, TypeError, KeyError) as error:
        return None, f"{type(error).__name__}: {error}"[:300]
    return (candles, None) if damage is None else (None, damage)


def _checked(read: Callable[[], "Candles"], key: str, ticker: str, timeframe: str, etag: str = "", *,
             log: bool = True) -> "Candles":
    """`read()`'s candles, or CandleFileInvalid naming the file when it is not a candle series (`candle_damage`).

    Unlike an S3 failure, no retry mends such a file: the error says so (503 candle_file_invalid, a long
    Retry-After) and the log line names the file, its ETag and the problem, for the operator who must act.
    With `log` False (the ingest, which rebuilds the file and says so itself) there is no log line; the error
    carries the key and the problem (`key`, `problem`: never in its message, which a client may see)."""
    candles, damage = candle_damage(read, timeframe)
    if candles is None:
        if log:
            logger.error("invalid candle file: delete it (the next ingest rebuilds it from Polygon) or rewrite it",
                         extra={"key": key, "etag": etag, "ticker": ticker, "timeframe": timeframe, "problem": damage})
        error = CandleFileInvalid(f"the {timeframe} candle file of {ticker} is unreadable or not a {timeframe} "
                                  "candle series; it must be repaired before it is forecast from")
        error.key, error.problem, error.etag = key, damage, etag
        error.logged = log  # the line above names the file: the API's handler adds no 'request failed'
        raise error
    return candles


def _known_etag(key: str, last_n: int, use_cache: bool) -> str:
    """The version of the file this container has an answer for: one found invalid lately, else (`use_cache`) one
    whose tail of at least `last_n` rows it remembers; "" for none."""
    with _lock:
        refused, remembered = _refused.get(key), _memory.get(key)
    if refused is not None and time.monotonic() < refused[2]:
        return refused[0]
    return remembered[0] if use_cache and remembered is not None and remembered[2] >= last_n else ""


def _refuse_again(key: str, etag: str) -> None:
    """Raise the remembered CandleFileInvalid when this version of the file was found invalid lately."""
    with _lock:
        refused = _refused.get(key)
    if refused is not None and refused[0] == etag and time.monotonic() < refused[2]:
        raise CandleFileInvalid(refused[1])


def _remember_refusal(key: str, etag: str, error: CandleFileInvalid) -> None:
    with _lock:
        _refused[key] = (etag, error.message, time.monotonic() + error.retry_after)
        _refused.move_to_end(key)
        while len(_refused) > MEMORY_CACHE_ENTRIES:
            _refused.popitem(last=False)


def _remember(key: str, etag: str, candles: "Candles", requested: int) -> None:
    with _lock:
        _memory[key] = (etag, candles, requested)
        _memory.move_to_end(key)
        while len(_memory) > MEMORY_CACHE_ENTRIES:
            _memory.popitem(last=False)


def _recalled(key: str, etag: str, last_n: int) -> "Candles | None":
    with _lock:
        entry = _memory.get(key)
    if entry is None or entry[0] != etag or entry[2] < last_n:
        return None
    return entry[1].tail(last_n)


def cached_candles(lookup: cache.Lookup, last_n: int) -> "Candles | None":
    """The last `last_n` candles of a Redis fresh-candles lookup (`cache.lookup_candles`), if it holds an answer
    that long."""
    from candlecast.candles import Candles

    unpacked = Candles.unpack(lookup.value) if lookup.value is not None else None
    if unpacked is None or max(unpacked[1], len(unpacked[0])) < last_n:
        return None
    return unpacked[0].tail(last_n)


def cache_candles(ticker: str, timeframe: str, candles: "Candles", requested: int, lookup: cache.Lookup) -> None:
    """Fill the fresh-candles cache (1 h) with candles read after `lookup`, under its generation: a rewrite of the
    file between the two (which replaces the generation) is not undone by this fill. `requested` is how many rows
    were asked for: a shorter history is the whole answer for any request up to that many."""
    cache.fill_candles(ticker, timeframe, candles.pack(requested), lookup)


def read_candles(ticker: str, timeframe: str, last_n: int, *, use_cache: bool = True,
                 lookup: cache.Lookup | None = None) -> "Candles | None":
    """The last `last_n` candles of a symbol from the bucket, or None when it has no file.

    Order: Redis fresh-candles cache (1 h) -> in-memory cache keyed by (key, ETag) -> the file, in one GET (one
    version whole: ranged reads of a file rewritten between them read the new object at the old one's offsets,
    which looked like a damaged file), of which only the tail row groups are decoded. A fetch from S3 fills both
    caches. `lookup` is the Redis lookup when the caller has made it already (with other keys, in one round trip).
    """
    import pyarrow as pa

    if last_n < 1:
        raise ValueError("last_n must be at least 1")
    if use_cache:
        lookup = lookup or cache.lookup_candles(ticker, timeframe)
        cached = cached_candles(lookup, last_n)
        if cached is not None:
            return cached
    key = candles_key(ticker, timeframe)
    stored = get_object(key, _known_etag(key, last_n, use_cache))
    if stored is not None and stored.data is None:  # the version this container has an answer for
        _refuse_again(key, stored.etag)
        candles = _recalled(key, stored.etag, last_n)
        if candles is None:  # forgotten since (another thread's read pushed it out)
            stored = get_object(key)
    if stored is None:
        return None
    if stored.data is not None:
        data, etag = stored
        _refuse_again(key, etag)
        started = time.perf_counter()
        try:
            candles = _checked(lambda: _read_tail(pa.BufferReader(data), last_n), key, ticker, timeframe, etag)
        except CandleFileInvalid as error:
            _remember_refusal(key, etag, error)
            raise
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        logger.debug("read candle tail", extra={"key": key, "rows": len(candles), "ms": elapsed_ms})
        if use_cache:
            _remember(key, etag, candles, last_n)
    if lookup is not None and len(candles):
        cache_candles(ticker, timeframe, candles, last_n, lookup)
    return candles


def stored_timeframes(ticker: str) -> list[str]:
    """The timeframes the bucket holds a candle file of `ticker` for, in TIMEFRAMES order."""
    from candlecast.timeframes import TIMEFRAMES

    keys = set(list_keys(candles_key(ticker, "").rsplit("/", 1)[0] + "/"))
    return [timeframe for timeframe in TIMEFRAMES if candles_key(ticker, timeframe) in keys]


class CandleFile(NamedTuple):
    candles: "Candles | None"  # None: no file
    etag: str  # the version they are ("" for no file), for a write over it alone (write_candles' `over`)


def read_candle_file(ticker: str, timeframe: str, *, log_invalid: bool = True) -> CandleFile:
    """Every candle in the symbol's file and the version they are, from one GET, bypassing the caches; sorted and
    deduplicated (`normalize_candles`). An invalid file is CandleFileInvalid (`_checked`, its `etag` the version
    refused; logged unless `log_invalid` is False)."""
    key = candles_key(ticker, timeframe)
    stored = get_object(key)
    if stored is None:
        return CandleFile(None, "")
    data, etag = stored
    return CandleFile(_checked(lambda: normalize_candles(parquet_to_candles(data)), key, ticker, timeframe, etag,
                               log=log_invalid), etag)


def read_all_candles(ticker: str, timeframe: str, *, log_invalid: bool = True) -> "Candles | None":
    """Every candle in the symbol's file (scoring reads outcomes): `read_candle_file`'s candles."""
    return read_candle_file(ticker, timeframe, log_invalid=log_invalid).candles


def bucket_url() -> str:
    settings = get_settings()
    if settings.s3_endpoint_url:
        return f"{settings.s3_endpoint_url.rstrip('/')}/{settings.data_bucket}"
    # China's regions have a domain of their own; every other region (GovCloud's too) is under amazonaws.com.
    domain = "amazonaws.com.cn" if settings.aws_region.startswith("cn-") else "amazonaws.com"
    return f"https://{settings.data_bucket}.s3.{settings.aws_region}.{domain}/"


def prepare_bucket_check() -> None:
    """Build the check's TLS context now, when the bucket is reached over HTTPS (as deployed). Called during a
    function's init, which Lambda runs on a full vCPU; an invoke gets the memory's share (0.14 vCPU at 256 MB)."""
    if urlsplit(bucket_url()).scheme == "https":
        tls.default_context()


def check_bucket(timeout: float = 1.0) -> bool:
    """The bucket answers: an unsigned HEAD, so health needs neither boto3 (~250 ms of cold start) nor pyarrow.

    200 or 403 (private, as it should be) mean S3 is reachable and the bucket exists; 404 means it does not.
    Permissions are fixed by the template's policies, which the template tests check. Redirects are not
    followed: a 301 or 307 (another region) is an answer.
    """
    url = urlsplit(bucket_url())
    if url.scheme == "https":
        connection = http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=tls.default_context())
    else:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        connection.request("HEAD", url.path or "/")
        status = connection.getresponse().status
    finally:
        connection.close()
    if status in (200, 301, 307, 403):
        return True
    raise RuntimeError(f"bucket {get_settings().data_bucket} answered HTTP {status}")
