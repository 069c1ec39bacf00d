"""functions/migrate: the Custom::DbMigration resource and direct invokes, on a real PostgreSQL.

CloudFormation's pre-signed response URL is a local HTTP server that records each PUT.
"""

import json
import shutil
import socket
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from infra.artifacts import ResponseCapture
from infra.lambda_loader import load_function_module
from infra.local_stack import free_port
from infra.template_checks import migrations_hash
from tests.conftest import LambdaContext, load_event

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MIGRATION_IDS = sorted(
    path.name.removesuffix(".sql") for path in (ROOT / "migrations").glob("*.sql") if ".rollback." not in path.name
)


class SilentServer:
    """Accepts TCP connections and never answers: a database that hangs."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]

    def close(self):
        self.socket.close()


def context(remaining_ms: int = 300_000) -> LambdaContext:
    return LambdaContext(timeout_seconds=remaining_ms / 1000)


@pytest.fixture
def recorder():
    server = ResponseCapture()
    yield server
    server.close()


@pytest.fixture
def migrate_app():
    return load_function_module(ROOT / "functions/migrate")


@pytest.fixture
def use_database(app_env, monkeypatch):
    """Point the function at a database URL for one test (fresh settings, as in a new container)."""
    from candlecast.config import get_settings

    def use(url: str) -> None:
        monkeypatch.setenv("DATABASE_URL", url)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


@pytest.fixture
def fresh_database(stack, use_database):
    """An empty database of its own, so Create has every migration to apply."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(stack.database_url, dbname=name)
    use_database(url)
    yield url
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cfn_event(request_type: str, response_url: str, properties_hash: str | None = None, **changes) -> dict:
    """The event from tests/events, with the MigrationsHash of the given folder's migrations (default: the
    repository's, which template.yaml carries)."""
    event = load_event("migrate_create.json", RequestType=request_type, ResponseURL=response_url)
    event["ResourceProperties"] = {**event["ResourceProperties"],
                                   "MigrationsHash": properties_hash or repository_hash()}
    event.update(changes)
    return event


def repository_hash() -> str:
    return migrations_hash(ROOT / "migrations")


def unreachable_database_url() -> str:
    return f"postgresql://nobody:secret@127.0.0.1:{free_port()}/candlecast?connect_timeout=2"


def test_create_applies_every_migration_and_answers_success(migrate_app, recorder, fresh_database):
    result = migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())

    assert result["Status"] == "SUCCESS"
    (request,) = recorder.requests
    assert request["path"].startswith("/stack-response?X-Amz-Signature=")
    assert request["headers"].get("Content-Type") == ""  # the pre-signed URL was signed without one
    response = json.loads(request["body"])
    event = load_event("migrate_create.json")
    assert response["Status"] == "SUCCESS"
    for key in ("StackId", "RequestId", "LogicalResourceId"):
        assert response[key] == event[key]
    assert response["PhysicalResourceId"] == "DbMigration-schema"
    assert response["Data"]["AppliedCount"] == str(len(MIGRATION_IDS))
    assert response["Data"]["Applied"].split(",") == MIGRATION_IDS
    assert len(request["body"]) < 4096
    with psycopg.connect(fresh_database) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"symbols", "models", "predictions", "prediction_steps"} <= tables


def test_update_applies_nothing_new_and_keeps_the_physical_id(migrate_app, recorder, fresh_database):
    migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())
    update = cfn_event("Update", recorder.url, PhysicalResourceId="DbMigration-schema",
                       OldResourceProperties={"MigrationsHash": "0" * 64})

    result = migrate_app.lambda_handler(update, context())

    assert result["Status"] == "SUCCESS"
    response = recorder.captured[-1]
    assert response["PhysicalResourceId"] == "DbMigration-schema"
    assert response["Data"]["AppliedCount"] == "0"


def test_a_failing_apply_answers_failed_with_the_reason(migrate_app, recorder, use_database):
    use_database(unreachable_database_url())

    result = migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())

    assert result["Status"] == "FAILED"
    (response,) = recorder.captured
    assert response["Status"] == "FAILED"
    assert "OperationalError" in response["Reason"] or "connection" in response["Reason"].lower()
    assert "secret" not in response["Reason"]  # the password never reaches the stack events


def test_yoyo_bookkeeping_left_incomplete_answers_failed_naming_it(migrate_app, recorder, fresh_database):
    """A database restored without _yoyo_migration (its _yoyo_log kept): FAILED carried psycopg's DuplicateTable
    for _yoyo_log, raised inside yoyo's set-up; it now names the missing table and the way out."""
    assert migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())["Status"] == "SUCCESS"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("DROP TABLE _yoyo_migration")

    result = migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())

    answer = recorder.captured[-1]
    assert answer["Status"] == result["Status"] == "FAILED"
    assert answer["Reason"].startswith("MigrationError: yoyo's bookkeeping is incomplete: _yoyo_migration missing "
                                       "while _yoyo_log, _yoyo_version are there")
    assert "--mark-applied" in answer["Reason"] and len(recorder.requests[-1]["body"]) < 4096


def test_a_hanging_database_answers_failed_before_the_function_times_out(migrate_app, recorder, use_database):
    silent = SilentServer()
    try:
        use_database(f"postgresql://nobody:secret@127.0.0.1:{silent.port}/candlecast?connect_timeout=4")
        remaining_ms = int((migrate_app.RESPONSE_MARGIN_SECONDS + 1.5) * 1000)
        started = time.monotonic()

        result = migrate_app.lambda_handler(cfn_event("Create", recorder.url), context(remaining_ms))

        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert result["Status"] == "FAILED"
    assert "still running" in recorder.captured[0]["Reason"]
    assert elapsed < remaining_ms / 1000  # answered while the function still had time


def test_delete_is_a_no_op_that_answers_success(migrate_app, recorder, use_database):
    use_database(unreachable_database_url())  # Delete must not even try the database
    delete = cfn_event("Delete", recorder.url, PhysicalResourceId="DbMigration-schema")

    result = migrate_app.lambda_handler(delete, context())

    assert result["Status"] == "SUCCESS"
    (response,) = recorder.captured
    assert response["Status"] == "SUCCESS" and response["PhysicalResourceId"] == "DbMigration-schema"


def test_the_response_put_is_retried(migrate_app, use_database, monkeypatch):
    monkeypatch.setattr(migrate_app.time, "sleep", lambda seconds: None)
    use_database(unreachable_database_url())
    flaky = ResponseCapture(failures=1)
    try:
        migrate_app.lambda_handler(cfn_event("Delete", flaky.url, PhysicalResourceId="x"), context())
    finally:
        flaky.close()
    assert [response["Status"] for response in flaky.captured] == ["SUCCESS", "SUCCESS"]


def test_an_undeliverable_response_raises_so_lambda_retries_the_event(migrate_app, use_database, monkeypatch):
    monkeypatch.setattr(migrate_app.time, "sleep", lambda seconds: None)
    use_database(unreachable_database_url())
    url = f"http://127.0.0.1:{free_port()}/stack-response"
    with pytest.raises(ConnectionError):
        migrate_app.lambda_handler(cfn_event("Delete", url, PhysicalResourceId="x"), context())


def test_direct_invoke_status_then_apply(migrate_app, fresh_database):
    status = migrate_app.lambda_handler(load_event("migrate_status.json"), context())
    assert status == {"applied": [], "pending": MIGRATION_IDS, "unknown": []}

    applied = migrate_app.lambda_handler(load_event("migrate_apply.json"), context())
    assert applied == {"applied": MIGRATION_IDS}

    assert migrate_app.lambda_handler(load_event("migrate_status.json"), context()) == {
        "applied": MIGRATION_IDS,
        "pending": [],
        "unknown": [],
    }
    assert migrate_app.lambda_handler(load_event("migrate_apply.json"), context()) == {"applied": []}


def test_direct_invoke_with_an_unknown_action_raises(migrate_app, app_env):
    with pytest.raises(ValueError, match="unknown action"):
        migrate_app.lambda_handler({"action": "drop"}, context())


def test_direct_invoke_failure_raises_for_the_caller(migrate_app, use_database):
    use_database(unreachable_database_url())
    with pytest.raises(psycopg.OperationalError):
        migrate_app.lambda_handler(load_event("migrate_apply.json"), context())


def test_a_yoyo_lock_row_left_by_a_killed_run_does_not_hold_up_an_update(migrate_app, recorder, fresh_database):
    from candlecast import migrate

    migrate.apply(fresh_database)
    with psycopg.connect(fresh_database, autocommit=True) as conn:  # a run of an older release killed 10 s ago
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) "
                     "VALUES (1, (now() AT TIME ZONE 'UTC') - interval '10 seconds', 4242)")
    started = time.monotonic()
    migrate_app.lambda_handler(cfn_event("Update", recorder.url), context(remaining_ms=300_000))
    assert recorder.captured[-1]["Status"] == "SUCCESS"
    assert time.monotonic() - started < 5


def migrations_with(tmp_path, name: str, text: str) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", folder)
    (folder / name).write_text(text)
    return folder


def test_a_rollback_update_with_the_previous_hash_applies_nothing_and_answers_success(
        migrate_app, recorder, fresh_database, monkeypatch, tmp_path, caplog):
    """Release N+1 brings a migration that fails on production data: FAILED, and CloudFormation rolls back by
    sending the same function (N+1's code and migrations) an Update with release N's properties."""
    from candlecast import migrate

    migrate.apply(fresh_database)  # release N
    failing = migrations_with(tmp_path, "0008_fails.sql", "-- depends: 0007_model_kinds\nSELECT 1 / 0;\n")
    monkeypatch.setenv("MIGRATIONS_DIR", str(failing))
    release_n, release_n1 = repository_hash(), migrations_hash(failing)
    deploy = cfn_event("Update", recorder.url, release_n1, PhysicalResourceId="DbMigration-schema",
                       OldResourceProperties={"MigrationsHash": release_n})
    assert migrate_app.lambda_handler(deploy, context())["Status"] == "FAILED"
    assert "0008_fails" in recorder.captured[-1]["Reason"]

    rollback = cfn_event("Update", recorder.url, release_n, PhysicalResourceId="DbMigration-schema",
                         OldResourceProperties={"MigrationsHash": release_n1})
    result = migrate_app.lambda_handler(rollback, context())

    answer = recorder.captured[-1]
    assert result["Status"] == answer["Status"] == "SUCCESS", answer["Reason"]
    assert "a stack rollback" in answer["Reason"] and "applied nothing" in answer["Reason"]
    assert answer["Data"]["AppliedCount"] == "0" and answer["PhysicalResourceId"] == "DbMigration-schema"
    assert any(record.getMessage().startswith("applying no migrations") for record in caplog.records)
    assert migrate.status(fresh_database, failing).pending == ["0008_fails"]


def test_an_update_with_this_functions_hash_applies_what_is_pending(migrate_app, recorder, fresh_database):
    from candlecast import migrate

    migrate.apply(fresh_database)
    migrate.rollback(fresh_database, count=1)
    update = cfn_event("Update", recorder.url, PhysicalResourceId="DbMigration-schema",
                       OldResourceProperties={"MigrationsHash": "0" * 64})
    assert migrate_app.lambda_handler(update, context())["Status"] == "SUCCESS"
    assert recorder.captured[-1]["Data"]["Applied"] == MIGRATION_IDS[-1]


def test_an_update_whose_hashes_are_neither_this_functions_applies_its_migrations_and_says_so(
        migrate_app, recorder, fresh_database):
    """Audit: a build whose migrations/ held a stray file (a hash neither old nor new) answered SUCCESS having
    applied nothing, and the new code went live on the old schema."""
    from candlecast import migrate

    migrate.apply(fresh_database)
    migrate.rollback(fresh_database, count=1)
    update = cfn_event("Update", recorder.url, "1" * 64, PhysicalResourceId="DbMigration-schema",
                       OldResourceProperties={"MigrationsHash": "0" * 64})
    assert migrate_app.lambda_handler(update, context())["Status"] == "SUCCESS"
    answer = recorder.captured[-1]
    assert answer["Data"]["Applied"] == MIGRATION_IDS[-1]
    assert answer["Reason"].startswith("applied 1 migration(s); MigrationsHash 111111111111… is not the "
                                       f"migrations built into this function ({repository_hash()[:12]}…)")
    assert migrate.status(fresh_database).pending == []


def test_a_long_non_ascii_reason_keeps_the_answer_within_cloudformations_4_kb(
        migrate_app, recorder, fresh_database, monkeypatch, tmp_path):
    """Audit: the reason was cut to 1000 characters, and JSON's \\u escapes made 300 of '₿€ü' 5.8 KB."""
    folder = migrations_with(tmp_path, "0099_refuses.sql", "-- depends: 0009_score_due_series\n"
                             "DO $$ BEGIN RAISE EXCEPTION 'names must be ASCII: %', repeat('₿€ü', 300); END $$;\n")
    monkeypatch.setenv("MIGRATIONS_DIR", str(folder))
    event = cfn_event("Create", recorder.url, migrations_hash(folder))
    assert migrate_app.lambda_handler(event, context())["Status"] == "FAILED"
    body = recorder.requests[-1]["body"]
    assert len(body) <= 4096, len(body)
    reason = json.loads(body)["Reason"]
    assert "0099_refuses" in reason and "names must be ASCII: ₿€ü₿€ü" in reason


def test_a_lock_held_past_the_deadline_answers_failed_naming_its_holder(
        migrate_app, recorder, fresh_database, monkeypatch):
    """Audit: the lock wait gave up just as the deadline cancelled it, so a catalog query naming the holder that
    took a moment (here 0.3 s in the server) was cancelled, and the reason said only "canceling statement"."""
    from candlecast import migrate

    holder_of = migrate._lock_holder
    monkeypatch.setattr(migrate, "_lock_holder",
                        lambda connection: connection.execute("SELECT pg_sleep(0.3)") and holder_of(connection))
    with psycopg.connect(fresh_database, autocommit=True, application_name="other-runner") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        event = cfn_event("Create", recorder.url)
        result = migrate_app.lambda_handler(event, context(int((migrate_app.RESPONSE_MARGIN_SECONDS + 4) * 1000)))
    assert result["Status"] == "FAILED"
    assert "the migration lock is held by another run" in result["Reason"], result["Reason"]
    assert "other-runner" in result["Reason"]
    assert migrate.status(fresh_database).applied == []


def running(conninfo: str, text: str) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute("SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() AND query LIKE %s", (f"%{text}%",)).fetchall()


def test_at_the_deadline_the_migration_is_cancelled_and_rolled_back_before_failed_is_answered(
        migrate_app, recorder, fresh_database, monkeypatch, tmp_path):
    from candlecast import migrate

    migrate.apply(fresh_database)
    # Two statements, so neither alone outlasts the budget: only the cancel at the deadline stops the second.
    slow = migrations_with(tmp_path, "0008_slow.sql", "-- depends: 0007_model_kinds\n"
                           "ALTER TABLE symbols ADD COLUMN slow_flag int;\n"
                           "SELECT pg_sleep(0.8);\nSELECT pg_sleep(4);\n")
    monkeypatch.setenv("MIGRATIONS_DIR", str(slow))
    monkeypatch.setattr(migrate, "STATEMENT_MARGIN_SECONDS", 0.0, raising=False)
    remaining_ms = int((migrate_app.RESPONSE_MARGIN_SECONDS + 1.5) * 1000)
    update = cfn_event("Update", recorder.url, migrations_hash(slow), PhysicalResourceId="DbMigration-schema")

    result = migrate_app.lambda_handler(update, context(remaining_ms))

    assert result["Status"] == recorder.captured[-1]["Status"] == "FAILED"
    assert "cancelled" in recorder.captured[-1]["Reason"] and "0008_slow" in recorder.captured[-1]["Reason"]
    assert running(fresh_database, "pg_sleep") == []  # nothing left that could still commit
    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'symbols' "
                            "AND column_name = 'slow_flag'").fetchone()[0] == 0
    assert migrate.status(fresh_database, slow).pending == ["0008_slow"]


@pytest.mark.parametrize("request_type", ["Create", "Update"])
@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_no_migrations_answers_failed_naming_the_folder(migrate_app, recorder, fresh_database, monkeypatch, tmp_path,
                                                        layout, request_type):
    folder = tmp_path / "migrations"
    if layout == "empty":
        folder.mkdir()
    monkeypatch.setenv("MIGRATIONS_DIR", str(folder))
    event = cfn_event(request_type, recorder.url, "0" * 64, PhysicalResourceId="DbMigration-schema")
    result = migrate_app.lambda_handler(event, context())
    answer = recorder.captured[-1]
    assert answer["Status"] == result["Status"] == "FAILED"
    assert str(folder) in answer["Reason"] and "MigrationError" in answer["Reason"]


def test_a_database_that_accepts_and_never_answers_fails_the_connection_within_the_connect_timeout(monkeypatch):
    """migrate's connection had no connect_timeout: a server that accepted the TCP connection and never answered
    held it until the kernel gave up (the custom resource answered FAILED after 130 s in the audit)."""
    import threading

    from candlecast import migrate

    monkeypatch.setattr(migrate, "CONNECT_TIMEOUT_SECONDS", 2, raising=False)  # libpq's least; the function's is 10 s
    silent = SilentServer()
    outcome = {}

    def connect():
        started = time.monotonic()
        try:
            migrate.connect(f"postgresql://nobody:secret@127.0.0.1:{silent.port}/candlecast")
        except psycopg.OperationalError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=connect, daemon=True)
    try:
        worker.start()
        worker.join(8)
    finally:
        silent.close()
    assert not worker.is_alive() and "error" in outcome, "still connecting after 8 s"
    assert outcome["seconds"] < 5, outcome


def test_the_connect_timeout_is_ten_seconds_or_what_is_left_before_the_deadline():
    from candlecast import migrate

    assert migrate.connect_timeout_seconds() == migrate.CONNECT_TIMEOUT_SECONDS == 10
    assert migrate.connect_timeout_seconds(migrate.Deadline(6.5)) == 6
    assert migrate.connect_timeout_seconds(migrate.Deadline(0.5)) == 2  # libpq's least
    assert migrate.connect_timeout_seconds(migrate.Deadline(None)) == 10


def test_a_second_stage_pointed_at_the_same_database_is_refused_before_it_changes_anything(
        migrate_app, recorder, fresh_database, monkeypatch):
    """Two stages' secrets without dbname both reach "candlecast": dev's deploy migrated prod's schema, and dev's
    Retention went on deleting prod's predictions. The first stage to migrate a database keeps it."""
    from candlecast import migrate

    monkeypatch.setenv("STAGE", "prod")
    migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())
    assert recorder.captured[-1]["Status"] == "SUCCESS"
    migrate.rollback(fresh_database, 1)  # a release of prod's with a migration still to apply
    monkeypatch.setenv("STAGE", "dev")
    migrate_app.lambda_handler(cfn_event("Create", recorder.url), context())
    answer = recorder.captured[-1]
    assert answer["Status"] == "FAILED"
    assert answer["Reason"].startswith("MigrationError: this database is stage 'prod''s")
    assert "nothing was changed" in answer["Reason"] and "`dbname` in its secret" in answer["Reason"]
    assert migrate.status(fresh_database).pending == [MIGRATION_IDS[-1]]  # dev applied nothing
    monkeypatch.setenv("STAGE", "prod")
    migrate_app.lambda_handler(cfn_event("Update", recorder.url), context())
    assert recorder.captured[-1]["Status"] == "SUCCESS"
    assert migrate.status(fresh_database).pending == []
