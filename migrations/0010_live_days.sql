-- depends: 0009_score_due_series
-- The live 80 % coverage of each model per outcome day (UTC; out-of-sample steps, counted as model_live_stats
-- counts them). Outcomes on nearby days move together, so whether a model has drifted (candlecast.drift) is
-- judged from the spread between blocks of days, not from the count of steps. One row per model and day.
CREATE TABLE model_live_days (
    model_id  uuid   NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    day       date   NOT NULL,
    n         bigint NOT NULL CHECK (n > 0),
    inside_80 bigint NOT NULL CHECK (inside_80 BETWEEN 0 AND n),
    PRIMARY KEY (model_id, day)
);

-- The outcomes already scored whose predictions retention has kept, each origin's first (as when folded).
INSERT INTO model_live_days (model_id, day, n, inside_80)
SELECT model_id, (ts AT TIME ZONE 'UTC')::date, count(*), count(*) FILTER (WHERE inside_80)
FROM (SELECT DISTINCT ON (s.model_id, p.ticker, p.timeframe, p.last_candle_at, s.step) s.model_id, s.ts, s.inside_80
      FROM prediction_scores s JOIN predictions p ON p.id = s.prediction_id
      WHERE NOT s.in_sample
      ORDER BY s.model_id, p.ticker, p.timeframe, p.last_candle_at, s.step, s.prediction_id) first_of_origin
GROUP BY 1, 2;
