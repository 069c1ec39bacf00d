-- depends: 0001_symbols
-- Trained forecast models; exactly one active per timeframe.
CREATE TABLE models (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    timeframe    text        NOT NULL CHECK (timeframe IN ('1h', '4h', '1d', '1w', '1m')),
    name         text        NOT NULL,
    version      text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('baseline', 'learned')),
    s3_key       text        NOT NULL,
    sha256       text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    accuracy     double precision,
    metrics      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    features     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    train_start  timestamptz,
    train_end    timestamptz,
    is_active    boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    CONSTRAINT models_name_version_unique UNIQUE (name, version),
    CONSTRAINT models_train_range CHECK (train_start IS NULL OR train_end IS NULL OR train_start <= train_end)
);

CREATE UNIQUE INDEX models_one_active_per_timeframe ON models (timeframe) WHERE is_active;
CREATE INDEX models_timeframe_created_idx ON models (timeframe, created_at DESC);
CREATE INDEX models_sha256_idx ON models (sha256);
