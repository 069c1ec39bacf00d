"""Which stored predictions retention may delete, and the batched delete itself."""

from dataclasses import dataclass
from datetime import datetime

import psycopg

from candlecast.repositories.scores import SETTLED_PREDICTION


def may_delete() -> str:
    """The SQL condition on a prediction `p`, besides its age, under which retention may delete it (its steps
    and their scores cascade). The one place that says so, and what the track record needs: every step
    scored, and so folded into model_live_stats, or given up once its ts left the scoring window without a
    candle. A step still to come is neither, so a prediction is never deleted before its last step."""
    return SETTLED_PREDICTION


@dataclass(frozen=True)
class Batch:
    examined: int
    deleted_ids: list[str]
    last_created_at: datetime | None  # the next batch starts after it

    @property
    def deleted(self) -> int:
        return len(self.deleted_ids)


def delete_expired_batch(conn: psycopg.Connection, cutoff: datetime, after: datetime | None, size: int) -> Batch:
    """One transaction: look at the next `size` predictions created before `cutoff` (oldest first, after
    `after`) and delete those that may go. Rows kept are not looked at again in the same run."""
    row = conn.execute(f"""
        WITH examined AS (
            SELECT id, created_at FROM predictions
            WHERE created_at < %(cutoff)s AND created_at > %(after)s
            ORDER BY created_at
            LIMIT %(size)s
        ), deleted AS (
            DELETE FROM predictions WHERE id IN (
                SELECT p.id FROM predictions p JOIN examined USING (id) WHERE {may_delete()})
            RETURNING id
        )
        SELECT (SELECT count(*) FROM examined) AS examined,
               (SELECT coalesce(array_agg(id::text), '{{}}') FROM deleted) AS deleted_ids,
               (SELECT max(created_at) FROM examined) AS last_created_at
    """, {"cutoff": cutoff, "after": after or datetime.min.replace(tzinfo=cutoff.tzinfo), "size": size}).fetchone()
    return Batch(row["examined"], row["deleted_ids"], row["last_created_at"])


def delete_expired_outcomes(conn: psycopg.Connection, cutoff: datetime) -> int:
    """Forget the counted outcomes (live_outcomes) whose step lies before `cutoff`: a prediction that could still
    match one was created before it, so retention deletes it too. Their sums stay in model_live_stats."""
    return conn.execute("DELETE FROM live_outcomes WHERE ts < %s", (cutoff,)).rowcount
