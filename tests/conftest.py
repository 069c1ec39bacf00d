"""Real backing services for the tests: embedded PostgreSQL, Redis and moto's S3 server.

TEST_DATABASE_URL / TEST_REDIS_URL point the tests at external servers instead.
"""

import copy
import json
import os
import uuid
from pathlib import Path

import pytest

from infra.lambda_loader import load_handler
from infra.local_stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
EVENTS = Path(__file__).resolve().parent / "events"
SHARED_DATA = ROOT.parent / "shared" / "data"


class LambdaContext:
    function_name = "candlecast-test"
    function_version = "$LATEST"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:candlecast-test"
    log_group_name = "/aws/lambda/candlecast-test"
    log_stream_name = "test"

    def __init__(self):
        self.aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 29_000


def reset_clients() -> None:
    """Forget per-container clients and settings, as a new Lambda container would."""
    from candlecast import cache, db
    from candlecast.config import get_settings

    get_settings.cache_clear()
    db.close_pool()
    cache.reset_client()
    try:
        from candlecast import storage
    except ImportError:
        return
    if hasattr(storage, "reset"):
        storage.reset()


@pytest.fixture(scope="session")
def stack():
    local = LocalStack.start(
        database_url=os.environ.get("TEST_DATABASE_URL"),
        redis_url=os.environ.get("TEST_REDIS_URL"),
        bucket="candlecast-test",
    )
    yield local
    reset_clients()
    local.close()


@pytest.fixture(scope="session")
def app_env(stack):
    """The stack's variables in os.environ for the whole session (functions read them at cold start)."""
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


def load_event(name: str, **changes) -> dict:
    """An API Gateway HTTP API v2 event from tests/events (the same files `sam local invoke -e` takes)."""
    event = copy.deepcopy(json.loads((EVENTS / name).read_text()))
    event.update(changes)
    return event


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
