-- depends: 0005_prediction_scores
-- When the Score function next looks at a prediction: the ts of its earliest step still to score inside the
-- scoring window, or 'infinity' once none is left. NULL (a prediction never looked at) counts as its last
-- candle's time. A run reads only the predictions due by now, through the partial index, instead of every
-- step of the 45-day window (which grew with the table: about 2 s a batch at 20k predictions).
-- No backfill: the first run looks at each existing prediction once and sets it.
ALTER TABLE predictions ADD COLUMN score_next_at timestamptz;

CREATE INDEX predictions_score_due_idx ON predictions ((COALESCE(score_next_at, last_candle_at)))
    WHERE score_next_at IS DISTINCT FROM 'infinity'::timestamptz;
