-- depends: 0008_live_outcomes
-- The Score function's due query walks the predictions still to look at in series order (ticker, timeframe, id)
-- from its cursor, instead of sorting every due prediction for each batch: 0.8 s a batch of 200 at 1M due
-- predictions, the backlog's bottleneck. Built in the run's transaction, under its lock and deadline: writes to
-- predictions wait while it builds (1.6-2.6 s at 1M predictions).
CREATE INDEX predictions_score_series_idx ON predictions (ticker, timeframe, id)
    WHERE score_next_at IS DISTINCT FROM 'infinity'::timestamptz;
-- The due share of the table, which the partial due index's own statistics do not give the planner: with it,
-- an hourly run (few due) sorts the due ones through predictions_score_due_idx, a backlog walks the index above.
CREATE STATISTICS predictions_score_due_stats ON (COALESCE(score_next_at, last_candle_at)) FROM predictions;
ANALYZE predictions;
