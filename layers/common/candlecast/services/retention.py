"""Retention: predictions older than PREDICTION_RETENTION_DAYS go, in batches, oldest first, and out of the cache."""

import time
from datetime import UTC, datetime, timedelta

from candlecast import cache, db
from candlecast.config import get_settings
from candlecast.repositories import retention as retention_repository


def run(budget_seconds: float, retention_days: int | None = None) -> dict:
    """Delete expired predictions batch by batch (each its own short transaction) until none is left or the
    budget is spent. What is left is picked up by the next run: `complete` says whether anything was. Each batch's
    predictions are dropped from the cache; `cache_not_dropped` counts those the cache did not take (down: served
    from it until their TTL runs out)."""
    settings = get_settings()
    days = retention_days if retention_days is not None else settings.prediction_retention_days
    if days is None:
        return {"enabled": False}
    cutoff = datetime.now(UTC) - timedelta(days=days)
    deadline = time.monotonic() + budget_seconds
    report = {"enabled": True, "retention_days": days, "cutoff": cutoff.isoformat(), "examined": 0, "deleted": 0,
              "batches": 0, "complete": False, "cache_not_dropped": 0}
    after = None
    with db.connection() as conn:
        while report["batches"] == 0 or time.monotonic() < deadline:
            batch = retention_repository.delete_expired_batch(conn, cutoff, after, settings.retention_batch_size)
            report["batches"] += 1
            report["examined"] += batch.examined
            report["deleted"] += batch.deleted
            if not cache.forget_predictions(batch.deleted_ids):
                report["cache_not_dropped"] += batch.deleted
            if batch.examined < settings.retention_batch_size:
                report["complete"] = True
                break
            after = batch.last_created_at
        if report["complete"]:
            report["outcomes_forgotten"] = retention_repository.delete_expired_outcomes(conn, cutoff)
    return report
