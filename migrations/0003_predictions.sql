-- depends: 0002_models
-- A forecast request's result; its 30 candles live in prediction_steps.
CREATE TABLE predictions (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    symbol_id        bigint      NOT NULL REFERENCES symbols (id) ON DELETE CASCADE,
    ticker           text        NOT NULL,
    timeframe        text        NOT NULL CHECK (timeframe IN ('1h', '4h', '1d', '1w', '1m')),
    model_id         uuid        NOT NULL REFERENCES models (id),
    last_candle_at   timestamptz NOT NULL,
    last_close       double precision NOT NULL CHECK (last_close > 0),
    horizon          smallint    NOT NULL DEFAULT 30 CHECK (horizon BETWEEN 1 AND 30),
    idempotency_key  text        CHECK (length(idempotency_key) <= 255),
    user_id          uuid,  -- nullable; no users table yet, so no foreign key
    request_hash     text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX predictions_idempotency_key_unique ON predictions (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX predictions_symbol_timeframe_created_idx ON predictions (symbol_id, timeframe, created_at DESC);
CREATE INDEX predictions_request_hash_created_idx ON predictions (request_hash, created_at DESC);
CREATE INDEX predictions_model_idx ON predictions (model_id);
CREATE INDEX predictions_user_idx ON predictions (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX predictions_created_idx ON predictions (created_at);

-- One row per forecast candle. These are expected candles built from the quantile path.
CREATE TABLE prediction_steps (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prediction_id  uuid        NOT NULL REFERENCES predictions (id) ON DELETE CASCADE,
    step           smallint    NOT NULL CHECK (step BETWEEN 1 AND 30),
    ts             timestamptz NOT NULL,
    open           double precision NOT NULL CHECK (open > 0),
    high           double precision NOT NULL,
    low            double precision NOT NULL CHECK (low > 0),
    close          double precision NOT NULL CHECK (close > 0),
    lower_80       double precision NOT NULL,
    upper_80       double precision NOT NULL,
    lower_95       double precision NOT NULL,
    upper_95       double precision NOT NULL,
    confidence     double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    CONSTRAINT prediction_steps_step_unique UNIQUE (prediction_id, step),
    CONSTRAINT prediction_steps_high_low CHECK (high >= low),
    CONSTRAINT prediction_steps_candle CHECK (low <= LEAST(open, close) AND high >= GREATEST(open, close)),
    CONSTRAINT prediction_steps_intervals CHECK (lower_95 <= lower_80 AND lower_80 <= upper_80
                                                 AND upper_80 <= upper_95)
);

CREATE INDEX prediction_steps_ts_idx ON prediction_steps (ts);
