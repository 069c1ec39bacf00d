"""Real backing services for the tests: embedded PostgreSQL, Redis and moto's S3 server.

TEST_DATABASE_URL / TEST_REDIS_URL point the tests at external servers instead.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# One OpenMP thread for LightGBM (train.fit_boosters: num_threads 0): the test fits are small, and on a loaded
# 2-core machine OpenMP's spinning threads made each fit 10-15x slower. Set before anything loads libgomp.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from infra.events import EVENTS, load_event, path_event  # noqa: F401 - the tests import them from here
from infra.lambda_loader import LambdaContext, load_handler
from infra.local_stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def reset_clients() -> None:
    """Forget per-container clients and settings, as a new Lambda container would."""
    from candlecast.config import get_settings
    from candlecast.snapstart import forget_connections_and_secrets

    get_settings.cache_clear()
    forget_connections_and_secrets()


def moto_secret(stack, value: str, name: str = "candlecast/test") -> str:
    """The ARN of a new secret holding `value`, in moto's Secrets Manager (served with its S3)."""
    import uuid

    import boto3

    secrets = boto3.client("secretsmanager", endpoint_url=stack.s3_endpoint_url, region_name="us-east-1")
    return secrets.create_secret(Name=f"{name}-{uuid.uuid4().hex[:8]}", SecretString=value)["ARN"]


def empty_bucket(bucket: str) -> None:
    """Delete every object in the bucket; storage's clients and candle memory start afresh."""
    from candlecast import storage

    storage.reset_clients()
    for key in storage.list_keys(""):
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
    storage.reset_clients()


# Nothing listens here: a Redis told to replicate from it stays a read-only replica that still answers reads.
NO_PRIMARY_PORT = 47498


@contextmanager
def redis_refusing_writes(redis_url: str, how: str) -> Iterator[None]:
    """The real Redis at `redis_url` answering reads and refusing every write: "oom" (at its memory limit with
    noeviction: OOM) or "readonly" (a replica after a failover: READONLY)."""
    import redis

    server = redis.Redis.from_url(redis_url)
    saved = server.config_get("maxmemory*")
    try:
        if how == "oom":
            server.config_set("maxmemory-policy", "noeviction")
            server.config_set("maxmemory", "1")
        elif how == "readonly":
            server.replicaof("127.0.0.1", NO_PRIMARY_PORT)
        yield
    finally:
        if how == "readonly":
            server.replicaof("NO", "ONE")
        for name, value in saved.items():
            server.config_set(name, value)


@pytest.fixture(scope="session")
def stack():
    local = LocalStack.start(
        database_url=os.environ.get("TEST_DATABASE_URL"),
        redis_url=os.environ.get("TEST_REDIS_URL"),
        bucket="candlecast-test",
    )
    try:
        yield local
    finally:
        try:
            reset_clients()
        finally:
            local.close()


@pytest.fixture(scope="session")
def app_env(stack, committed_models_key):
    """The stack's variables in os.environ for the whole session (functions read them at cold start); the stack
    serves the committed models."""
    saved = dict(os.environ)
    os.environ.update(stack.environment())
    os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "CandlecastTest")
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "candlecast")
    reset_clients()
    yield stack
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def migrated_db(app_env):
    from candlecast import migrate

    migrate.apply(app_env.database_url)
    return app_env


@pytest.fixture
def clean_db(migrated_db):
    """Empty tables and an empty cache before the test."""
    import psycopg
    import redis

    with psycopg.connect(migrated_db.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE prediction_steps, predictions, models, symbols RESTART IDENTITY CASCADE")
    redis.Redis.from_url(migrated_db.redis_url).flushdb()
    reset_clients()
    return migrated_db


@pytest.fixture
def importable(monkeypatch):
    """Variables a function needs at cold start; the session's real ones win when the stack is up."""
    from candlecast.config import get_settings
    from infra.openapi import STAND_IN_ENVIRONMENT

    for name, value in STAND_IN_ENVIRONMENT.items():
        if not os.environ.get(name):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()  # do not leave stand-in settings behind for later tests


@pytest.fixture(scope="session")
def committed_models_key():
    """What `candlecast train`, `backtest` and `rescore`, and the stack's functions, need for the committed models:
    their public development key, which only an explicitly local stage may use. Session-wide and set up before
    app_env, which sets the same variables: undone at a module's end, it unset them under every later module."""
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STAGE", "local")
        patch.setenv("MODEL_SIGNING_KEY", LOCAL_MODEL_SIGNING_KEY)
        yield


@pytest.fixture
def seeded(clean_db):
    """The committed sample and models seeded into an emptied bucket (seed keeps a candle file the bucket holds, so
    one an earlier test changed would stay), and no model loaded yet."""
    from candlecast import seed
    from candlecast.services import model_loading

    empty_bucket(clean_db.bucket)
    model_loading.forget_models()
    seed.seed(progress=False)
    return clean_db


@pytest.fixture
def seeded_track_record(clean_db):
    """The committed sample seeded as a fresh `make run` seeds it (infra.run_local.seed_sample: symbols, candles,
    models, and the track record at past origins, scored) into an emptied bucket, no model loaded before; returns
    the seed's report. About 12 s on 2 cores."""
    from candlecast.services import model_loading
    from infra.run_local import seed_sample

    empty_bucket(clean_db.bucket)
    model_loading.forget_models()
    return seed_sample(ROOT / "data", ROOT / "models", progress=False)


@pytest.fixture
def needs_embedded_postgres(stack):
    if stack.postgres is None:
        pytest.skip("stops and starts PostgreSQL: only with the embedded server")
    return stack.postgres


@pytest.fixture
def needs_embedded_redis(stack):
    if stack.redis is None:
        pytest.skip("stops and starts Redis: only with the embedded server")
    return stack.redis


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (a fresh clone has none)")
    return SHARED_DATA


def invoke(function: str, event: dict) -> tuple[int, dict, object]:
    """Call functions/<function>/app.lambda_handler with a v2 event; returns (status, headers, parsed body)."""
    handler = load_handler(ROOT / "functions" / function)
    response = handler(event, LambdaContext())
    body = response.get("body")
    parsed = json.loads(body) if body else None
    return response["statusCode"], response.get("headers", {}), parsed


@pytest.fixture
def api(clean_db):
    return invoke
