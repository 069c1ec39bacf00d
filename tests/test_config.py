"""Configuration: validated at cold start, bad variables named, secrets read from Secrets Manager (moto)."""

import json

import pytest
from psycopg.conninfo import conninfo_to_dict

from candlecast import config
from candlecast.config import ConfigurationError, Settings, get_settings
from infra.local_stack import free_port
from tests.conftest import moto_secret


@pytest.fixture
def fresh_settings(monkeypatch):
    for name in ("DATABASE_URL", "DB_SECRET_ARN", "REDIS_URL", "DATA_BUCKET", "MODEL_SIGNING_KEY",
                 "MODEL_SIGNING_KEY_SECRET_ARN", "MODEL_SIGNING_KEY_PREVIOUS", "STAGE", "DB_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_missing_variables_are_named(fresh_settings):
    with pytest.raises(ConfigurationError) as raised:
        get_settings()
    message = str(raised.value)
    assert "REDIS_URL" in message
    assert "DATA_BUCKET" in message
    assert "DATABASE_URL or DB_SECRET_ARN" in message


def test_bad_value_is_named(fresh_settings):
    fresh_settings.setenv("DATABASE_URL", "postgresql://localhost/x")
    fresh_settings.setenv("REDIS_URL", "redis://localhost")
    fresh_settings.setenv("DATA_BUCKET", "bucket")
    fresh_settings.setenv("DB_POOL_TIMEOUT", "forever")
    with pytest.raises(ConfigurationError, match="DB_POOL_TIMEOUT"):
        get_settings()


@pytest.mark.parametrize("given", ["debug", "Debug", "DEBUG", " debug "])
def test_the_log_level_is_read_in_any_case_as_powertools_reads_it(fresh_settings, given):
    for name, value in (("DATABASE_URL", "postgresql://localhost/x"), ("REDIS_URL", "redis://localhost"),
                        ("DATA_BUCKET", "bucket"), ("POWERTOOLS_LOG_LEVEL", given)):
        fresh_settings.setenv(name, value)
    assert get_settings().log_level == "DEBUG"
    get_settings.cache_clear()
    fresh_settings.setenv("POWERTOOLS_LOG_LEVEL", "chatty")
    with pytest.raises(ConfigurationError, match="POWERTOOLS_LOG_LEVEL"):
        get_settings()


def test_signing_key_is_required_with_no_fallback(fresh_settings):
    for stage in ("prod", "local"):
        settings = Settings(database_url="postgresql://h/d", redis_url="redis://h", data_bucket="bucket", stage=stage)
        with pytest.raises(ConfigurationError, match="MODEL_SIGNING_KEY"):
            config.model_signing_key(settings)
    keyed = Settings(database_url="postgresql://h/d", redis_url="redis://h", data_bucket="bucket",
                     model_signing_key="k1")
    assert config.model_signing_key(keyed) == b"k1"


def test_a_previous_signing_key_comes_with_the_current_one_and_is_held_to_the_same_rule(fresh_settings):
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY, PublicSigningKeyError

    common = {"database_url": "postgresql://h/d", "redis_url": "redis://h", "data_bucket": "bucket"}
    assert config.model_signing_keys(Settings(**common, model_signing_key="k1")) == (b"k1", None)
    rotating = Settings(**common, model_signing_key="k2", model_signing_key_previous="k1")
    assert config.model_signing_keys(rotating) == (b"k2", b"k1") and config.model_signing_key(rotating) == b"k2"
    with pytest.raises(PublicSigningKeyError):  # the public key may not come back in as the previous one
        config.model_signing_keys(Settings(**common, stage="prod", model_signing_key="k2",
                                           model_signing_key_previous=LOCAL_MODEL_SIGNING_KEY))


@pytest.mark.parametrize(("value", "keys"), [
    ("plain-key", ("plain-key", None)),
    ('{"current": "new-key", "previous": "old-key"}', ("new-key", "old-key")),
    ('{"current": "new-key"}', ("new-key", None)),
    ('{"current": "new-key", "previous": null}', ("new-key", None)),
    ('{"previous": "old-key"}', None), ('{"current": 1}', None), ('{"current": "k", "other": "x"}', None),
    ('{"current": "new-key"', None),
])
def test_the_signing_key_secret_is_a_key_or_current_and_previous(value, keys, caplog):
    if keys is None:
        with pytest.raises(ConfigurationError) as raised:
            config._rotating_keys(value)
        assert value not in str(raised.value)
    else:
        assert config._rotating_keys(value) == keys


@pytest.mark.s3
def test_database_credentials_come_from_secrets_manager(fresh_settings, stack):
    arn = _secret_in_moto(stack, fresh_settings, "candlecast/test-db",
                          json.dumps({"host": "db.internal", "port": 5432, "dbname": "candlecast",
                                      "username": "app", "password": "p@ss word"}))
    settings = Settings(db_secret_arn=arn, redis_url="redis://h", data_bucket="bucket")
    params = conninfo_to_dict(config.database_conninfo(settings))
    assert params == {"host": "db.internal", "port": "5432", "dbname": "candlecast", "user": "app",
                      "password": "p@ss word", "sslmode": "require"}


def _secret_in_moto(stack, monkeypatch, name: str, value: str) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", stack.s3_endpoint_url)
    for key, setting in stack.environment().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, setting)
    return moto_secret(stack, value, name)


def test_secrets_come_from_the_extension_endpoint_with_the_session_token(fresh_settings, stack):
    from infra.artifacts import SecretsExtension

    arn = _secret_in_moto(stack, fresh_settings, "candlecast/test-key", "from-the-extension")
    extension = SecretsExtension(stack.s3_endpoint_url, session_token="the-session-token")
    try:
        fresh_settings.setenv("AWS_SESSION_TOKEN", "the-session-token")
        fresh_settings.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(extension.port))
        settings = Settings(model_signing_key_secret_arn=arn, database_url="postgresql://x", redis_url="redis://h",
                            data_bucket="bucket")
        assert config.model_signing_key(settings) == b"from-the-extension"
        assert extension.served == [arn]
    finally:
        extension.close()


def test_a_refresh_asks_secrets_manager_not_the_extensions_copy(fresh_settings, stack):
    """The extension keeps its own copy up to its TTL: a re-read after a rotation (a model signature that fails,
    a refused database password) answered from it found the old value again."""
    from infra.artifacts import SecretsExtension

    config.forget_secrets()
    arn = _secret_in_moto(stack, fresh_settings, "candlecast/test-refresh", "the-value")
    extension = SecretsExtension(stack.s3_endpoint_url, session_token="the-session-token")
    try:
        fresh_settings.setenv("AWS_SESSION_TOKEN", "the-session-token")
        fresh_settings.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(extension.port))
        assert config._secret(arn) == "the-value" and extension.served == [arn]
        assert config._secret(arn, refresh=True) == "the-value"
        assert extension.served == [arn]  # the refresh went to the API
    finally:
        extension.close()
        config.forget_secrets()


def test_an_unreachable_extension_falls_back_to_the_secrets_manager_api(fresh_settings, stack, caplog):
    arn = _secret_in_moto(stack, fresh_settings, "candlecast/test-fallback", "from-the-api")
    fresh_settings.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(free_port()))  # nothing listens there
    settings = Settings(model_signing_key_secret_arn=arn, database_url="postgresql://x", redis_url="redis://h",
                        data_bucket="bucket")
    assert config.model_signing_key(settings) == b"from-the-api"
    warning = next(r for r in caplog.records if r.getMessage().startswith("secrets extension unavailable"))
    assert "from-the-api" not in str(warning.__dict__)  # the secret is never logged


@pytest.mark.s3
def test_both_keys_of_a_rotating_signing_key_secret_are_redacted(fresh_settings, stack):
    from candlecast import redaction

    arn = _secret_in_moto(stack, fresh_settings, "candlecast/test-rotation",
                          json.dumps({"current": "cur-secret-CCCC", "previous": "prev-secret-DDDD"}))
    settings = Settings(model_signing_key_secret_arn=arn, database_url="postgresql://x", redis_url="redis://h",
                        data_bucket="bucket")
    assert config.model_signing_keys(settings) == (b"cur-secret-CCCC", b"prev-secret-DDDD")
    assert redaction.redact("cur-secret-CCCC prev-secret-DDDD") == "[redacted] [redacted]"


def test_the_readme_states_the_pool_defaults_the_code_has():
    import re

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    timeout = Settings.model_fields["db_pool_timeout"].default
    size = Settings.model_fields["db_pool_max_size"].default
    stated = re.search(r"pool checkout timeout of ([\d.]+) s", readme)
    assert stated and float(stated.group(1)) == timeout
    row = "| `DB_POOL_MAX_SIZE`, `DB_POOL_TIMEOUT` | pool size per container, checkout timeout (s) |"
    assert f"{row} {size}, {timeout} |" in readme


def test_a_file_signed_with_the_previous_key_verifies_only_while_it_is_given_and_the_current_costs_one_hmac(
        monkeypatch):
    from candlecast.errors import ModelIntegrityError
    from candlecast.forecast import artifact

    data = b"model bytes"
    old, new = artifact.sign(data, b"old"), artifact.sign(data, b"new")
    artifact.verify(data, old, b"new", previous_key=b"old")
    with pytest.raises(ModelIntegrityError):
        artifact.verify(data, old, b"new")
    with pytest.raises(ModelIntegrityError):
        artifact.verify(data, artifact.sign(data, b"other"), b"new", previous_key=b"old")
    signed = []
    real_sign = artifact.sign
    monkeypatch.setattr(artifact, "sign", lambda payload, key: signed.append(key) or real_sign(payload, key))
    artifact.verify(data, new, b"new", previous_key=b"old")
    assert signed == [b"new"]  # the hot path: one HMAC while both keys are configured


@pytest.mark.parametrize(("variables", "region"), [
    ({"AWS_DEFAULT_REGION": "cn-north-1"}, "cn-north-1"),  # what the AWS CLI reads: the CLI used us-east-1
    ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "cn-north-1"}, "eu-west-1"),  # Lambda's, first
    ({}, "us-east-1"),
])
def test_the_region_is_the_one_the_environment_names(fresh_settings, variables, region):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        fresh_settings.delenv(name, raising=False)
    for name, value in {"DATABASE_URL": "postgresql://localhost/x", **variables}.items():
        fresh_settings.setenv(name, value)
    assert config.get_database_settings().aws_region == region


@pytest.mark.parametrize(("region", "url"), [
    ("cn-north-1", "https://bucket-1.s3.cn-north-1.amazonaws.com.cn/"),  # was .amazonaws.com: health said "down"
    ("us-gov-west-1", "https://bucket-1.s3.us-gov-west-1.amazonaws.com/"),
    ("eu-west-1", "https://bucket-1.s3.eu-west-1.amazonaws.com/"),
])
def test_health_reaches_the_bucket_at_its_partitions_domain(fresh_settings, region, url):
    from candlecast import storage

    for name, value in {"DATABASE_URL": "postgresql://localhost/x", "REDIS_URL": "redis://localhost",
                        "DATA_BUCKET": "bucket-1", "AWS_REGION": region}.items():
        fresh_settings.setenv(name, value)
    fresh_settings.delenv("S3_ENDPOINT_URL", raising=False)
    assert storage.bucket_url() == url
