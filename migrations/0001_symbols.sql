-- Tradable crypto pairs, ranked by 24 h quote-currency volume.
CREATE TABLE symbols (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticker          text        NOT NULL,
    name            text        NOT NULL,
    base_currency   text        NOT NULL,
    quote_currency  text        NOT NULL,
    market          text        NOT NULL DEFAULT 'crypto',
    volume_24h      numeric(38, 8) CHECK (volume_24h >= 0),
    volume_rank     integer     CHECK (volume_rank >= 1),
    is_active       boolean     NOT NULL DEFAULT true,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT symbols_ticker_unique UNIQUE (ticker),
    CONSTRAINT symbols_ticker_format CHECK (ticker ~ '^X:[A-Z0-9]{2,24}$')
);

-- Prefix search on ticker and on lower(name); ranking by volume among active symbols.
CREATE INDEX symbols_ticker_prefix_idx ON symbols (ticker text_pattern_ops);
CREATE INDEX symbols_lower_name_prefix_idx ON symbols (lower(name) text_pattern_ops);
CREATE INDEX symbols_base_currency_idx ON symbols (base_currency);
CREATE INDEX symbols_active_volume_idx ON symbols (volume_24h DESC NULLS LAST) WHERE is_active;
