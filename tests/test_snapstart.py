"""SnapStart hooks, run locally around a "snapshot": nothing made before it is reused after a restore.

The registered hooks are called the way the runtime calls them (snapshot_restore_py's registries), with a
function that reads its database secret by ARN through the secrets extension stand-in, as deployed.
"""

import json
import random

import pytest
from psycopg.conninfo import conninfo_to_dict

from candlecast import cache, db, snapstart, storage
from candlecast.config import get_settings
from candlecast.services import forecasting
from infra.artifacts import SecretsExtension
from infra.lambda_loader import LambdaContext, load_handler
from tests.conftest import load_event, moto_secret

pytestmark = pytest.mark.integration
snapshot_restore_py = pytest.importorskip("snapshot_restore_py")


def run_hooks(registry) -> None:
    for function, args, kwargs in registry:
        function(*args, **kwargs)


@pytest.fixture
def deployed_secrets(migrated_db, monkeypatch):
    """DB_SECRET_ARN (moto) read over the extension stand-in; no DATABASE_URL."""
    params = conninfo_to_dict(migrated_db.database_url)
    arn = moto_secret(migrated_db, json.dumps({
        "host": params["host"], "port": int(params.get("port") or 5432), "dbname": params["dbname"],
        "username": params["user"], "password": params.get("password") or "", "sslmode": "disable"}),
        "candlecast/snapstart")
    extension = SecretsExtension(migrated_db.s3_endpoint_url, session_token="snapstart-token")
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_SECRET_ARN", arn)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "snapstart-token")
    monkeypatch.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(extension.port))
    db.close_pool()
    get_settings.cache_clear()
    yield extension
    extension.close()
    db.close_pool()
    get_settings.cache_clear()


def backend_pid() -> int:
    with db.connection() as conn:
        return conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]


def test_no_connection_or_secret_from_before_the_snapshot_is_reused(deployed_secrets):
    handler = load_handler("functions/health")  # registers the hooks, as each API function's import does
    assert snapstart.register()
    assert handler(load_event("health.json"), LambdaContext())["statusCode"] == 200  # init: connects, reads
    pool, redis_client, pid = db._pool, cache._client, backend_pid()
    assert pool is not None and redis_client is not None and deployed_secrets.served
    secrets_read = len(deployed_secrets.served)
    random_state = random.getstate()

    run_hooks(snapshot_restore_py.get_before_snapshot())
    assert db._pool is None and cache._client is None  # nothing open is frozen into the snapshot
    assert pool.closed

    random.setstate(random_state)  # every restored copy starts from the snapshot's state ...
    run_hooks(snapshot_restore_py.get_after_restore())
    assert random.getstate() != random_state  # ... and each is reseeded

    assert handler(load_event("health.json"), LambdaContext())["statusCode"] == 200
    assert db._pool is not pool and cache._client is not redis_client
    assert backend_pid() != pid  # a new database session
    assert len(deployed_secrets.served) == secrets_read + 1  # the secret is read again, not reused


def test_before_snapshot_warms_the_lazy_imports_where_they_exist():
    warmed = snapstart.warm_imports()
    assert "numpy" in warmed and "candlecast.forecast.model" in warmed  # the dev venv has the science stack


def test_the_s3_client_built_at_init_is_not_frozen_into_the_snapshot(seeded):
    """predictions_create builds its S3 read client at init; the snapshot does not keep it (nor the credentials it
    holds), and the first create after a restore builds its own."""
    forecasting.prepare()  # what predictions_create's init does
    assert snapstart.register()
    client = storage.read_client()

    run_hooks(snapshot_restore_py.get_before_snapshot())
    run_hooks(snapshot_restore_py.get_after_restore())

    handler = load_handler("functions/predictions_create")
    assert handler(load_event("predictions_create.json"), LambdaContext())["statusCode"] == 201
    assert storage.read_client() is not client
