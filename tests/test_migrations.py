"""Migrations: apply -> rollback -> apply, one run at a time under an advisory lock, runs bounded in time and in
how long they block others, and the CLI."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from candlecast import migrate
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

MIGRATIONS = sorted(path.name.removesuffix(".sql") for path in (ROOT / "migrations").glob("*.sql")
                    if not path.name.endswith(".rollback.sql"))
TABLES = {"symbols", "models", "predictions", "prediction_steps", "prediction_scores", "model_live_stats",
          "live_outcomes", "model_live_days"}


@pytest.fixture
def scratch_database(stack):
    """A database of its own, so rolling back does not disturb the other tests."""
    name = "migrations_test"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    params = psycopg.conninfo.conninfo_to_dict(stack.database_url)
    params["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**params)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def tables(conninfo: str) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows} - {*migrate.YOYO_TABLES, "yoyo_lock", migrate.STAGE_TABLE}  # bookkeeping


def test_the_backend_is_the_one_yoyo_registers_for_the_url_scheme(scratch_database):
    """migrate.connect builds the class directly, skipping yoyo's entry-point scan: it must stay the same class."""
    from yoyo.backends.base import get_backend_class

    backend = migrate.connect(scratch_database)
    try:
        scheme = migrate.yoyo_url(scratch_database).split("://", 1)[0]
        assert type(backend) is get_backend_class(scheme)
        assert backend.migration_table == "_yoyo_migration"
        assert backend.execute("SELECT to_regclass('yoyo_lock')").fetchone()[0] == "yoyo_lock"  # initialised
    finally:
        backend.connection.close()


def test_an_ipv6_host_keeps_its_brackets_in_yoyos_url():
    """Audit: `::1` went into the URL bare, and yoyo read its port as ':1:5432'."""
    from yoyo.connections import parse_uri

    for conninfo in ("postgresql://app:pw@[::1]:5433/candlecast", "host=::1 port=5433 dbname=candlecast user=app"):
        parsed = parse_uri(migrate.yoyo_url(conninfo))
        assert (parsed.hostname, parsed.port, parsed.database) == ("::1", 5433, "candlecast"), conninfo


def test_apply_rollback_apply(scratch_database):
    assert migrate.apply(scratch_database) == MIGRATIONS
    assert tables(scratch_database) == TABLES
    assert migrate.rollback(scratch_database, count=len(MIGRATIONS)) == MIGRATIONS[::-1]
    assert tables(scratch_database) == set()
    assert migrate.status(scratch_database).pending == MIGRATIONS
    assert migrate.apply(scratch_database) == MIGRATIONS
    assert migrate.status(scratch_database).pending == []


def insert_model(conn, kind: str, version: str) -> None:
    conn.execute("""
        INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, metrics)
        VALUES ('4h', 'candlecast-4h', %s, %s, 'models/4h.pkl', repeat('a', 64),
                jsonb_build_object('shipped', %s::text))
        """, (version, kind, kind))


def test_a_models_kind_is_the_method_it_ships_and_rolls_back_to_the_old_labels(scratch_database):
    migrate.apply(scratch_database)
    with psycopg.connect(scratch_database) as conn:
        for version, kind in enumerate(("baseline", "learned", "garch-scale", "combined")):
            insert_model(conn, kind, str(version))
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            insert_model(conn, "ensemble", "9")
    assert migrate.rollback(scratch_database, count=4) == ["0010_live_days", "0009_score_due_series",
                                                           "0008_live_outcomes", "0007_model_kinds"]
    with psycopg.connect(scratch_database) as conn:
        kinds = [row[0] for row in conn.execute("SELECT kind FROM models ORDER BY version")]
        assert kinds == ["baseline", "learned", "baseline", "learned"]
        with pytest.raises(psycopg.errors.CheckViolation):
            insert_model(conn, "combined", "9")
    assert migrate.apply(scratch_database) == ["0007_model_kinds", "0008_live_outcomes", "0009_score_due_series",
                                               "0010_live_days"]
    with psycopg.connect(scratch_database) as conn:
        kinds = [row[0] for row in conn.execute("SELECT kind FROM models ORDER BY version")]
    assert kinds == ["baseline", "learned", "garch-scale", "combined"], "re-applying restores what each row shipped"


def test_the_track_record_migrations_roll_back_alone(scratch_database):
    migrate.apply(scratch_database)
    assert migrate.rollback(scratch_database, count=1) == ["0010_live_days"]
    assert tables(scratch_database) == TABLES - {"model_live_days"}
    assert migrate.rollback(scratch_database, count=1) == ["0009_score_due_series"]
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT to_regclass('predictions_score_series_idx')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'predictions_score_due_stats'"
                            ).fetchone()[0] == 0
    assert migrate.rollback(scratch_database, count=1) == ["0008_live_outcomes"]
    assert tables(scratch_database) == TABLES - {"live_outcomes", "model_live_days"}
    assert migrate.rollback(scratch_database, count=1) == ["0007_model_kinds"]
    assert migrate.rollback(scratch_database, count=1) == ["0006_score_due"]
    with psycopg.connect(scratch_database) as conn:
        columns = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'predictions'")}
        assert columns and "score_next_at" not in columns
        assert conn.execute("SELECT to_regclass('predictions_score_due_idx')").fetchone()[0] is None
    assert migrate.rollback(scratch_database, count=1) == ["0005_prediction_scores"]
    assert tables(scratch_database) == TABLES - {"prediction_scores", "model_live_stats", "live_outcomes",
                                                 "model_live_days"}
    assert migrate.apply(scratch_database) == ["0005_prediction_scores", "0006_score_due", "0007_model_kinds",
                                               "0008_live_outcomes", "0009_score_due_series", "0010_live_days"]


def test_a_rollback_ended_before_its_record_is_removed_leaves_the_migration_whole(scratch_database, monkeypatch):
    """Audit: yoyo's rollback_one committed a migration's rollback on a second connection, then removed its row
    apart: a run killed between them left 0008 recorded as applied without live_outcomes, every later rollback
    failed on the missing table, and so did Retention. Steps and record now go in one transaction."""
    from yoyo.backends.base import DatabaseBackend

    migrate.apply(scratch_database)

    def killed(self, migration, log=True):
        raise RuntimeError("the run ended here")

    monkeypatch.setattr(DatabaseBackend, "unmark_one", killed)
    with pytest.raises(migrate.MigrationError, match="rollback of 0010_live_days failed: RuntimeError: the "
                                                     r"run ended here \(rolled back before it in this run: none; it "
                                                     r"is still applied, unchanged\)"):
        migrate.rollback(scratch_database, count=2)
    monkeypatch.undo()
    assert migrate.status(scratch_database).pending == []
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT to_regclass('predictions_score_series_idx')").fetchone()[0] is not None
    assert tables(scratch_database) == TABLES
    assert migrate.rollback(scratch_database, count=3) == ["0010_live_days", "0009_score_due_series",
                                                           "0008_live_outcomes"]
    assert tables(scratch_database) == TABLES - {"live_outcomes", "model_live_days"}
    assert migrate.apply(scratch_database) == ["0008_live_outcomes", "0009_score_due_series", "0010_live_days"]


def test_the_due_series_index_is_built_whole_and_rolled_back(scratch_database):
    migrate.apply(scratch_database)
    with psycopg.connect(scratch_database) as conn:
        valid, definition = conn.execute(
            "SELECT indisvalid, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indexrelid = 'predictions_score_series_idx'::regclass").fetchone()
        assert valid and "(ticker, timeframe, id)" in definition and "infinity" in definition
        assert conn.execute("SELECT count(*) FROM pg_statistic_ext "
                            "WHERE stxname = 'predictions_score_due_stats'").fetchone()[0] == 1
    assert migrate.rollback(scratch_database, count=2) == ["0010_live_days", "0009_score_due_series"]
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT to_regclass('predictions_score_series_idx')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM pg_statistic_ext "
                            "WHERE stxname = 'predictions_score_due_stats'").fetchone()[0] == 0


def test_a_migration_outside_the_runs_transaction_is_refused_before_anything_is_applied(scratch_database, tmp_path):
    """yoyo runs a `-- transactional: false` migration on a second connection of its own: outside the run's
    advisory lock (which the first connection's idle_session_timeout then ends during a long build), its deadline's
    cancel and its statement_timeout (audit T)."""
    folder = migrations_with(tmp_path, **{"0011_concurrent__sql": "-- depends: 0010_live_days\n"
                                          "-- transactional: false\nCREATE INDEX CONCURRENTLY x ON symbols (name);\n"})
    with pytest.raises(migrate.MigrationError, match="migration 0011_concurrent is not transactional"):
        migrate.apply(scratch_database, directory=folder)
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT to_regclass('public.symbols')").fetchone()[0] is None


def test_two_concurrent_runs_apply_once_without_error(scratch_database):
    results, errors = [], []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            results.append(migrate.apply(scratch_database))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(map(len, results)) == [0, len(MIGRATIONS)]


def test_schema_enforces_one_active_model_per_timeframe_and_step_checks(scratch_database):
    migrate.apply(scratch_database)
    insert_model = (
        "INSERT INTO models (timeframe, name, version, kind, s3_key, sha256, is_active) "
        "VALUES ('1h', 'm', %s, 'baseline', 'models/1h.pkl', repeat('a', 64), true)"
    )
    with psycopg.connect(scratch_database) as conn:
        conn.execute(insert_model, ("1",))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert_model, ("2",))
    with psycopg.connect(scratch_database) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO symbols (ticker, name, base_currency, quote_currency) "
                     "VALUES ('btc usd; --', 'x', 'BTC', 'USD')")


def test_cli_migrate_and_status(scratch_database):
    env = {**os.environ, "DATABASE_URL": scratch_database, "REDIS_URL": "redis://127.0.0.1:1/0",
           "DATA_BUCKET": "unused-bucket"}
    command = [sys.executable, "-m", "candlecast.cli"]
    applied = subprocess.run([*command, "migrate"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(applied.stdout)["applied"] == MIGRATIONS
    status = subprocess.run([*command, "migrate", "--status"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {"applied": MIGRATIONS, "pending": [], "unknown": []}


def test_an_older_checkout_lists_the_newer_migrations_and_refuses_to_roll_back(scratch_database, tmp_path, caplog):
    """Audit V: an older checkout's --status said `pending: []` and its --rollback 1 rolled back the newest migration
    it knew (0007), leaving the newer 0008 and 0009 applied on top. It now lists them, and refuses (exit 1,
    nothing rolled back) until the release that added them has rolled them back."""
    older = tmp_path / "migrations"
    older.mkdir()
    for path in (ROOT / "migrations").glob("*.sql"):
        if not path.name.startswith(("0008_", "0009_", "0010_")):
            shutil.copy(path, older / path.name)
    migrate.apply(scratch_database)
    newer = ["0008_live_outcomes", "0009_score_due_series", "0010_live_days"]
    assert migrate.status(scratch_database, older).as_dict() == {"applied": MIGRATIONS[:-3], "pending": [],
                                                                 "unknown": newer}
    with pytest.raises(migrate.MigrationError,
                       match="0008_live_outcomes, 0009_score_due_series, 0010_live_days; nothing rolled back"):
        migrate.rollback(scratch_database, 1, older)
    env = {**only_database(scratch_database), "MIGRATIONS_DIR": str(older)}
    rolled = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate", "--rollback", "1"], env=env,
                            capture_output=True, text=True)
    assert rolled.returncode == 1 and rolled.stdout == ""
    assert rolled.stderr.startswith("candlecast migrate: the database has migrations applied that this checkout")
    assert migrate.status(scratch_database).as_dict() == {"applied": MIGRATIONS, "pending": [], "unknown": []}
    with caplog.at_level("WARNING", logger="candlecast.migrate"):
        assert migrate.apply(scratch_database, older) == []
    assert "0008_live_outcomes, 0009_score_due_series, 0010_live_days" in caplog.text


def test_cli_reports_missing_configuration_by_name():
    env = {key: value for key, value in os.environ.items()
           if key not in {"DATABASE_URL", "DB_SECRET_ARN", "REDIS_URL", "DATA_BUCKET"}}
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "DATABASE_URL or DB_SECRET_ARN" in result.stderr
    assert "REDIS_URL" not in result.stderr and "DATA_BUCKET" not in result.stderr  # migrations need neither


def only_database(url: str) -> dict[str, str]:
    unrelated = {"DATABASE_URL", "DB_SECRET_ARN", "REDIS_URL", "DATA_BUCKET", "S3_ENDPOINT_URL", "MODEL_SIGNING_KEY"}
    return {**{key: value for key, value in os.environ.items() if key not in unrelated}, "DATABASE_URL": url}


def test_cli_migrate_status_and_rollback_need_only_database_url(scratch_database):
    command = [sys.executable, "-m", "candlecast.cli", "migrate"]
    env = only_database(scratch_database)
    every = migrate.status(scratch_database).pending
    applied = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert json.loads(applied.stdout)["applied"] == every
    status = subprocess.run([*command, "--status"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {"applied": every, "pending": [], "unknown": []}
    rolled = subprocess.run([*command, "--rollback", "1"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(rolled.stdout) == {"rolled_back": every[-1:]}
    assert migrate.status(scratch_database).pending == every[-1:]


def test_a_missing_or_empty_folder_is_an_error_that_names_it(scratch_database, tmp_path):
    missing, empty, checkout_without_symlinks = tmp_path / "nowhere", tmp_path / "empty", tmp_path / "migrations"
    empty.mkdir()
    checkout_without_symlinks.write_text("../../migrations")  # what git leaves for a symlink with symlinks off
    for folder, reason in ((missing, "does not exist"), (empty, "holds no migrations"),
                           (checkout_without_symlinks, "is not a folder")):
        with pytest.raises(migrate.MigrationError, match=f"{folder} {reason}"):
            migrate.apply(scratch_database, folder)
        with pytest.raises(migrate.MigrationError, match=str(folder)):
            migrate.status(scratch_database, folder)
    assert tables(scratch_database) == set()


def test_a_half_applied_schema_names_the_migration_without_a_traceback(scratch_database):
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE symbols (id int)")  # left by a hand-run or interrupted script, unrecorded
    with pytest.raises(migrate.MigrationError, match=r"migration 0001_symbols failed: DuplicateTable"):
        migrate.apply(scratch_database)
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate"], env=only_database(scratch_database),
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "0001_symbols" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert migrate.status(scratch_database).applied == []


def forget_applied(conninfo: str, *ids: str) -> None:
    """_yoyo_migration older than the schema: a migrations table restored from an earlier backup."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = ANY(%s)", (list(ids),))


def test_a_migrations_table_older_than_the_schema_points_at_mark_applied_which_gets_past_it(scratch_database):
    """Disaster-recovery audit: re-applying a migration the schema already holds failed, naming it, with no supported
    way out. The "already exists" failure now points at `--mark-applied`, which records them without running them."""
    migrate.apply(scratch_database)
    forget_applied(scratch_database, "0008_live_outcomes", "0009_score_due_series")
    with pytest.raises(migrate.MigrationError, match=r"migration 0008_live_outcomes failed: DuplicateTable: .*"
                       r"record it and those before it as applied.*`candlecast migrate --mark-applied "):
        migrate.apply(scratch_database)
    command = [sys.executable, "-m", "candlecast.cli", "migrate"]
    failed = subprocess.run(command, env=only_database(scratch_database), capture_output=True, text=True)
    assert failed.returncode == 1 and "--mark-applied" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    marked = subprocess.run([*command, "--mark-applied", "0009_score_due_series"], env=only_database(scratch_database),
                            capture_output=True, text=True, check=True)
    assert json.loads(marked.stdout) == {"marked": ["0008_live_outcomes", "0009_score_due_series"]}
    assert migrate.status(scratch_database).as_dict() == {"applied": MIGRATIONS, "pending": [], "unknown": []}
    assert migrate.apply(scratch_database) == []
    assert tables(scratch_database) == TABLES
    with psycopg.connect(scratch_database) as conn:
        logged = conn.execute("SELECT migration_id FROM _yoyo_log WHERE operation = 'mark' ORDER BY migration_id")
        assert [row[0] for row in logged] == ["0008_live_outcomes", "0009_score_due_series"]


def test_mark_applied_marks_only_through_its_id_and_refuses_an_unknown_id(scratch_database):
    with pytest.raises(migrate.MigrationError, match=r"no migration '0010_nope' in this release's migrations "
                       r"\(0001_symbols, .*0010_live_days\): nothing marked"):
        migrate.mark_applied(scratch_database, "0010_nope")
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate", "--mark-applied", "0010_nope"],
                            env=only_database(scratch_database), capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("candlecast migrate: no migration '0010_nope'")
    assert migrate.status(scratch_database).applied == []
    assert migrate.mark_applied(scratch_database, "0002_models") == ["0001_symbols", "0002_models"]
    assert migrate.mark_applied(scratch_database, "0002_models") == []  # recorded already
    assert tables(scratch_database) == set()  # recorded, not run
    assert migrate.status(scratch_database).pending == MIGRATIONS[2:]


def test_mark_applied_waits_for_the_run_lock(scratch_database):
    with psycopg.connect(scratch_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        with pytest.raises(migrate.MigrationError, match="the migration lock is held by another run"):
            migrate.mark_applied(scratch_database, "0001_symbols", deadline=migrate.Deadline(0.5))
        assert migrate.status(scratch_database).applied == []
        thread, outcome = in_thread(lambda: migrate.mark_applied(scratch_database, "0001_symbols"))
        time.sleep(0.5)
        assert thread.is_alive()  # waiting for the lock
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        thread.join(10)
    assert outcome == [["0001_symbols"]]


def test_only_an_already_exists_failure_points_at_mark_applied(scratch_database, tmp_path):
    folder = migrations_with(tmp_path, **{"0011_broken__sql": "-- depends: 0010_live_days\n"
                                          "ALTER TABLE no_such_table ADD COLUMN x int;\n"})
    with pytest.raises(migrate.MigrationError, match="migration 0011_broken failed: UndefinedTable") as raised:
        migrate.apply(scratch_database, folder)
    assert "mark-applied" not in str(raised.value)


def yoyo_tables(conninfo: str) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_yoyo\\_%'")}


@pytest.mark.parametrize("dropped", ["_yoyo_migration", "_yoyo_version", "_yoyo_log"])
def test_yoyo_bookkeeping_left_incomplete_is_refused_naming_what_is_missing(scratch_database, dropped):
    """Disaster-recovery audit: with _yoyo_migration (or _yoyo_version) gone and _yoyo_log left, migrate and --status
    raised psycopg's DuplicateTable from yoyo's own set-up; with _yoyo_log gone, a run applied nothing silently and
    the next migration would fail writing its log. Each is now one MigrationError naming the missing table."""
    migrate.apply(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {dropped}")
    left = yoyo_tables(scratch_database)
    expected = rf"yoyo's bookkeeping is incomplete: {dropped} missing while .*nothing was changed.*--mark-applied"
    for call in (migrate.apply, migrate.status):
        with pytest.raises(migrate.MigrationError, match=expected):
            call(scratch_database)
    for argv in (["migrate"], ["migrate", "--status"], ["migrate", "--mark-applied", MIGRATIONS[-1]]):
        result = subprocess.run([sys.executable, "-m", "candlecast.cli", *argv], env=only_database(scratch_database),
                                capture_output=True, text=True)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"candlecast migrate: yoyo's bookkeeping is incomplete: {dropped} missing")
        assert len(result.stderr.strip().splitlines()) == 1
    assert yoyo_tables(scratch_database) == left == {"_yoyo_migration", "_yoyo_log", "_yoyo_version"} - {dropped}


def test_a_schema_without_yoyos_tables_is_recorded_with_mark_applied(scratch_database):
    """The way out the error above gives, when there is no backup of _yoyo_migration: rename yoyo's other tables
    away; the run then creates yoyo's tables afresh and fails at the first migration the schema holds, pointing at
    --mark-applied, which records them."""
    migrate.apply(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("DROP TABLE _yoyo_migration")
        conn.execute("ALTER TABLE _yoyo_log RENAME TO _yoyo_log_before_restore")
        conn.execute("ALTER TABLE _yoyo_version RENAME TO _yoyo_version_before_restore")
    with pytest.raises(migrate.MigrationError, match=r"migration 0001_symbols failed: DuplicateTable.*--mark-applied"):
        migrate.apply(scratch_database)
    assert migrate.mark_applied(scratch_database, MIGRATIONS[-1]) == MIGRATIONS
    assert migrate.apply(scratch_database) == []
    assert migrate.status(scratch_database).applied == MIGRATIONS


def hold_yoyo_lock(conninfo: str, pid: int, age_seconds: float) -> None:
    """The row yoyo's lock (taken by every run of older releases) leaves behind when its run is killed."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) "
                     "VALUES (1, (now() AT TIME ZONE 'UTC') - make_interval(secs => %s), %s)", (age_seconds, pid))


def test_a_yoyo_lock_row_left_by_a_killed_run_blocks_nothing_and_break_lock_is_gone(scratch_database):
    migrate.apply(scratch_database)
    migrate.rollback(scratch_database, count=1)
    hold_yoyo_lock(scratch_database, pid=4242, age_seconds=3600)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate"], env=only_database(scratch_database),
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["applied"] == MIGRATIONS[-1:]
    assert time.monotonic() - started < 20  # no wait for the row (a subprocess start is a few seconds here)
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT count(*) FROM yoyo_lock").fetchone()[0] == 0
    retired = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate", "--break-lock"],
                             env=only_database(scratch_database), capture_output=True, text=True)
    assert retired.returncode == 2 and "--break-lock" in retired.stderr


def migrations_with(tmp_path, **extra: str):
    """A copy of migrations/ with more migration files (name with dots as __ : 0008_slow__sql)."""
    folder = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", folder)
    for name, text in extra.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def slow(seconds: float, table: str = "symbols") -> str:
    """A migration that takes an ACCESS EXCLUSIVE lock, then works for a while."""
    return (f"-- depends: 0007_model_kinds\nALTER TABLE {table} ADD COLUMN slow_flag int;\n"
            f"SELECT pg_sleep({seconds});\n")


def has_column(conninfo: str, table: str, column: str) -> bool:
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = %s "
                            "AND column_name = %s", (table, column)).fetchone()[0] == 1


def sessions_running(conninfo: str, text: str) -> list[int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'active' AND query LIKE %s", (f"%{text}%",))]


def wait_for(condition, timeout: float = 10.0):
    give_up = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < give_up, "timed out waiting"
        time.sleep(0.05)
    return result


def in_thread(work) -> tuple[threading.Thread, list]:
    """Run work() in a thread; the list receives its result or its exception."""
    outcome: list = []

    def run():
        try:
            outcome.append(work())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_run_whose_sessions_are_killed_names_its_migration_and_leaves_no_lock(scratch_database, tmp_path,
                                                                               monkeypatch):
    """A server restart (or a killed Lambda) mid-migration: the error names the migration (not a failure to
    release the lock on a dead connection), and the next run is not held up by a lock left behind."""
    migrate.apply(scratch_database)
    monkeypatch.setattr(migrate, "LOCK_TIMEOUT_SECONDS", 2, raising=False)  # earlier releases: yoyo-lock wait, scaled
    folder = migrations_with(tmp_path, **{"0008_slow__sql": slow(30)})
    thread, outcome = in_thread(lambda: migrate.apply(scratch_database, folder))
    wait_for(lambda: sessions_running(scratch_database, "pg_sleep"))
    with psycopg.connect(scratch_database, autocommit=True) as conn:  # every session of the run, as a restart would
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    thread.join(10)
    (error,) = outcome
    assert isinstance(error, migrate.MigrationError), repr(error)
    assert "migration 0008_slow failed: AdminShutdown" in str(error)  # why the server ended it
    started = time.monotonic()
    assert migrate.apply(scratch_database) == []
    assert time.monotonic() - started < 1.5
    assert not has_column(scratch_database, "symbols", "slow_flag")
    assert migrate.status(scratch_database, folder).pending == ["0008_slow"]


def test_a_second_run_waits_for_the_first_then_applies_nothing(scratch_database, tmp_path, monkeypatch):
    """The loser of two concurrent runs is not FAILED while the winner is migrating fine."""
    migrate.apply(scratch_database)
    monkeypatch.setattr(migrate, "LOCK_TIMEOUT_SECONDS", 1, raising=False)  # earlier releases: fixed wait, scaled
    folder = migrations_with(tmp_path, **{"0008_slow__sql": slow(2.5)})
    first, outcome = in_thread(lambda: migrate.apply(scratch_database, folder))
    wait_for(lambda: sessions_running(scratch_database, "pg_sleep"))
    assert migrate.apply(scratch_database, folder) == []
    first.join(10)
    assert outcome == [["0008_slow"]]


def test_a_second_run_waits_no_longer_than_its_deadline_and_names_the_holder(scratch_database, tmp_path):
    migrate.apply(scratch_database)
    folder = migrations_with(tmp_path, **{"0008_slow__sql": slow(4)})
    first, outcome = in_thread(lambda: migrate.apply(scratch_database, folder))
    wait_for(lambda: sessions_running(scratch_database, "pg_sleep"))
    started = time.monotonic()
    # A second more than LOCK_GIVE_UP_EARLY_SECONDS: the statement timeout leaves that long to read the holder.
    with pytest.raises(migrate.MigrationError, match=r"held by another run \(pid \d+, candlecast-migrate"):
        migrate.apply(scratch_database, folder, deadline=migrate.Deadline(2))
    assert time.monotonic() - started < 2.5
    assert migrate.apply(scratch_database, folder, deadline=migrate.Deadline(10)) == []
    first.join(10)
    assert outcome == [["0008_slow"]]


def test_a_holder_the_catalog_cannot_name_is_still_another_run(scratch_database, caplog):
    """Under load the catalog query naming the holder outlasted a short deadline's statement timeout, and its
    QueryCanceled escaped instead of the MigrationError saying the lock is held."""
    with psycopg.connect(scratch_database) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert migrate._lock_holder(conn) == "another run"  # the aborted transaction refuses the catalog query
    assert "could not read who holds the migration lock: current transaction is aborted" in caplog.text


def test_a_deadline_bounds_each_statement_on_the_server(scratch_database, tmp_path):
    migrate.apply(scratch_database)
    folder = migrations_with(tmp_path, **{"0008_slow__sql": slow(30)})
    started = time.monotonic()
    with pytest.raises(migrate.MigrationError, match=r"migration 0008_slow failed: QueryCanceled: .*statement timeout"):
        migrate.apply(scratch_database, folder, deadline=migrate.Deadline(1.5))
    assert time.monotonic() - started < 3
    assert not has_column(scratch_database, "symbols", "slow_flag")


def test_a_cancelled_run_rolls_back_its_migration(scratch_database, tmp_path):
    migrate.apply(scratch_database)
    folder = migrations_with(tmp_path, **{"0008_slow__sql": slow(30)})
    deadline = migrate.Deadline()
    thread, outcome = in_thread(lambda: migrate.apply(scratch_database, folder, deadline=deadline))
    wait_for(lambda: sessions_running(scratch_database, "pg_sleep"))
    deadline.cancel()
    thread.join(5)
    (error,) = outcome
    assert isinstance(error, migrate.MigrationError) and "migration 0008_slow failed: QueryCanceled" in str(error)
    assert not sessions_running(scratch_database, "pg_sleep")
    assert not has_column(scratch_database, "symbols", "slow_flag")
    assert migrate.status(scratch_database, folder).pending == ["0008_slow"]


FROZEN = """from yoyo import step
import time
__depends__ = {"0007_model_kinds"}
steps = [step("ALTER TABLE symbols ADD COLUMN frozen_flag int"), step(lambda connection: time.sleep(3))]
"""


def test_a_client_frozen_mid_migration_loses_its_locks_to_the_server(scratch_database, tmp_path, monkeypatch):
    """A Lambda sandbox frozen mid-transaction: the server ends the transaction, and the API can read again."""
    migrate.apply(scratch_database)
    monkeypatch.setattr(migrate, "IDLE_IN_TRANSACTION_SECONDS", 0.5, raising=False)
    folder = migrations_with(tmp_path, **{"0008_frozen__py": FROZEN})
    thread, outcome = in_thread(lambda: migrate.apply(scratch_database, folder))
    time.sleep(1.5)  # the ALTER took its lock; the client "froze" in the Python step
    with psycopg.connect(scratch_database, options="-c lock_timeout=500") as conn:  # as the API reads
        assert conn.execute("SELECT count(*) FROM symbols").fetchone()[0] == 0
    thread.join(10)
    (error,) = outcome
    assert isinstance(error, migrate.MigrationError) and "migration 0008_frozen failed" in str(error)
    assert not has_column(scratch_database, "symbols", "frozen_flag")


def test_a_migration_queued_behind_another_transaction_gives_up_and_retries(scratch_database, tmp_path,
                                                                           monkeypatch):
    """An ALTER waiting for a lock blocks every reader queued after it: it waits lock_timeout, then tries again."""
    migrate.apply(scratch_database)
    for name, value in (("DDL_LOCK_TIMEOUT_SECONDS", 0.3), ("LOCK_ATTEMPTS", 3), ("LOCK_RETRY_PAUSE_SECONDS", 0.2)):
        monkeypatch.setattr(migrate, name, value, raising=False)
    folder = migrations_with(tmp_path, **{"0008_flag__sql": "-- depends: 0007_model_kinds\n"
                                          "ALTER TABLE symbols ADD COLUMN flag int;\n"})
    blocker = psycopg.connect(scratch_database)  # a long transaction that has read symbols (Retention, Score)
    release = threading.Timer(6, blocker.rollback)
    try:
        blocker.execute("SELECT count(*) FROM symbols")
        release.start()
        started = time.monotonic()
        with pytest.raises(migrate.MigrationError,
                           match=r"migration 0008_flag failed: it waited for a lock 3 time\(s\), 0.3 s each"):
            migrate.apply(scratch_database, folder)
        assert time.monotonic() - started < 3
        release.cancel()
        release = threading.Timer(0.5, blocker.rollback)  # this time the transaction ends during the retries
        release.start()
        assert migrate.apply(scratch_database, folder) == ["0008_flag"]
    finally:
        release.cancel()
        blocker.close()
    assert has_column(scratch_database, "symbols", "flag")


def test_cli_db_check_reports_database_and_cache(migrated_db):
    env = {**os.environ, **migrated_db.environment()}
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "db-check"], env=env,
                            capture_output=True, text=True)
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert report["database"]["status"] == "up"
    with psycopg.connect(migrated_db.database_url) as conn:
        assert report["database"]["symbols"] == conn.execute("SELECT count(*) FROM symbols").fetchone()[0]
    assert report["cache"] == {"status": "up"}
    down = subprocess.run([sys.executable, "-m", "candlecast.cli", "db-check"],
                          env={**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                               "REDIS_URL": "redis://127.0.0.1:1/0"},
                          capture_output=True, text=True)
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert report["database"] | {"message": None} == {"status": "down", "error": "OperationalError", "sqlstate": None,
                                                      "host": "127.0.0.1", "port": 1, "message": None}
    assert "Connection refused" in report["database"]["message"] and report["cache"] == {"status": "down"}
    assert down.stderr == ""  # no log lines of the API's pool


def test_cli_db_check_names_the_servers_error_without_the_password(migrated_db, scratch_database):
    """A database that does not exist: the server's message, host and port (libpq gives no SQLSTATE before the
    connection is made); one without the migrations: the failing statement's SQLSTATE."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    env = {**os.environ, **migrated_db.environment()}
    server = conninfo_to_dict(migrated_db.database_url)

    def db_check(url: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "candlecast.cli", "db-check"],
                                env={**env, "DATABASE_URL": url}, capture_output=True, text=True)
        assert result.returncode == 1 and "s3cret-db-check-pw" not in result.stdout + result.stderr
        return json.loads(result.stdout)["database"]

    missing = db_check(make_conninfo(migrated_db.database_url, dbname="no_such_database",
                                     password="s3cret-db-check-pw"))
    assert missing["error"] == "OperationalError" and "no_such_database" in missing["message"]
    assert (missing["host"], missing["port"]) == (server.get("host"), int(server.get("port") or 5432))
    unmigrated = db_check(scratch_database)
    assert (unmigrated["error"], unmigrated["sqlstate"]) == ("UndefinedTable", "42P01")


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_cli_rollback_count_must_be_positive(scratch_database, count):
    env = {**os.environ, "DATABASE_URL": scratch_database, "REDIS_URL": "redis://127.0.0.1:1/0",
           "DATA_BUCKET": "unused-bucket"}
    migrate.apply(scratch_database)
    result = subprocess.run([sys.executable, "-m", "candlecast.cli", "migrate", "--rollback", count],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "at least 1" in result.stderr
    assert tables(scratch_database) == TABLES


def test_the_outcomes_counted_before_live_outcomes_stay_counted(scratch_database):
    """0008 records the outcomes already folded into model_live_stats that a copy could still match (inside the
    scoring window), so a copy scored after the deploy is not counted again. 0010 sums the out-of-sample outcomes
    still stored per outcome day, each origin's once, as the Score function folds them."""
    migrate.apply(scratch_database)
    assert migrate.rollback(scratch_database, count=3) == ["0010_live_days", "0009_score_due_series",
                                                           "0008_live_outcomes"]
    with psycopg.connect(scratch_database) as conn:
        insert_model(conn, "baseline", "1")
        conn.execute("INSERT INTO symbols (ticker, name, base_currency, quote_currency) "
                     "VALUES ('X:BTCUSD', 'Bitcoin', 'BTC', 'USD')")
        for age_days in (1, 1, 90):  # a recent origin and a copy of its prediction, and one long out of the window
            conn.execute("""
                WITH p AS (
                    INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close,
                                             request_hash)
                    SELECT s.id, s.ticker, '1h', m.id, now() - make_interval(days => %(age)s), 100, 'h'
                    FROM symbols s, models m RETURNING id, model_id, last_candle_at
                ), steps AS (
                    INSERT INTO prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80,
                                                  upper_80, lower_95, upper_95, confidence)
                    SELECT p.id, 1, p.last_candle_at + interval '1 hour', 100, 100, 100, 100, 99, 101, 98, 102, 0.5
                    FROM p RETURNING prediction_id, step, ts
                )
                INSERT INTO prediction_scores (prediction_id, step, model_id, ts, realised_close, inside_80,
                                               inside_95, confidence, event, pinball, baseline_pinball, in_sample)
                SELECT steps.prediction_id, steps.step, p.model_id, steps.ts, 100, true, true, 0.5, true, 1, 1, false
                FROM steps JOIN p ON p.id = steps.prediction_id
            """, {"age": age_days})
    assert migrate.apply(scratch_database) == ["0008_live_outcomes", "0009_score_due_series", "0010_live_days"]
    with psycopg.connect(scratch_database) as conn:
        counted = conn.execute("SELECT ticker, timeframe, step, origin_at > now() - interval '2 days' "
                               "FROM live_outcomes").fetchall()
        days = conn.execute("SELECT day > current_date - 3, n, inside_80 FROM model_live_days ORDER BY day").fetchall()
    assert counted == [("X:BTCUSD", "1h", 1, True)]
    assert days == [(False, 1, 1), (True, 1, 1)]



def test_a_run_is_in_utc_whatever_the_servers_zone(scratch_database):
    """An embedded PostgreSQL takes the laptop's zone; RDS is in UTC. The stage claim's date is UTC's."""
    with psycopg.connect(scratch_database, autocommit=True) as admin:
        admin.execute("ALTER DATABASE migrations_test SET timezone = 'Pacific/Chatham'")  # +13:45
    migrate.apply(scratch_database, stage="prod")
    with psycopg.connect(scratch_database, autocommit=True) as admin:
        admin.execute(f"UPDATE {migrate.STAGE_TABLE} SET claimed_at = '2026-12-07 20:00Z'")  # Chatham's 8th
    backend = migrate.connect(scratch_database)
    try:
        zone = backend.connection.execute("SELECT current_setting('TimeZone')").fetchone()[0]
    finally:
        backend.connection.close()
    assert zone == "UTC"
    with pytest.raises(migrate.MigrationError, match=r"have migrated it since 2026-12-07\)"):
        migrate.apply(scratch_database, stage="staging")

def test_a_database_restored_from_another_stages_backup_is_taken_over_only_when_asked(scratch_database):
    """README, "Restoring from a backup": prod's backup restored for staging is refused to staging's runs (apply,
    mark-applied, rollback) until `candlecast migrate --take-over` records it as staging's."""
    migrate.apply(scratch_database, stage="prod")
    assert migrate.apply(scratch_database, stage="prod") == []
    for run in (lambda: migrate.apply(scratch_database, stage="staging"),
                lambda: migrate.mark_applied(scratch_database, MIGRATIONS[-1], stage="staging"),
                lambda: migrate.rollback(scratch_database, 1, stage="staging")):
        with pytest.raises(migrate.MigrationError, match=r"this database is stage 'prod''s .* not 'staging''s"):
            run()
    assert migrate.status(scratch_database).pending == []
    command = [sys.executable, "-m", "candlecast.cli", "migrate", "--take-over"]
    taken = subprocess.run(command, env=only_database(scratch_database) | {"STAGE": "staging"},
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 0, taken.stderr
    assert "the database was stage 'prod''s; it is now stage 'staging''s" in taken.stderr
    assert migrate.rollback(scratch_database, 1, stage="staging") == [MIGRATIONS[-1]]
    with pytest.raises(migrate.MigrationError, match="this database is stage 'staging''s"):
        migrate.apply(scratch_database, stage="prod")
