-- depends: 0007_model_kinds
-- The outcomes the live track record counts: one per model, origin (ticker, timeframe, last candle) and step.
-- Every prediction made from one origin forecasts the same outcome, so model_live_stats folds only the first
-- of them scored: a popular origin counts once, not once per request.
CREATE TABLE live_outcomes (
    model_id  uuid        NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    ticker    text        NOT NULL,
    timeframe text        NOT NULL,
    origin_at timestamptz NOT NULL,
    step      smallint    NOT NULL CHECK (step BETWEEN 1 AND 30),
    ts        timestamptz NOT NULL,
    PRIMARY KEY (model_id, ticker, timeframe, origin_at, step)
);

-- Retention drops the rows no prediction left can match.
CREATE INDEX live_outcomes_ts_idx ON live_outcomes (ts);

-- The outcomes already counted that a copy could still match (a step is scored while inside the 45-day window).
INSERT INTO live_outcomes (model_id, ticker, timeframe, origin_at, step, ts)
SELECT s.model_id, p.ticker, p.timeframe, p.last_candle_at, s.step, min(s.ts)
FROM prediction_scores s JOIN predictions p ON p.id = s.prediction_id
WHERE s.ts > now() - interval '45 days'
GROUP BY 1, 2, 3, 4, 5;
