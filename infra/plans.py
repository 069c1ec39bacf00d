"""The plans of queries as the pool runs them: psycopg's server-side prepared statements included.

psycopg prepares a query after `prepare_threshold` executions; PostgreSQL then may switch that statement
to a generic plan (parameters unknown) after five custom ones. `recording()` notes each query a piece of
code executes with its parameters; `explain_prepared()` finds the statement psycopg prepared for it on that
same connection and shows the plan its next execution would use (EXPLAIN EXECUTE goes through the same
plan cache), with the statement's generic/custom plan counters.
"""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")
_WRITES = re.compile(r"\b(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


@dataclass
class Executed:
    query: str
    params: object


@dataclass
class PreparedPlan:
    name: str
    generic_plans: int
    custom_plans: int
    plan: str

    @property
    def uses_generic_plan(self) -> bool:
        return self.generic_plans > 0


@contextlib.contextmanager
def recording() -> Iterator[list[Executed]]:
    """Every `Connection.execute` in the block, in order (query text and parameters)."""
    executed: list[Executed] = []
    original = psycopg.Connection.execute

    def execute(self, query, params=None, **kwargs):
        if isinstance(query, str):
            executed.append(Executed(query, params))
        return original(self, query, params, **kwargs)

    psycopg.Connection.execute = execute
    try:
        yield executed
    finally:
        psycopg.Connection.execute = original


def server_text(query: str, params) -> tuple[str, list]:
    """The statement text psycopg sends ($1, $2, ...) and the parameter values in that order."""
    names: list[str] = []
    values: list = []

    def replace(match: re.Match) -> str:
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is None:
            values.append(params[len(values)])
            return f"${len(values)}"
        name = match.group(1)
        if name not in names:
            names.append(name)
            values.append(params[name])
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(replace, query), values


def explain_prepared(conn: psycopg.Connection, executed: Executed, *,
                     force_generic: bool = False) -> PreparedPlan | None:
    """The plan of the statement prepared for `executed` on `conn`, or None when it is not prepared.

    Reads are EXPLAIN ANALYZEd; a statement that writes is only EXPLAINed, because rolling back through psycopg
    would also deallocate every prepared statement of the connection. `force_generic` shows the generic plan
    whatever the plan cache would choose. EXPLAIN EXECUTE counts as one execution in the counters.
    """
    text, values = server_text(executed.query, executed.params)
    cursor = conn.cursor(row_factory=tuple_row)
    found = cursor.execute("SELECT name FROM pg_prepared_statements WHERE statement = %s", (text,),
                           prepare=False).fetchone()
    if found is None:
        return None
    name = found[0]
    writes = _WRITES.search(executed.query) is not None
    options = sql.SQL("COSTS OFF" if writes else "ANALYZE, BUFFERS, COSTS OFF")
    arguments = sql.SQL(", ").join(sql.Literal(value) for value in values)
    explain = sql.SQL("EXPLAIN ({}) EXECUTE {}({})").format(options, sql.Identifier(name), arguments)
    if force_generic:
        cursor.execute("SET plan_cache_mode = force_generic_plan", prepare=False)
    try:
        plan = "\n".join(line for (line,) in cursor.execute(explain, prepare=False).fetchall())
    finally:
        if force_generic:
            cursor.execute("RESET plan_cache_mode", prepare=False)
    generic, custom = cursor.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s", (name,), prepare=False,
    ).fetchone()
    return PreparedPlan(name, generic, custom, plan)
