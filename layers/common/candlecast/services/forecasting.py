"""Creating a prediction: symbol -> active model (verified) -> recent candles -> 30 expected candles -> stored.

Imports numpy (through the model); only the prediction-create function loads this module.
"""

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from aws_lambda_powertools import Logger

from candlecast import cache, db, storage
from candlecast.config import (
    ConfigurationError,
    PublicSigningKeyError,
    SigningKeySecretInvalid,
    get_settings,
    model_signing_keys,
    signing_keys_from_secret,
)
from candlecast.errors import (
    IdempotencyKeyReused,
    ModelIntegrityError,
    ModelSignatureMismatch,
    ModelUnavailable,
    NotFound,
)
from candlecast.forecast import artifact
from candlecast.repositories import models as model_repository
from candlecast.repositories import predictions as prediction_repository
from candlecast.schemas import (
    PredictionCreate,
    PredictionRequest,
    PredictionStep,
    PredictionWithSteps,
    list_adapter,
)
from candlecast.services import predictions as prediction_reads
from candlecast.timeframes import FORECAST_STEPS, closed_since, next_open_times

logger = Logger(child=True)

_STEP_ARRAYS = ("open", "high", "low", "close", "lower_80", "upper_80", "lower_95", "upper_95", "confidence")
_STEP_FIELDS = ("step", "ts", *_STEP_ARRAYS)
_steps_adapter = list_adapter(PredictionStep)
# Loaded models kept across warm invocations: timeframe -> sha256 -> ForecastModel, least recently used first. Two
# per timeframe, so Score's predictions of the old and the new version after a rollout do not reload them in
# turn; a model is about 200 KB in memory.
MODELS_KEPT_PER_TIMEFRAME = 2
_models: "dict[str, OrderedDict[str, object]]" = {}
_models_lock = threading.Lock()
# A refused model file (`_refusal_identity`: its S3 key and what its row registers) -> (the refusal, time.monotonic()
# deadline): neither read nor logged again for as long as its answer's Retry-After, as storage does with a candle
# file it found invalid.
_refused: "OrderedDict[tuple[str, ...], tuple[ModelUnavailable | ModelIntegrityError, float]]" = OrderedDict()
REFUSALS_KEPT = 64
# A signature that fails under the kept keys has the secret read again (a rotation this container has not seen
# yet), at most this often: a tampered file must not cost a Secrets Manager call per request.
REREAD_SIGNING_KEY_SECONDS = 30.0
_keys_reread_at: float | None = None  # time.monotonic() of the last re-read
_key_problem: str | None = None  # the signing key's problem last logged; None while the key is usable


@dataclass(frozen=True)
class CreateResult:
    body: bytes
    created: bool


def _bucket_model(row: dict):
    """The registered file from the bucket, loaded only after its signature (under this stage's key, or during a
    rotation its previous one) and its sha256 are checked."""
    timeframe = row["timeframe"]
    data = storage.get_bytes(row["s3_key"])
    if data is None:
        raise ModelUnavailable(f"the {timeframe} model file is missing from storage", code="model_file_missing")
    signature = storage.get_bytes(storage.signature_key(row["s3_key"]))
    # A garbled signature decodes to something that cannot match, and is refused as tampered.
    signature_hex = signature.decode("ascii", "replace") if signature else None
    keys = _signing_keys()
    try:
        artifact.verify(data, signature_hex, keys[0], row["sha256"], previous_key=keys[1])
    except ModelSignatureMismatch:
        keys = _reread_signing_keys(keys)
        if keys is None:
            raise
        artifact.verify(data, signature_hex, keys[0], row["sha256"], previous_key=keys[1])
    return artifact.load(data)


def _signing_key_code(error: ConfigurationError) -> str:
    if isinstance(error, PublicSigningKeyError):
        return "model_signing_key_refused"
    if isinstance(error, SigningKeySecretInvalid):
        return "model_signing_key_invalid"
    return "model_signing_key_missing"


def _signing_keys(*, refresh: bool = False) -> tuple[bytes, bytes | None]:
    """(current, previous) signing keys. A key this stage cannot use is a 503 whose code says why and whose
    message says nothing of the configuration; the reason is logged once per change, not per request."""
    global _key_problem
    try:
        keys = model_signing_keys(get_settings(), refresh=refresh)
    except ConfigurationError as error:
        code = _signing_key_code(error)
        if f"{code}: {error}" != _key_problem:  # the message names the problem, never the key
            _key_problem = f"{code}: {error}"
            logger.error("model signing key unusable: no model file can be verified until it is fixed",
                         extra={"code": code, "reason": str(error)})
        unusable = ModelUnavailable("the model signing key is not usable; no model can be verified", code=code)
        unusable.logged = True
        raise unusable from None
    if _key_problem is not None:
        _key_problem = None
        logger.info("model signing key usable again")
    return keys


def _reread_signing_keys(kept: tuple[bytes, bytes | None]) -> tuple[bytes, bytes | None] | None:
    """The keys read from their secret again, bypassing the kept value, when they differ from `kept`; None when
    they come from the environment, are unchanged, or were read again less than REREAD_SIGNING_KEY_SECONDS ago."""
    global _keys_reread_at
    now = time.monotonic()
    if not signing_keys_from_secret(get_settings()) or (
            _keys_reread_at is not None and now - _keys_reread_at < REREAD_SIGNING_KEY_SECONDS):
        return None
    _keys_reread_at = now
    fresh = _signing_keys(refresh=True)
    logger.info("model signing key read again after a signature mismatch", extra={"changed": fresh != kept})
    return fresh if fresh != kept else None


_SIGNING_KEY_CODES = frozenset({"model_signing_key_refused", "model_signing_key_missing", "model_signing_key_invalid"})


def _log_refused_file(row: dict, error: ModelUnavailable | ModelIntegrityError, source: str) -> None:
    """One line naming the refused file for the operator who must restore it (the timeframe's model, its S3 key
    and signature key, the sha256 its row registers, and why), marked logged so the API's handler adds none.
    The client's answer keeps its message: keys and the bucket stay out of public responses."""
    key = row["s3_key"]
    logger.error("model file refused: restore the registered file and its signature, or activate another model",
                 extra={"timeframe": row["timeframe"], "model": row["name"], "version": row["version"],
                        "s3_key": key, "signature_key": storage.signature_key(key), "sha256": row["sha256"],
                        "source": source, "code": error.code, "reason": error.message})
    error.logged = True


def require_registered(model, row: dict) -> None:
    """The loaded file must be the model its row registers: a row naming another timeframe's (or another
    version's) validly signed file would otherwise forecast 1d from the 4h model, silently. Installing a model
    (`seed.checked_models`) makes the same check before the row exists."""
    loaded = (str(model.timeframe), str(model.name), str(model.version))
    registered = (str(row["timeframe"]), str(row["name"]), str(row["version"]))
    if loaded != registered:  # logged by verified_model, with the file's key
        raise ModelIntegrityError(
            f"the {row['timeframe']} model file holds {loaded[1]} {loaded[2]} ({loaded[0]}), not the registered "
            f"{registered[1]} {registered[2]}; refusing to use it")


def _refusal_identity(row: dict) -> tuple[str, ...]:
    """What a refusal depends on: the file, and the row it must match (another timeframe's row may name it)."""
    return tuple(str(row[field]) for field in ("s3_key", "sha256", "timeframe", "name", "version"))


def _refuse_again(row: dict) -> None:
    """Raise the refusal of the row's file again, unlogged, while it is remembered (`_refused`)."""
    refused = _refused.get(_refusal_identity(row))
    if refused is not None and time.monotonic() < refused[1]:
        error = type(refused[0])(refused[0].message, code=refused[0].code)
        error.logged = True  # once, when it was refused
        raise error


def _remember_refusal(row: dict, error: ModelUnavailable | ModelIntegrityError) -> None:
    identity = _refusal_identity(row)
    _refused[identity] = (error, time.monotonic() + error.retry_after)
    _refused.move_to_end(identity)
    while len(_refused) > REFUSALS_KEPT:
        _refused.popitem(last=False)


def _kept_model(timeframe: str, sha256: str):
    """The loaded model of this file, now its timeframe's most recently used; None when it is not kept."""
    kept = _models.get(timeframe, {})
    model = kept.get(sha256)
    if model is not None:
        with contextlib.suppress(KeyError):  # another thread's load pushed it out meanwhile
            kept.move_to_end(sha256)
    return model


def verified_model(row: dict):
    """A row's model, loaded once per container (`MODELS_KEPT_PER_TIMEFRAME`); the file is verified before it is
    unpickled."""
    timeframe, sha256 = row["timeframe"], row["sha256"]
    if (model := _kept_model(timeframe, sha256)) is not None:
        return model
    with _models_lock:
        if (model := _kept_model(timeframe, sha256)) is not None:
            return model
        _refuse_again(row)
        # Shipped in the artifact when it is the registered file (no S3 client on the cold path), else the bucket.
        bundled = storage.bundled_model(timeframe, sha256)
        try:
            model = artifact.load(bundled) if bundled is not None else _bucket_model(row)
            require_registered(model, row)
        except (ModelUnavailable, ModelIntegrityError) as error:
            if error.code not in _SIGNING_KEY_CODES:  # those name the stage's key, not a file
                _log_refused_file(row, error, "shipped" if bundled is not None else "bucket")
                _remember_refusal(row, error)
            raise
        kept = _models.setdefault(timeframe, OrderedDict())
        kept[sha256] = model
        while len(kept) > MODELS_KEPT_PER_TIMEFRAME:
            kept.popitem(last=False)
        logger.info("model loaded", extra={"timeframe": timeframe, "model": row["name"], "version": row["version"]})
        return model


def prepare() -> None:
    """Import and build during init what a first create would load inside its request: the model code, the model
    file's reader and the candle reading path, the catch-up from Polygon included (not boto3: the deployed model
    file comes with the function; not urllib3, which only a configured Polygon key needs). No network call: init
    succeeds with every dependency down."""
    import joblib  # noqa: F401 - load_model's; it imports loky and multiprocessing

    import candlecast.forecast.model
    import candlecast.ingest  # noqa: F401

    storage.prepare_reads()


def forget_models() -> None:
    global _keys_reread_at, _key_problem
    with _models_lock:
        _models.clear()
        _refused.clear()
        _keys_reread_at = _key_problem = None


def _enough_history(raw, candles, ticker: str, timeframe: str, need: int) -> None:
    """404 unless the usable `candles` (of `raw`) are at least `need`, the model's `min_candles` (its σ warm-up:
    48/32/24/12/6 bars at 1h/4h/1d/1w/1m), which every origin it was evaluated on had: no_trades when `raw` has
    that many priced rows but too few with a trade (flat zero-volume outage fills, which `usable_candles` keeps
    when almost nothing else is left: a constant price forecast with confidence 0.9999), else too_little_history."""
    from candlecast.candles import flat_fills, priced

    valid = priced(raw)
    traded = int((valid & ~flat_fills(raw)).sum())
    if traded < need <= int(valid.sum()):
        raise NotFound(f"{ticker} has {traded} {timeframe} candles with trades among its last {len(raw)} (the others "
                       f"are flat zero-volume fills); a forecast needs at least {need}", code="no_trades")
    if len(candles) < need:
        raise NotFound(f"{ticker} has {len(candles)} usable {timeframe} candles; a forecast needs at least {need}",
                       code="too_little_history")


def _recent_candles(ticker: str, timeframe: str, count: int, lookup: cache.Lookup, need: int):
    """The symbol's last usable candles: from the cache lookup made already or the bucket, with those that closed
    since from Polygon; else all from Polygon (any symbol). At least `need` of them, else a 404."""
    from candlecast import ingest
    from candlecast.candles import usable_candles

    candles = storage.read_candles(ticker, timeframe, count, lookup=lookup)
    if candles is None or len(candles) == 0:
        candles = ingest.fetch_recent_candles(ticker, timeframe, count)
    else:
        candles = ingest.caught_up_candles(ticker, timeframe, candles, count, lookup=lookup)
    usable = usable_candles(candles)
    _enough_history(candles, usable, ticker, timeframe, need)
    return usable


def _request_hash(ticker: str, timeframe: str, model_id, candles) -> str:
    """A request's identity for the repeat window: symbol, timeframe, model and the content of the candles the
    forecast is made from (every column of every row, not only the last open time), so a candle file fixed in
    place is a new request, not a repeat of the forecast from the bad one. Hashing a lookback costs microseconds."""
    import numpy as np

    from candlecast.candles import COLUMNS

    digest = hashlib.sha256(f"{ticker}|{timeframe}|{model_id}|{len(candles)}".encode())
    for column in COLUMNS:
        kind = np.int64 if column == "open_time" else np.float64
        digest.update(np.ascontiguousarray(getattr(candles, column), dtype=kind).tobytes())
    return digest.hexdigest()


def _beyond_float_range(columns: dict) -> bool:
    """Whether an inconsistent forecast is prices past what a float holds, not a model's failure: no NaN anywhere,
    and a price that overflowed to infinity or underflowed to 0 (exp of σ·√h·z at σ from jumps of 10¹⁷×)."""
    import numpy as np

    values = np.concatenate(list(columns.values()))
    prices = [columns[name] for name in _STEP_ARRAYS if name != "confidence"]
    return not np.isnan(values).any() and any((np.isinf(price) | (price <= 0)).any() for price in prices)


def _steps(model, candles, ticker: str, timeframe: str) -> list[PredictionStep]:
    """The 30 expected candles after the last of `candles`, at the timeframe's calendar steps.

    Checked once as arrays (the database's CHECK constraints say the same), which names a bad model's
    output, or candles whose swings put the forecast's prices past a float's range (404 candles_out_of_range: a
    data problem, which no retry mends); then validated from plain rows by pydantic-core, which is cheaper than
    model_construct.
    """
    import numpy as np

    forecast = model.predict(candles)
    columns = {name: np.asarray(getattr(forecast, name), dtype=float) for name in _STEP_ARRAYS}
    consistent = (
        all(np.isfinite(values).all() and len(values) == FORECAST_STEPS for values in columns.values())
        and (columns["low"] > 0).all()
        and (columns["low"] <= np.minimum(columns["open"], columns["close"])).all()
        and (columns["high"] >= np.maximum(columns["open"], columns["close"])).all()
        and (columns["lower_95"] <= columns["lower_80"]).all() and (columns["lower_80"] <= columns["upper_80"]).all()
        and (columns["upper_80"] <= columns["upper_95"]).all() and (columns["lower_95"] > 0).all()
        and ((columns["confidence"] >= 0) & (columns["confidence"] <= 1)).all()
    )
    if not consistent and _beyond_float_range(columns):
        low, high = float(candles.close.min()), float(candles.close.max())
        raise NotFound(f"{ticker}'s {timeframe} candles swing too far to forecast (closes from {low:.3g} to "
                       f"{high:.3g}): the forecast's prices would lie beyond what a float holds",
                       code="candles_out_of_range")
    if not consistent:
        raise ModelUnavailable(f"the {timeframe} model produced an inconsistent forecast", code="model_output_invalid")
    step_times = next_open_times(datetime.fromtimestamp(int(candles.open_time[-1]), UTC), timeframe, FORECAST_STEPS)
    rows = zip(range(1, FORECAST_STEPS + 1), step_times, *(columns[name].tolist() for name in _STEP_ARRAYS),
               strict=True)
    return _steps_adapter.validate_python([dict(zip(_STEP_FIELDS, row, strict=True)) for row in rows])


def _prediction(symbol: dict, model_row: dict, model, candles, idempotency_key: str | None) -> PredictionCreate:
    return PredictionCreate(
        symbol_id=symbol["id"], ticker=symbol["ticker"], timeframe=model_row["timeframe"], model_id=model_row["id"],
        last_candle_at=datetime.fromtimestamp(int(candles.open_time[-1]), UTC), last_close=float(candles.close[-1]),
        idempotency_key=idempotency_key, steps=_steps(model, candles, symbol["ticker"], model_row["timeframe"]),
    )


def _as_of_key_prefix(model_id) -> str:
    return f"as-of:{model_id}:"


def has_past_predictions(model_id) -> bool:
    """Whether `create_as_of` made a prediction with this model (a seed built its track record)."""
    with db.connection() as conn:
        return prediction_repository.model_has_keyed_prediction(conn, model_id, _as_of_key_prefix(model_id))


def create_as_of(ticker: str, timeframe: str, candles) -> bool:
    """A prediction made from `candles` (a past origin: the series up to it), stored like any other; the
    operator's `candlecast seed --as-of` builds a track record with it. Returns whether it was new.

    The Idempotency-Key names the model and the origin, so a second seed stores nothing twice.
    """
    from candlecast.candles import usable_candles

    with db.connection() as conn:
        symbol, model_row, _ = model_repository.get_symbol_and_active_model(conn, ticker, timeframe)
    if symbol is None or model_row is None:
        raise NotFound(f"{ticker} or an active {timeframe} model is missing", code="symbol_not_found")
    model = verified_model(model_row)  # storage: outside the connection, as in create
    raw = candles.tail(model.lookback)
    candles = usable_candles(raw)
    _enough_history(raw, candles, ticker, timeframe, model.min_candles)
    last_open = int(candles.open_time[-1])
    key = f"{_as_of_key_prefix(model_row['id'])}{ticker}:{timeframe}:{last_open}"
    prediction = _prediction(symbol, model_row, model, candles, key)
    with db.connection() as conn:
        stored = prediction_repository.create_prediction(
            conn, prediction, _request_hash(ticker, timeframe, model_row["id"], candles))
    return bool(stored["created"])


def create(request: PredictionRequest, idempotency_key: str | None = None) -> CreateResult:
    ticker, timeframe = request.symbol, request.timeframe
    # The pooled connection is held only for database work: never across storage or Polygon, so a slow
    # dependency neither holds a pool slot nor shows up as database_unavailable.
    with db.connection() as conn:
        symbol, model_row, keyed = model_repository.get_symbol_and_active_model(conn, ticker, timeframe,
                                                                              idempotency_key)
    if keyed is not None:
        # A retry: the stored prediction, whatever candles or model came since (and without reading them).
        if (keyed["ticker"], keyed["timeframe"]) != (ticker, timeframe):
            raise IdempotencyKeyReused
        return CreateResult(prediction_reads.get(str(keyed["id"]))[0], created=False)
    if symbol is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    if model_row is None:
        raise ModelUnavailable(f"no active model for timeframe {timeframe}", code="model_unavailable")
    model = verified_model(model_row)
    # The candles' cache entry and the newest request pointer come in one round trip; the pointer counts
    # only when it names this request's hash, which the candles give.
    lookup, request_lookup = cache.lookup_candles_and_request(ticker, timeframe)
    candles = _recent_candles(ticker, timeframe, model.lookback, lookup, model.min_candles)
    request_hash = _request_hash(ticker, timeframe, model_row["id"], candles)

    if idempotency_key is None:
        repeat_id = cache.prediction_for_request(request_lookup.value, request_hash)
        if repeat_id is not None and (body := cache.get_prediction_bytes(repeat_id)) is not None:
            return CreateResult(body, created=False)

    prediction = _prediction(symbol, model_row, model, candles, idempotency_key)
    steps = prediction.steps
    with db.connection() as conn:
        stored = prediction_repository.create_prediction(conn, prediction, request_hash)
    # Only what has committed durably is cached: the cache never holds a prediction the database lacks.
    if stored["created"]:
        # What was just checked and stored is the response; it is not read back.
        body = PredictionWithSteps.model_construct(
            id=stored["id"], created_at=stored["created_at"], horizon=FORECAST_STEPS,
            model_name=model_row["name"], model_version=model_row["version"],
            **prediction.model_dump(include={"ticker", "timeframe", "model_id", "last_candle_at", "last_close"}),
            steps=steps,
        ).model_dump_json().encode()
        cache.set_created_prediction(str(stored["id"]), body,
                                     None if idempotency_key else (ticker, timeframe, request_hash), request_lookup)
        age = closed_since(prediction.last_candle_at, timeframe, stored["created_at"])
        if age:
            logger.warning("forecast from stale candles", extra={
                "ticker": ticker, "timeframe": timeframe, "last_candle_at": prediction.last_candle_at.isoformat(),
                "data_age_bars": age})
    else:
        body = prediction_reads.get(str(stored["id"]))[0]
        if idempotency_key is None:
            cache.set_prediction_for_request(ticker, timeframe, request_hash, str(stored["id"]), request_lookup)
    return CreateResult(body, created=stored["created"])
