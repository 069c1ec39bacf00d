"""Configuration from the environment, validated once per container by pydantic-settings."""

import json
import os
import re
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from candlecast.errors import SecretsUnavailable

# The committed models are signed with this; the local stack sets it explicitly as MODEL_SIGNING_KEY.
LOCAL_MODEL_SIGNING_KEY = "candlecast-local-development-key"


class ConfigurationError(RuntimeError):
    """Start-up stops with this; the message names each bad variable."""


class PublicSigningKeyError(ConfigurationError):
    """The development signing key, which anyone can read, outside a local stage."""


class SigningKeySecretInvalid(ConfigurationError):
    """A signing key secret that is neither a key nor {"current": …, "previous": …} (a misspelt field, broken JSON)."""


class StageSettings(BaseSettings):
    """Which deployment this is (template.yaml's Stage); everything else is the subclasses'."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True,
                                      env_parse_none_str="none")

    stage: str = "local"


class DatabaseSettings(StageSettings):
    """What reaching the database needs, and nothing else (migrations run with only this)."""

    database_url: SecretStr | None = Field(None, description="PostgreSQL URL (local runs and tests)")
    db_secret_arn: str | None = Field(None, description="Secrets Manager secret with the DB credentials")
    db_prepare_threshold: int | None = Field(5, description="psycopg prepare_threshold; empty/None for RDS Proxy")
    db_pool_max_size: int = Field(1, ge=1, le=64)
    db_pool_timeout: float = Field(1.0, gt=0, le=10, description="seconds to wait for a pooled connection")
    db_statement_timeout: float = Field(1.0, gt=0, le=120, description="seconds one statement of a request may "
                                        "take (statement_timeout; lock_timeout is half); batch functions set more")
    db_idle_in_transaction_timeout: float = Field(
        5.0, gt=0, le=600, description="seconds a session may sit in an open transaction between statements "
        "(idle_in_transaction_session_timeout): a frozen or killed function cannot hold locks longer")
    # Lambda sets AWS_REGION; a shell often only AWS_DEFAULT_REGION, which the AWS CLI reads.
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("aws_region", "aws_default_region"))

    @model_validator(mode="wrap")
    @classmethod
    def _database_is_named(cls, data, handler):
        """Name the missing database alongside any other problem, not only when all else is valid."""
        try:
            settings = handler(data)
        except ValidationError as error:
            if isinstance(data, dict) and not (data.get("database_url") or data.get("db_secret_arn")):
                raise ValidationError.from_exception_data(
                    error.title, [*error.errors(), _missing_database_error()]
                ) from None
            raise
        if settings.database_url is None and settings.db_secret_arn is None:
            raise ValidationError.from_exception_data(cls.__name__, [_missing_database_error()])
        return settings


class SigningKeySettings(StageSettings):
    """What signing or verifying a model file needs, and nothing else (train and backtest run offline)."""

    model_signing_key: SecretStr | None = Field(None, description="HMAC key that model files are signed with")
    model_signing_key_secret_arn: str | None = Field(None, description="Secrets Manager secret with the key "
                                                     '(or, during a rotation, {"current": NEW, "previous": OLD})')
    model_signing_key_previous: SecretStr | None = Field(
        None, description="with MODEL_SIGNING_KEY, during a rotation: files signed with this key are accepted too")


class Settings(DatabaseSettings, SigningKeySettings):
    redis_url: str = Field(..., description="Redis URL, redis://, rediss:// or unix://")
    redis_socket_timeout: float = Field(0.25, gt=0, le=5)
    redis_slow_seconds: float = Field(0.1, gt=0, le=5, description="a cache command slower than this is slow; "
                                      "a few in a row and the cache is skipped until it answers quickly again")

    data_bucket: str = Field(..., min_length=3, max_length=63)
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for local runs (moto server)")
    s3_read_attempts: int = Field(1, ge=1, le=5, description="tries of an S3 read: 1 where a request waits (a stalled "
                                  "S3 answers 503 at once), more in batch functions (a 500 or SlowDown is retried)")

    polygon_api_key: SecretStr | None = None
    polygon_api_key_secret_arn: str | None = None
    polygon_base_url: str = "https://api.polygon.io"
    polygon_max_rps: float = Field(50.0, gt=0, le=100, description="free tier: 0.083 (5/min); paid: under 100")
    refresh_chain: bool = Field(True, description="refresh and score hand what is left to a new invocation")
    score_function_name: str | None = Field(None, description="the refresh starts it after adding candles")
    prediction_retention_days: int | None = Field(365, ge=1, description="keep predictions this long; none: forever")
    retention_batch_size: int = Field(1000, ge=1, le=50_000, description="predictions deleted per transaction")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="POWERTOOLS_LOG_LEVEL")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_in_any_case(cls, value: object) -> object:
        """Powertools takes `debug` as well as `DEBUG`; so does start-up."""
        return value.strip().upper() if isinstance(value, str) else value


def _missing_database_error() -> dict:
    return {"type": "missing", "loc": ("DATABASE_URL or DB_SECRET_ARN",), "input": None}


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        variable = "_".join(str(part) for part in item["loc"]).upper().replace(" OR ", " or ") or "configuration"
        problems.append(f"{variable}: {item['msg']}")
    return "invalid configuration: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None


def get_database_settings() -> DatabaseSettings:
    """The database part alone: migrations need no Redis nor bucket."""
    try:
        return DatabaseSettings()
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None


def _secret(arn: str, *, refresh: bool = False) -> str:
    """The secret's value, which the log filter then redacts wherever it appears (register_secret).
    SecretsUnavailable (503) when it cannot be read: the log and the answer name the failure's class only,
    never Secrets Manager's text."""
    try:
        value = _fetch_secret(arn, refresh=refresh)
    except Exception as error:
        from aws_lambda_powertools import Logger

        Logger(child=True).warning("secret unavailable", extra={"error": type(error).__name__})
        raise SecretsUnavailable("a secret could not be read from Secrets Manager; try again shortly") from None
    register_secret(value)
    return value


_SECRET_FIELD = re.compile(r"password|secret|token|key", re.IGNORECASE)


def register_secret(value: str) -> None:
    """Redact a value read from Secrets Manager from every log record: the value, and for a JSON document
    its password-like fields. Its host, user and database names are not secrets, and redacting them would
    blank ordinary words such as the service's own name."""
    from candlecast import redaction

    redaction.register(value)
    try:
        document = json.loads(value)
    except ValueError:
        return
    if isinstance(document, dict):
        redaction.register(*(item for name, item in document.items()
                             if isinstance(item, str) and _SECRET_FIELD.search(str(name))))


# Secrets Manager is asked once per container (values are kept 5 minutes): a stalled endpoint must fail a
# request in seconds, not at the function's timeout (botocore's defaults wait 60 s per try, 5 tries).
SECRETS_TIMEOUTS = {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 2,
                                                                          "mode": "standard"}}


@lru_cache(maxsize=1)
def _secrets_provider():
    from aws_lambda_powertools.utilities.parameters import SecretsProvider
    from botocore.config import Config

    return SecretsProvider(boto_config=Config(**SECRETS_TIMEOUTS))


def forget_secrets() -> None:
    """A new container's view: no Secrets Manager client and no secret value kept."""
    _secrets_provider.cache_clear()


def _fetch_secret(arn: str, *, refresh: bool = False) -> str:
    """From the Parameters and Secrets Lambda Extension when it is attached (no boto3 on the cold path),
    else, or when it fails, from the Secrets Manager API through Powertools (boto3, cached 5 minutes).
    `refresh` asks the API now: the extension would answer from its own copy, kept up to its TTL."""
    if not refresh and (port := os.environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT")):
        try:
            return _secret_from_extension(arn, int(port))
        except (OSError, ValueError, KeyError) as error:  # never the secret itself: only what went wrong
            from aws_lambda_powertools import Logger

            Logger(child=True).warning("secrets extension unavailable; using the Secrets Manager API",
                                       extra={"error": type(error).__name__})
    value = _secrets_provider().get(arn, max_age=300, force_fetch=refresh)
    if not isinstance(value, str):
        raise TypeError("the secret is not a string")
    return value


def _secret_from_extension(arn: str, port: int) -> str:
    """GET localhost:{port}/secretsmanager/get, authenticated by the function's session token."""
    import http.client
    from urllib.parse import quote

    connection = http.client.HTTPConnection("localhost", port, timeout=2)
    try:
        connection.request("GET", f"/secretsmanager/get?secretId={quote(arn, safe='')}",
                           headers={"X-Aws-Parameters-Secrets-Token": os.environ.get("AWS_SESSION_TOKEN", "")})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(f"the secrets extension answered {response.status}")
    return json.loads(body)["SecretString"]


def database_conninfo(settings: DatabaseSettings, *, refresh: bool = False) -> str:
    """The connection string; from the secret (read again when `refresh`) unless DATABASE_URL is set."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    import psycopg
    from psycopg.conninfo import make_conninfo

    try:
        secret = json.loads(_secret(settings.db_secret_arn, refresh=refresh))
        return make_conninfo(
            host=secret["host"],
            port=secret.get("port", 5432),
            dbname=secret.get("dbname", "candlecast"),
            user=secret["username"],
            password=secret["password"],
            sslmode=secret.get("sslmode", "require"),
        )
    except (ValueError, TypeError, KeyError, psycopg.ProgrammingError) as error:
        # The error's class only: a JSON error's text quotes the secret.
        raise SecretsUnavailable(f"the database secret is not usable ({type(error).__name__}): it needs host, "
                                 "username and password", code="secret_invalid", retry_after=30) from None


def offline_model_signing_key() -> bytes:
    """The key of a command that signs or verifies model files without the stack (train, backtest, rescore): it
    reads MODEL_SIGNING_KEY (or MODEL_SIGNING_KEY_SECRET_ARN) and STAGE only, under the same rules as the stack."""
    try:
        settings = SigningKeySettings()
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None
    if settings.model_signing_key is None and not settings.model_signing_key_secret_arn:
        raise ConfigurationError(
            "MODEL_SIGNING_KEY or MODEL_SIGNING_KEY_SECRET_ARN must be set (the committed models are signed with the "
            f"public development key: MODEL_SIGNING_KEY={LOCAL_MODEL_SIGNING_KEY} with STAGE=local)"
        )
    return model_signing_key(settings)


def model_signing_key(settings: SigningKeySettings) -> bytes:
    """The key model files are signed with (the current one, during a rotation)."""
    return model_signing_keys(settings)[0]


def signing_keys_from_secret(settings: SigningKeySettings) -> bool:
    """Whether `model_signing_keys` reads a secret (which may have changed since), not the environment."""
    return settings.model_signing_key is None and bool(settings.model_signing_key_secret_arn)


def model_signing_keys(settings: SigningKeySettings, *, refresh: bool = False) -> tuple[bytes, bytes | None]:
    """(current, previous): files are signed with the current key; during a rotation (README, "Rotating the model
    signing key") a file signed with the previous one is accepted too, until it is re-signed. previous is None
    otherwise. From MODEL_SIGNING_KEY and MODEL_SIGNING_KEY_PREVIOUS, or the secret: a plain key, or
    {"current": NEW, "previous": OLD}; `refresh` reads the secret again now, bypassing the kept value."""
    if settings.model_signing_key is not None:
        key = settings.model_signing_key.get_secret_value()
        previous = (settings.model_signing_key_previous.get_secret_value()
                    if settings.model_signing_key_previous is not None else None)
    elif settings.model_signing_key_secret_arn:
        key, previous = _rotating_keys(_secret(settings.model_signing_key_secret_arn, refresh=refresh))
    else:
        # No silent fallback: a forgotten key must not turn into the public development key.
        raise ConfigurationError("MODEL_SIGNING_KEY or MODEL_SIGNING_KEY_SECRET_ARN must be set")
    # The development key is in this repository: anyone can sign a pickle with it. Only a stage that says
    # it is local (STAGE=local, explicitly) may use it, as the current key or the previous one.
    for candidate in (key, previous):
        if candidate is not None and candidate.strip() == LOCAL_MODEL_SIGNING_KEY and not _explicitly_local(settings):
            stage = f"STAGE={settings.stage}" if "stage" in settings.model_fields_set else "STAGE not set"
            raise PublicSigningKeyError(
                f"the model signing key is the public development key, which only STAGE=local set explicitly may "
                f"use ({stage}): set a secret key of this stage's own, or STAGE=local for a local run"
            )
    return key.encode(), previous.encode() if previous else None


def _rotating_keys(value: str) -> tuple[str, str | None]:
    """The signing key secret's (current, previous): a plain key, or {"current": NEW, "previous": OLD}. Each part
    is redacted from logs as the whole value is."""
    if not value.lstrip().startswith("{"):
        return value, None
    try:
        document = json.loads(value)
    except ValueError:
        document = None
    if (not isinstance(document, dict) or not isinstance(document.get("current"), str) or not document["current"]
            or not isinstance(document.get("previous"), str | None) or set(document) - {"current", "previous"}):
        # Never the value: only what shape it should have.
        raise SigningKeySecretInvalid('the model signing key secret must be a key or {"current": "...", '
                                      '"previous": "..."}')
    from candlecast import redaction

    redaction.register(document["current"], document.get("previous"))
    return document["current"], document.get("previous") or None


def _explicitly_local(settings: SigningKeySettings) -> bool:
    return settings.stage == "local" and "stage" in settings.model_fields_set


def polygon_api_key(settings: Settings) -> str | None:
    """The key without surrounding whitespace (a secret stored with `echo` or pasted ends in a newline);
    PolygonClient refuses one that still holds a control character."""
    if settings.polygon_api_key is not None:
        key = settings.polygon_api_key.get_secret_value()
    elif settings.polygon_api_key_secret_arn:
        key = _secret(settings.polygon_api_key_secret_arn)
    else:
        return None
    return key.strip() or None
