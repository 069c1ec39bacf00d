"""Loading the model files on a warm container: the signing key read again on a signature mismatch (a rotation),
a signing key that cannot be used, the models kept across versions, and a refused file remembered."""

import json

import psycopg
import pytest

from candlecast import storage
from candlecast.config import LOCAL_MODEL_SIGNING_KEY
from tests.test_predictions import create

pytestmark = [pytest.mark.integration, pytest.mark.s3]

NEW_KEY = "the-rotated-key-of-this-stage"


@pytest.fixture
def warm_container(seeded, monkeypatch):
    """One container for the whole test, as a warm Lambda: no settings, secrets or models kept from before."""
    from candlecast.services import model_loading
    from tests.conftest import reset_clients

    reset_clients()
    model_loading.forget_models()
    yield monkeypatch
    monkeypatch.undo()
    reset_clients()
    model_loading.forget_models()


def _key_from_secret(stack, monkeypatch, value: str) -> str:
    """The signing key read from a secret in moto holding `value` (not MODEL_SIGNING_KEY); returns its ARN."""
    from tests.conftest import moto_secret, reset_clients

    arn = moto_secret(stack, value, "candlecast/signing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", stack.s3_endpoint_url)
    monkeypatch.delenv("MODEL_SIGNING_KEY")
    monkeypatch.setenv("MODEL_SIGNING_KEY_SECRET_ARN", arn)
    reset_clients()
    return arn


def _put_secret(stack, arn: str, value: str) -> None:
    import boto3

    boto3.client("secretsmanager", endpoint_url=stack.s3_endpoint_url, region_name="us-east-1").put_secret_value(
        SecretId=arn, SecretString=value)


def _active_key(database_url: str, timeframe: str) -> str:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT s3_key FROM models WHERE timeframe = %s AND is_active", (timeframe,)).fetchone()[0]


def _sign_in_place(key: str, signing_key: str) -> None:
    from candlecast.forecast.artifact import sign

    storage.put_bytes(storage.signature_key(key), sign(storage.get_bytes(key), signing_key.encode()).encode())


def _secret_reads(monkeypatch) -> list[bool]:
    """Each Secrets Manager read from now on, as its `refresh`."""
    from candlecast import config

    reads: list[bool] = []
    fetch = config._fetch_secret

    def counted(arn: str, *, refresh: bool = False) -> str:
        reads.append(refresh)
        return fetch(arn, refresh=refresh)

    monkeypatch.setattr(config, "_fetch_secret", counted)
    return reads


# --- 1. a signature mismatch reads the secret again -----------------------------------------------


def test_a_file_signed_with_a_key_the_container_has_not_read_yet_is_verified_after_reading_it_again(
        warm_container, seeded, caplog):
    """Audit: a warm container keeping the plain old key (5 minutes) refused every file signed with the new one,
    503 model_integrity and an ERROR telling the operator to restore a file that was fine."""
    import logging

    arn = _key_from_secret(seeded, warm_container, LOCAL_MODEL_SIGNING_KEY)
    assert create({"symbol": "BTCUSDT", "timeframe": "1h"})[0] == 201  # the old key, now kept
    _put_secret(seeded, arn, json.dumps({"current": NEW_KEY, "previous": LOCAL_MODEL_SIGNING_KEY}))
    _sign_in_place(_active_key(seeded.database_url, "1d"), NEW_KEY)  # the runbook's re-sign, early
    with caplog.at_level(logging.INFO):
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert status == 201, body
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert create({"symbol": "BTCUSDT", "timeframe": "4h"})[0] == 201  # still signed with the old (previous) key


def test_a_tampered_file_reads_the_secret_again_at_most_once_per_interval(warm_container, seeded):
    _key_from_secret(seeded, warm_container, LOCAL_MODEL_SIGNING_KEY)
    key = _active_key(seeded.database_url, "1h")
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    reads = _secret_reads(warm_container)
    for _ in range(5):
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
        assert (status, body["error"]["code"]) == (503, "model_integrity")
    assert reads.count(True) == 1, reads


# --- 2. a signing key that cannot be used ---------------------------------------------------------

CANARY = "canary-signing-key-Qx81"


def _problems(caplog) -> list:
    """Warnings and errors logged, but for the sample's old candles."""
    import logging

    return [record for record in caplog.records if record.levelno >= logging.WARNING
            and record.getMessage() != "forecast from stale candles"]


@pytest.mark.parametrize(("secret", "stage", "code"), [
    (json.dumps({"current": CANARY, "previos": "old-" + CANARY}), "local", "model_signing_key_invalid"),
    ('{"current": "' + CANARY, "local", "model_signing_key_invalid"),
    (LOCAL_MODEL_SIGNING_KEY, "prod", "model_signing_key_refused"),
], ids=["misspelt-previous", "broken-json", "public-key-in-prod"])
def test_an_unusable_signing_key_is_a_generic_503_logged_once_with_its_reason(
        warm_container, seeded, secret, stage, code, caplog, capfd):
    """Audit: a malformed secret answered model_signing_key_missing, and the public development key under
    STAGE=prod told clients about the configuration; each request logged only a WARNING 'request failed'."""
    import logging

    from candlecast import config

    warm_container.setenv("STAGE", stage)
    arn = _key_from_secret(seeded, warm_container, secret)
    with caplog.at_level(logging.INFO):
        answers = [create({"symbol": "BTCUSDT", "timeframe": timeframe}) for timeframe in ("1h", "1h", "4h")]
    for status, headers, body in answers:
        assert (status, body["error"]["code"]) == (503, code), body
        assert headers["Retry-After"].isdigit()
        message = body["error"]["message"]
        assert not any(word in message for word in ("current", "previous", "STAGE", "development", "{"))
    [record] = _problems(caplog)  # one line for three requests, no 'request failed'
    assert record.levelno == logging.ERROR and record.getMessage().startswith("model signing key unusable")
    assert record.code == code and record.reason
    logged = capfd.readouterr()
    assert CANARY not in logged.out + logged.err + str([vars(record) for record in caplog.records])

    caplog.clear()
    _put_secret(seeded, arn, "a-key-that-verifies-nothing")  # usable again (and then refused as a file's key)
    config.forget_secrets()
    with caplog.at_level(logging.INFO):
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (503, "model_integrity")
    assert "model signing key usable again" in [record.getMessage() for record in caplog.records]

    caplog.clear()
    _put_secret(seeded, arn, secret)  # and broken again: logged again
    config.forget_secrets()
    with caplog.at_level(logging.INFO):
        assert create({"symbol": "BTCUSDT", "timeframe": "1w"})[2]["error"]["code"] == code
    assert [record.getMessage().split(":")[0] for record in _problems(caplog)] == [
        "model signing key unusable"]


# --- 3. the models of two versions stay loaded ----------------------------------------------------


def _model_rows(database_url: str, timeframe: str, versions: list[str]) -> list[dict]:
    """The active row of `timeframe`, and one more row per version in `versions`: its file, validly signed, in the
    bucket, the active model's own payload under that version."""
    import io

    import joblib
    from psycopg.rows import dict_row

    from candlecast.forecast.artifact import dump, sha256_hex, sign

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        active = conn.execute("SELECT id, timeframe, name, version, s3_key, sha256 FROM models "
                              "WHERE timeframe = %s AND is_active", (timeframe,)).fetchone()
    payload = joblib.load(io.BytesIO(storage.get_bytes(active["s3_key"])))
    rows = [active]
    for version in versions:
        data = dump(payload | {"version": version})
        key = storage.versioned_model_key(timeframe, version)
        storage.put_bytes(key, data)
        storage.put_bytes(storage.signature_key(key), sign(data, LOCAL_MODEL_SIGNING_KEY.encode()).encode())
        rows.append(active | {"version": version, "s3_key": key, "sha256": sha256_hex(data)})
    return rows


def _model_reads(monkeypatch) -> list[str]:
    """The model files read from the bucket from now on (their keys; not their signatures)."""
    reads: list[str] = []
    get_bytes = storage.get_bytes

    def counted(key: str):
        if key.endswith(".pkl"):
            reads.append(key)
        return get_bytes(key)

    monkeypatch.setattr(storage, "get_bytes", counted)
    return reads


def test_predictions_of_two_versions_in_turn_load_each_model_once(warm_container, seeded, caplog):
    """Audit: one model per timeframe, so Score's due list (two versions interleaved after a rollout) loaded the
    files in turn: 48 predictions made 27 GETs and loads, each logging 'model loaded'."""
    import logging

    from candlecast.services import model_loading

    old, new = _model_rows(seeded.database_url, "1h", ["v-next"])
    reads = _model_reads(warm_container)
    with caplog.at_level(logging.INFO):
        models = [model_loading.verified_model(row) for row in [old, new] * 6]
    assert [model.version for model in models] == [old["version"], "v-next"] * 6
    assert sorted(reads) == sorted([old["s3_key"], new["s3_key"]])
    assert [record.getMessage() for record in caplog.records].count("model loaded") == 2


def test_the_least_recently_used_version_is_the_one_let_go(warm_container, seeded):
    from candlecast.services import model_loading

    first, second, third = _model_rows(seeded.database_url, "1h", ["v-2", "v-3"])
    reads = _model_reads(warm_container)
    for row in (first, second, first, third):  # the third pushes out the second, used less lately than the first
        model_loading.verified_model(row)
    assert len(reads) == 3 and model_loading.MODELS_KEPT_PER_TIMEFRAME == 2
    model_loading.verified_model(first)
    assert len(reads) == 3
    model_loading.verified_model(second)
    assert reads[-1] == second["s3_key"] and len(reads) == 4


# --- 4. a refused model file is remembered --------------------------------------------------------


def test_a_refused_model_file_is_not_read_nor_logged_again_until_its_retry_after_has_passed(
        warm_container, seeded, caplog):
    """Audit: with a tampered active file, 20 requests on one warm container made 20 ERROR lines and ~40 GETs."""
    import logging
    import time
    import types

    from candlecast.services import model_loading

    key = _active_key(seeded.database_url, "1h")
    good = storage.get_bytes(key)
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    reads: list[str] = []
    get_bytes = storage.get_bytes
    warm_container.setattr(storage, "get_bytes", lambda name: reads.append(name) or get_bytes(name))
    with caplog.at_level(logging.INFO):
        answers = [create({"symbol": "BTCUSDT", "timeframe": "1h"}) for _ in range(20)]
    assert {(status, body["error"]["code"], headers["Retry-After"]) for status, headers, body in answers} == {
        (503, "model_integrity", "60")}
    assert sorted(reads) == sorted([key, storage.signature_key(key)])
    assert [record.getMessage().split(":")[0] for record in _problems(caplog)] == ["model file refused"]
    assert create({"symbol": "BTCUSDT", "timeframe": "4h"})[0] == 201  # another file is not refused with it

    storage.put_bytes(key, good)  # restored: refused until the Retry-After has passed, then read again
    assert create({"symbol": "BTCUSDT", "timeframe": "1h"})[0] == 503
    later = time.monotonic() + 61
    warm_container.setattr(model_loading, "time", types.SimpleNamespace(monotonic=lambda: later))
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 201, body
