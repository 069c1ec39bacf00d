"""Loading a registered model file: its signature (under the stage's signing key, during a rotation its previous
one) and sha256 checked before it is unpickled, the loaded model kept per timeframe, a refused file remembered.
"""

import contextlib
import threading
import time
from collections import OrderedDict

from aws_lambda_powertools import Logger

from candlecast import storage
from candlecast.config import (
    ConfigurationError,
    PublicSigningKeyError,
    SigningKeySecretInvalid,
    get_settings,
    model_signing_keys,
    signing_keys_from_secret,
)
from candlecast.errors import ModelIntegrityError, ModelSignatureMismatch, ModelUnavailable
from candlecast.forecast import artifact

logger = Logger(child=True)

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
    advice = ("restore the registered file and its signature, or activate another model"
              if row.get("is_active", True) else  # only Score loads inactive models
              "the predictions it made are not scored until the registered file and its signature are restored")
    logger.error(f"model file refused: {advice}",
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


def forget_models() -> None:
    global _keys_reread_at, _key_problem
    with _models_lock:
        _models.clear()
        _refused.clear()
        _keys_reread_at = _key_problem = None
