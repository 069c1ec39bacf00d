"""Configuration: validated at cold start, bad variables named, secrets read from Secrets Manager (moto)."""

import json

import boto3
import pytest
from psycopg.conninfo import conninfo_to_dict

from candlecast import config
from candlecast.config import ConfigurationError, Settings, get_settings


@pytest.fixture
def fresh_settings(monkeypatch):
    for name in ("DATABASE_URL", "DB_SECRET_ARN", "REDIS_URL", "DATA_BUCKET", "MODEL_SIGNING_KEY",
                 "MODEL_SIGNING_KEY_SECRET_ARN", "STAGE", "DB_POOL_TIMEOUT"):
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


def test_signing_key_is_required_with_no_fallback(fresh_settings):
    for stage in ("prod", "local"):
        settings = Settings(database_url="postgresql://h/d", redis_url="redis://h", data_bucket="bucket", stage=stage)
        with pytest.raises(ConfigurationError, match="MODEL_SIGNING_KEY"):
            config.model_signing_key(settings)
    keyed = Settings(database_url="postgresql://h/d", redis_url="redis://h", data_bucket="bucket",
                     model_signing_key="k1")
    assert config.model_signing_key(keyed) == b"k1"


@pytest.mark.s3
def test_database_credentials_come_from_secrets_manager(fresh_settings, stack):
    fresh_settings.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", stack.s3_endpoint_url)
    for name, value in stack.environment().items():
        if name.startswith("AWS_"):
            fresh_settings.setenv(name, value)
    secrets = boto3.client("secretsmanager", endpoint_url=stack.s3_endpoint_url, region_name="us-east-1")
    arn = secrets.create_secret(
        Name="candlecast/test-db",
        SecretString=json.dumps({"host": "db.internal", "port": 5432, "dbname": "candlecast",
                                 "username": "app", "password": "p@ss word"}),
    )["ARN"]
    settings = Settings(db_secret_arn=arn, redis_url="redis://h", data_bucket="bucket")
    params = conninfo_to_dict(config.database_conninfo(settings))
    assert params == {"host": "db.internal", "port": "5432", "dbname": "candlecast", "user": "app",
                      "password": "p@ss word", "sslmode": "require"}
