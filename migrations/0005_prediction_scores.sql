-- depends: 0003_predictions
-- The live track record. A step has matured when the candle at its ts is stored; the Score function then
-- records its outcome here, and folds it into model_live_stats in the same transaction, exactly once.
CREATE TABLE prediction_scores (
    prediction_id    uuid        NOT NULL,
    step             smallint    NOT NULL CHECK (step BETWEEN 1 AND 30),
    model_id         uuid        NOT NULL REFERENCES models (id),
    ts               timestamptz NOT NULL,
    realised_close   double precision NOT NULL CHECK (realised_close > 0),
    inside_80        boolean     NOT NULL,
    inside_95        boolean     NOT NULL,
    confidence       double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    event            boolean     NOT NULL,  -- |C/Ĉ − 1| <= the model's tolerance τ
    pinball          double precision NOT NULL CHECK (pinball >= 0),  -- pin5, % log return
    baseline_pinball double precision NOT NULL CHECK (baseline_pinball >= 0),  -- the model's own baseline
    in_sample        boolean     NOT NULL,  -- the origin lies inside the model's training window
    scored_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prediction_id, step),
    FOREIGN KEY (prediction_id, step) REFERENCES prediction_steps (prediction_id, step) ON DELETE CASCADE
);

CREATE INDEX prediction_scores_model_ts_idx ON prediction_scores (model_id, ts);

-- Running sums per model, in-sample flag, horizon and confidence bin (10 equal-width bins, as the backtest's
-- ECE): every live metric is a sum over at most 600 rows per model, and survives retention of the raw rows.
CREATE TABLE model_live_stats (
    model_id             uuid        NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    in_sample            boolean     NOT NULL,
    horizon              smallint    NOT NULL CHECK (horizon BETWEEN 1 AND 30),
    confidence_bin       smallint    NOT NULL CHECK (confidence_bin BETWEEN 0 AND 9),
    n                    bigint      NOT NULL CHECK (n > 0),
    inside_80            bigint      NOT NULL,
    inside_95            bigint      NOT NULL,
    events               bigint      NOT NULL,
    confidence_sum       double precision NOT NULL,
    pinball_sum          double precision NOT NULL,
    baseline_pinball_sum double precision NOT NULL,
    first_ts             timestamptz NOT NULL,
    last_ts              timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, in_sample, horizon, confidence_bin)
);
