"""Stages of a benchmark at scale (bench_scale, bench_score): a database each, copied from the seeded one, and
db's container pool swapped between them, so one process measures every stage side by side."""

import contextlib
import os
from collections.abc import Callable, Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# The 30 flat steps of each prediction that the statement's `new` CTE has just inserted.
STEPS_OF_NEW_SQL = """
INSERT INTO prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80, upper_80, lower_95,
                              upper_95, confidence)
SELECT new.id, n, new.last_candle_at + n * interval '1 hour', 100, 101, 99, 100, 98, 102, 97, 103, 0.5
FROM new, generate_series(1, 30) n
"""


def copy_database(database_url: str, name: str) -> str:
    """A new database `name` made from the one at `database_url` (CREATE DATABASE ... TEMPLATE); its URL."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {conninfo_to_dict(database_url)['dbname']}")
    return make_conninfo(database_url, dbname=name)


@contextlib.contextmanager
def stage_pools(urls: dict[int, str]) -> Iterator[Callable[[int], None]]:
    """One of db's pools per stage's database; yields `use(stage)`, which swaps that stage's in as db's pool."""
    from candlecast import db
    from candlecast.config import get_settings

    pools = {}
    try:
        for stage, url in urls.items():
            os.environ["DATABASE_URL"] = url
            get_settings.cache_clear()
            db._pool = None
            pools[stage] = db.get_pool()

        def use(stage: int) -> None:
            db._pool = pools[stage]

        yield use
    finally:
        for pool in pools.values():
            pool.close()
        db._pool = None
