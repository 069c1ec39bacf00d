"""pydantic v2 models: what the API accepts and returns, and what repositories take."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from candlecast.errors import InvalidEvent
from candlecast.tickers import MAX_TICKER_LENGTH, TICKER_PATTERN, normalize_ticker
from candlecast.timeframes import Timeframe, closed_since

__all__ = [
    "HealthReport",
    "LiveFigures",
    "Model",
    "ModelCreate",
    "ModelTrackRecord",
    "Prediction",
    "PredictionCreate",
    "PredictionRequest",
    "PredictionStep",
    "PredictionStepCreate",
    "PredictionWithSteps",
    "Symbol",
    "SymbolCreate",
    "Timeframe",
]

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveNumber = Annotated[float, Field(gt=0)]
# Validators are built on first use, not at import: a function builds only the models it validates with
# (health builds none; its models only describe the OpenAPI document).
DEFERRED = ConfigDict(defer_build=True)


class Schema(BaseModel):
    model_config = DEFERRED


class InvocationEvent(Schema):
    """A scheduled function's event (ingest.RefreshEvent, scoring.ScoreEvent): unknown fields are refused, and
    `parse` refuses a bad one with InvalidEvent before anything runs."""

    model_config = ConfigDict(extra="forbid")
    function: ClassVar[str]  # "refresh": InvalidEvent's message begins "refresh event refused"

    @classmethod
    def parse(cls, event: object) -> Self:
        """The event validated, or InvalidEvent naming every field that is wrong (`event` for a whole event that is
        not a JSON object)."""
        try:
            return cls.model_validate(event)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'event'}: {item['msg']}"
                                 for item in error.errors())
            raise InvalidEvent(f"{cls.function} event refused, nothing was run: {problems}") from None


def list_adapter(item: type[BaseModel]) -> TypeAdapter:
    """A TypeAdapter for list[item], built on first use like the models."""
    return TypeAdapter(list[item], config=DEFERRED)


class _Read(Schema):
    model_config = ConfigDict(from_attributes=True)


# volume_24h is numeric(38, 8) (migrations/0001_symbols.sql): an absolute value under 10^30.
MAX_VOLUME_24H = Decimal(10) ** 30


class SymbolCreate(Schema):
    model_config = ConfigDict(extra="forbid")

    ticker: str = Field(..., max_length=32)
    name: str = Field(..., min_length=1, max_length=200)
    base_currency: str = Field(..., min_length=1, max_length=16)
    quote_currency: str = Field(..., min_length=1, max_length=16)
    market: str = "crypto"
    volume_24h: Decimal | None = Field(None, ge=0, lt=MAX_VOLUME_24H)
    volume_rank: int | None = Field(None, ge=1)
    is_active: bool = True
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("ticker")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return normalize_ticker(value)


class Symbol(_Read):
    ticker: str
    name: str
    base_currency: str
    quote_currency: str
    market: str
    volume_24h: float | None = Field(description="the last UTC day's traded value in USD (the quote currency's "
                                                 "volume at that day's rate)")
    volume_rank: int | None
    is_active: bool
    updated_at: datetime
    # Required, as volume_24h is: every answer carries them, and the schema says so to clients.
    candle_timeframes: list[Timeframe] = Field(
        ..., description="timeframes with stored candles: these can be forecast now")
    fetchable: bool = Field(
        ..., description="other timeframes are fetched from Polygon on demand (this deployment has a key)")


ModelKind = Literal["baseline", "learned", "garch-scale", "combined"]
KIND_DESCRIPTION = ("the method the model ships: baseline (EWMA volatility scale), learned (quantile trees), "
                    "garch-scale (the coin's own GARCH(1,1)-t as the scale) or combined (the quantile average of "
                    "the trees, else the baseline, with garch-scale)")


class ModelCreate(Schema):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    timeframe: Timeframe
    name: str = Field(..., max_length=100)
    # in the file's key (storage.versioned_model_key): one path segment
    version: str = Field(..., max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: ModelKind
    s3_key: str = Field(..., max_length=512)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    accuracy: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    features: list[str] = Field(default_factory=list)
    train_start: datetime | None = None
    train_end: datetime | None = None


class Model(_Read):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: UUID
    timeframe: Timeframe
    name: str
    version: str
    kind: str
    s3_key: str
    sha256: str
    accuracy: float | None
    is_active: bool
    created_at: datetime


class PredictionRequest(Schema):
    """The body of POST /predictions."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    symbol: str = Field(..., min_length=1, max_length=MAX_TICKER_LENGTH, json_schema_extra={"pattern": TICKER_PATTERN},
                        description="X:BTCUSD, BTCUSD, BTC-USD or btc-usd", examples=["X:BTCUSDT"])
    timeframe: Timeframe = Field(..., description="1h, 4h, 1d, 1w or 1m (1m = one calendar month)",
                                 examples=["1d"])

    @field_validator("symbol")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return normalize_ticker(value)


class PredictionStepCreate(Schema):
    step: int = Field(..., ge=1, le=30)
    ts: datetime
    open: PositiveNumber
    high: PositiveNumber
    low: PositiveNumber
    close: PositiveNumber
    lower_80: PositiveNumber
    upper_80: PositiveNumber
    lower_95: PositiveNumber
    upper_95: PositiveNumber
    confidence: Probability

    @model_validator(mode="after")
    def _candle_is_consistent(self) -> "PredictionStepCreate":
        if not (self.low <= min(self.open, self.close) and self.high >= max(self.open, self.close)):
            raise ValueError("step candle must satisfy low <= min(open, close) and high >= max(open, close)")
        if not (self.lower_95 <= self.lower_80 <= self.upper_80 <= self.upper_95):
            raise ValueError("interval bounds must be nested: lower_95 <= lower_80 <= upper_80 <= upper_95")
        return self


class PredictionStep(PredictionStepCreate, _Read):
    pass


class PredictionCreate(Schema):
    model_config = ConfigDict(protected_namespaces=())

    symbol_id: int
    ticker: str
    timeframe: Timeframe
    model_id: UUID
    last_candle_at: datetime
    last_close: PositiveNumber
    idempotency_key: str | None = Field(None, max_length=255)
    user_id: UUID | None = None
    steps: list[PredictionStepCreate] = Field(..., min_length=30, max_length=30)


class Prediction(_Read):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: UUID
    ticker: str
    timeframe: Timeframe
    model_id: UUID
    model_name: str | None = None
    model_version: str | None = None
    last_candle_at: datetime
    last_close: float
    horizon: int
    created_at: datetime

    @computed_field(description="How many candles after `last_candle_at` had already closed when the forecast was "
                                "made: 0 when its first step is the candle then still open; n when its first n steps "
                                "were already in the past (the stored candles were behind and Polygon could not "
                                "catch them up).")
    @property
    def data_age_bars(self) -> int:
        return closed_since(self.last_candle_at, self.timeframe, self.created_at)

    @computed_field(description="Whether the forecast was made from candles that were behind: data_age_bars > 0.")
    @property
    def stale(self) -> bool:
        return self.data_age_bars > 0


class PredictionWithSteps(Prediction):
    steps: list[PredictionStep]


class DependencyCheck(Schema):
    status: Literal["up", "degraded", "down"] = Field(
        description="degraded: it answers but does not do all it should (the cache refusing writes)")
    latency_ms: float
    error: str | None = Field(None, description="why it is down or degraded (the error's class or our message)")


class HealthChecks(Schema):
    database: DependencyCheck
    cache: DependencyCheck
    storage: DependencyCheck


class ModelStatus(Schema):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["active", "file_missing", "missing", "unknown"] = Field(
        description="active: registered, its file and signature in storage; file_missing: registered, but its file "
                    "or signature is not in storage (the report is degraded: scoring, and creates unless the function "
                    "ships that very file, fail for the timeframe); "
                    "missing: no model registered; unknown while the database, which registers the models, or "
                    "storage, which holds their files, cannot be read")
    name: str | None = None
    version: str | None = None
    kind: str | None = Field(None, description=KIND_DESCRIPTION)
    drift: bool | None = Field(None, description="true when this model's live coverage has drifted")


class Drift(Schema):
    live_coverage_80: float
    matured_steps: int
    standard_error: float = Field(..., description="of live_coverage_80, from the spread between blocks of "
                                                   "outcome days (a week, or 30 candles from 1d)")
    recent_coverage_80: float | None = Field(
        None, description="the 80 % coverage of the recent run of blocks whose CUSUM calls drift after a record "
                          "that was good before it; null when only the whole record is off")
    recent_steps: int | None = Field(None, description="outcomes in that run")
    recent_days: int | None = Field(None, description="outcome days (candles from 1d) in that run")


class HealthReport(Schema):
    """GET /health: 200 "ok" or "degraded" (cache or storage down, the cache refusing writes, or an active model's
    file or signature not in storage), 503 "down" (the database is)."""

    status: Literal["ok", "degraded", "down"]
    checks: HealthChecks
    models: dict[Timeframe, ModelStatus] = Field(..., description="the active model of each timeframe")
    drift: dict[Timeframe, Drift] = Field(
        default_factory=dict, description="timeframes whose live 80 % coverage lies outside [0.72, 0.88] and 3 "
                                         "standard errors from 0.80, over at least 5 blocks of outcome days, or "
                                         "whose recent blocks' CUSUM passes its limit over a run outside [0.72, "
                                         "0.88]")


class HorizonCoverage(Schema):
    h: int = Field(..., ge=1, le=30)
    n: int | None = None
    coverage_80: float | None
    coverage_95: float | None


class ReliabilityBin(Schema):
    """One of 10 equal-width confidence bins: mean stated confidence against how often the event happened."""

    mean_confidence: float
    observed: float
    n: int


class LiveFigures(Schema):
    """Scored steps of a model. `in_sample` figures come from origins inside its training window (a replay)."""

    in_sample: bool
    n_scored: int
    period_start: datetime | None = Field(None, description="ts of the first scored step")
    period_end: datetime | None = Field(None, description="ts of the last scored step")
    coverage_80: float | None
    coverage_80_standard_error: float | None = Field(
        None, description="live figures only: of coverage_80, from the spread between blocks of outcome days (a "
                          "week, or 30 candles from 1d), as `drift` judges it; null with fewer than 5 blocks")
    coverage_95: float | None
    ece: float | None = Field(None, description="confidence ECE, 10 equal-width bins")
    pinball: float | None = Field(None, description="mean pin5 loss, % log return")
    baseline_pinball: float | None = Field(None, description="the same for the model's own baseline")
    pinball_skill: float | None = Field(None, description="1 − pinball / baseline_pinball")
    mean_confidence: float | None
    hit_rate: float | None = Field(None, description="how often |C/Ĉ − 1| ≤ τ happened")
    coverage_by_horizon: list[HorizonCoverage] | None = None
    reliability: list[ReliabilityBin] | None = None


class BacktestFigures(Schema):
    """The walk-forward test figures registered with the model."""

    coverage_80: float | None = None
    coverage_95: float | None = None
    ece: float | None = None
    pinball_skill: float | None = None
    n_pairs: int | None = None
    n_origins: int | None = None
    coverage_by_horizon: list[HorizonCoverage] | None = None
    reliability: list[ReliabilityBin] | None = Field(
        None, description="10 confidence bins; per-horizon (mean confidence, hit rate) for older manifests")


class ModelSummary(Schema):
    model_config = ConfigDict(protected_namespaces=())

    id: UUID
    name: str
    version: str
    kind: str = Field(description=KIND_DESCRIPTION)
    accuracy: float | None = Field(
        None, description="live 80 % coverage: the share of out-of-sample matured steps whose close fell inside "
                          "the 80 % interval (near 0.80 when calibrated); null before any score. The backtest's is "
                          "backtest.coverage_80, the manifest's `accuracy`")
    train_start: datetime | None
    train_end: datetime | None


class ModelTrackRecord(Schema):
    """A timeframe's active model with its backtest and live figures."""

    model_config = ConfigDict(protected_namespaces=())

    timeframe: Timeframe
    model: ModelSummary
    backtest: BacktestFigures
    live: LiveFigures
    replay: LiveFigures | None = Field(None, description="in-sample replay (origins inside the training window)")
    drift: bool = Field(..., description="live 80 % coverage outside [0.72, 0.88] and 3 standard errors from "
                                         "0.80, or a recent run of blocks off (GET /health's drift)")


class ErrorDetail(Schema):
    code: str = Field(..., examples=["symbol_not_found"])
    message: str = Field(..., examples=["unknown symbol X:NOPEUSD"])


class ErrorResponse(Schema):
    """The one shape of every error body."""

    error: ErrorDetail
