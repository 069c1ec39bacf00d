"""`candlecast seed`: load the committed sample into a stack.

Upserts every symbol of data/symbols.csv, uploads data/ and models/ to the bucket (laid out as the bucket is),
and registers each model of models/manifest.json as its timeframe's active model (with a versioned copy).
Then it builds a track record: predictions at past origins of every sample series, made by the forecasting
service as a request would make them, scored against the stored candles that followed. `--as-of` (operator
only; never an API parameter) sets the first origin. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from candlecast.forecast.artifact import sha256_hex

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = ROOT / "data"
DEFAULT_MODELS_DIR = ROOT / "models"
SYMBOLS_FILE = "symbols.csv"
MANIFEST_FILE = "manifest.json"


TRACK_RECORD_ORIGINS = 15  # origins per series when no --as-of is given
TRACK_RECORD_STRIDE = 4  # candles between two origins
BATCH_DB_SECONDS = 60  # per statement and per connection wait while seeding


@dataclass
class SeedReport:
    symbols: int = 0
    data_files: int = 0
    model_files: int = 0
    models: dict[str, str] = field(default_factory=dict)  # timeframe -> "name version"
    past_predictions: int = 0
    scored_steps: int = 0

    def summary(self) -> str:
        models = ", ".join(f"{tf}: {name}" for tf, name in self.models.items()) or "none"
        return (f"seeded {self.symbols} symbols, uploaded {self.data_files} data and "
                f"{self.model_files} model files, active models: {models}; track record: "
                f"{self.past_predictions} predictions at past origins, {self.scored_steps} steps scored")


def read_symbols(path: Path) -> list:
    """data/symbols.csv as SymbolCreate rows.

    Columns: ticker,name,base_currency,quote_currency,volume_24h,volume_rank,source.
    """
    from candlecast.schemas import SymbolCreate

    with path.open(newline="", encoding="utf-8") as handle:
        return [
            SymbolCreate(
                ticker=row["ticker"],
                name=row["name"],
                base_currency=row["base_currency"],
                quote_currency=row["quote_currency"],
                volume_24h=Decimal(row["volume_24h"]) if row.get("volume_24h") else None,
                volume_rank=int(row["volume_rank"]) if row.get("volume_rank") else None,
                metadata={**({"source": row["source"]} if row.get("source") else {}),
                          "candle_timeframes": stored_timeframes(path.parent, row["ticker"])},
            )
            for row in csv.DictReader(handle)
        ]


def stored_timeframes(data_dir: Path, ticker: str) -> list[str]:
    """The timeframes data/ holds candles for (the bucket gets the same files)."""
    from candlecast.tickers import normalize_ticker, storage_name
    from candlecast.timeframes import TIMEFRAMES

    folder = data_dir / storage_name(normalize_ticker(ticker))
    return [timeframe for timeframe in TIMEFRAMES if (folder / f"{timeframe}.parquet").is_file()]


def read_manifest(models_dir: Path) -> dict[str, dict[str, Any]]:
    """models/manifest.json as {timeframe: entry}: {tf: {...}}, {"models": {...}} or a list of entries."""
    path = models_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if isinstance(data, list):
        return {entry["timeframe"]: entry for entry in data}
    from candlecast.timeframes import TIMEFRAMES

    return {tf: entry for tf, entry in data.items() if tf in TIMEFRAMES}


def _timestamp(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def seed_symbols(data_dir: Path) -> int:
    from candlecast import cache, db
    from candlecast.repositories.symbols import upsert_symbols

    path = data_dir / SYMBOLS_FILE
    if not path.is_file():
        print(f"no {path}; no symbols seeded")
        return 0
    symbols = read_symbols(path)
    with db.connection() as conn:
        count = upsert_symbols(conn, symbols)
    cache.invalidate_symbols()
    print(f"symbols: {count} upserted from {path}")
    return count


def _signature(model_file: Path, resign: bool) -> str:
    """The file's signature under the configured key: the committed .sig when it verifies, or (with
    --resign, for a deployment whose key differs from the one the models were trained with) a new one."""
    from candlecast.config import get_settings, model_signing_key
    from candlecast.errors import ModelIntegrityError
    from candlecast.forecast import artifact

    key = model_signing_key(get_settings())
    data = model_file.read_bytes()
    signature_file = model_file.with_name(model_file.name + ".sig")
    committed = signature_file.read_text().strip() if signature_file.is_file() else None
    try:
        artifact.verify(data, committed, key)
        return committed
    except ModelIntegrityError as error:
        if resign:
            return artifact.sign(data, key)
        raise ModelIntegrityError(
            f"{model_file}: {error.message}; its sha256 matches models/manifest.json, so run "
            "`candlecast seed --resign` to sign it with the configured key"
        ) from None


def checked_models(models_dir: Path, resign: bool = False) -> list[tuple[str, dict[str, Any], Path, str, str]]:
    """(timeframe, manifest entry, file, sha256, signature) for every manifest model; raises before anything
    is uploaded when a file is missing, its sha256 differs from the manifest's, or its signature does not
    verify under the configured key (unless `resign`)."""
    checked = []
    for timeframe, entry in read_manifest(models_dir).items():
        model_file = models_dir / str(entry.get("file") or f"{timeframe}.pkl")
        if not model_file.is_file():
            raise FileNotFoundError(f"manifest lists {timeframe} but {model_file} does not exist")
        sha256 = sha256_hex(model_file.read_bytes())
        if entry.get("sha256") and entry["sha256"] != sha256:
            raise ValueError(f"{model_file}: sha256 {sha256} does not match the manifest's {entry['sha256']}")
        checked.append((timeframe, entry, model_file, sha256, _signature(model_file, resign)))
    return checked


def register_models(models: list[tuple[str, dict[str, Any], Path, str, str]], progress: bool = True) -> dict[str, str]:
    """Upload each checked model to its versioned key, register the row that names that immutable key,
    then refresh the timeframe's `models/{tf}.pkl` copy. A reader never sees a row whose file is not there."""
    from candlecast import db, storage
    from candlecast.repositories.models import register_model
    from candlecast.schemas import ModelCreate

    registered = {}
    items: Any = models
    if progress:
        from tqdm import tqdm

        items = tqdm(models, desc="register models", unit="model")
    for timeframe, entry, model_file, sha256, signature in items:
        version = str(entry["version"])
        name = str(entry.get("name") or f"{timeframe}-model")
        versioned_key = storage.versioned_model_key(timeframe, version)
        model = ModelCreate(
            timeframe=timeframe,
            name=name,
            version=version,
            kind=entry.get("kind") or ("baseline" if "baseline" in name.lower() else "learned"),
            s3_key=versioned_key,
            sha256=sha256,
            accuracy=None,  # the live 80 % coverage, set by scoring (the backtest's figures stay in metrics)
            metrics=entry.get("metrics") or {},
            features=list(entry.get("features") or []),
            train_start=_timestamp(entry.get("train_start")),
            train_end=_timestamp(entry.get("train_end")),
        )
        _put_model(versioned_key, model_file, signature)
        with db.connection() as conn:
            register_model(conn, model, activate=True)
        _put_model(storage.active_model_key(timeframe), model_file, signature)
        registered[timeframe] = f"{name} {version}"
    return registered


def _put_model(key: str, model_file: Path, signature: str) -> None:
    from candlecast import storage

    storage.put_bytes(key, model_file.read_bytes())
    storage.put_bytes(storage.signature_key(key), signature.encode(), "text/plain")


def past_origins(open_times, as_of: datetime | None, stride: int = TRACK_RECORD_STRIDE) -> list[int]:
    """Indices of the origin candles: from the first candle at or after `as_of` (default: the last
    TRACK_RECORD_ORIGINS origins), every `stride` candles, leaving at least one candle after each to score."""
    count = len(open_times)
    if as_of is None:
        first = max(2, count - 1 - stride * TRACK_RECORD_ORIGINS)
    else:
        first = next((i for i, ts in enumerate(open_times) if ts >= as_of.timestamp()), count)
    return list(range(max(first, 2), count - 1, stride))


def build_track_record(data_dir: Path, as_of: datetime | None = None, progress: bool = True) -> tuple[int, int]:
    """Predictions at past origins of every sample series with an active model, then scored.

    Returns (new predictions, newly scored steps). Each prediction sees only the candles up to its origin.
    """
    from candlecast import db, storage
    from candlecast.repositories.models import get_all_active_models
    from candlecast.services import forecasting, scoring
    from candlecast.tickers import normalize_ticker

    with db.connection() as conn:
        timeframes = [row["timeframe"] for row in get_all_active_models(conn)]
    series = sorted((path.parent.name, path.stem) for path in data_dir.glob("*/*.parquet") if path.stem in timeframes)
    work = []
    for name, timeframe in series:
        ticker = normalize_ticker(name)
        candles = storage.read_all_candles(ticker, timeframe)
        if candles is not None:
            work += [(ticker, timeframe, candles, index) for index in past_origins(candles.open_time, as_of)]
    items: Any = work
    if progress:
        from tqdm import tqdm

        items = tqdm(work, desc="past forecasts", unit="forecast")
    created = sum(forecasting.create_as_of(ticker, tf, candles.head(index + 1)) for ticker, tf, candles, index in items)
    report = scoring.run(float("inf"), since=scoring.EVERYTHING_SINCE)
    return created, report.scored


def seed(data_dir: Path = DEFAULT_DATA_DIR, models_dir: Path = DEFAULT_MODELS_DIR, *,
         progress: bool = True, resign: bool = False, track_record: bool = False,
         as_of: datetime | None = None) -> SeedReport:
    """Symbols into the database, data/ and models/ into the bucket, models registered, and (with
    `track_record`, as the CLI and `make run` do) a track record from past origins. Idempotent."""
    from candlecast import cache, db, storage

    report = SeedReport()
    models = checked_models(models_dir, resign) if models_dir.is_dir() else []
    with db.batch(BATCH_DB_SECONDS):  # batch work: not a request's 1 s bound
        report.symbols = seed_symbols(data_dir)
        if data_dir.is_dir():
            report.data_files = storage.upload_directory(data_dir, "data", progress=progress)
        if models_dir.is_dir():
            if not models:
                print(f"no models in {models_dir / MANIFEST_FILE}; none registered")
            # Each file and its signature land on their keys before the row that names them.
            report.model_files = 2 * len(models)
            report.models = register_models(models, progress=progress)
            cache.invalidate_track_record()
        if track_record and data_dir.is_dir() and report.models:
            report.past_predictions, report.scored_steps = build_track_record(data_dir, as_of, progress)
    return report


def _run(args: argparse.Namespace) -> int:
    if args.bucket:
        from candlecast.config import get_settings

        os.environ["DATA_BUCKET"] = args.bucket  # storage reads the bucket from the settings
        get_settings.cache_clear()
    report = seed(Path(args.data), Path(args.models), progress=not args.quiet, resign=args.resign,
                  track_record=not args.no_track_record, as_of=args.as_of)
    print(report.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("seed", help="load data/, models/ and data/symbols.csv into the stack",
                                   description=__doc__)
    parser.add_argument("--bucket", help="target bucket (default: DATA_BUCKET)")
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="local data directory (default: data/)")
    parser.add_argument("--models", default=str(DEFAULT_MODELS_DIR), help="local models directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resign", action="store_true",
                        help="sign the model files with the configured key (MODEL_SIGNING_KEY[_SECRET_ARN]) after "
                             "checking each against models/manifest.json")
    parser.add_argument("--as-of", type=_as_of, metavar="ISO_TIME",
                        help="operator only: the first past origin of the track record's predictions, e.g. "
                             f"2021-11-01T00:00Z (default: the last {TRACK_RECORD_ORIGINS} origins of each series, "
                             f"{TRACK_RECORD_STRIDE} candles apart)")
    parser.add_argument("--no-track-record", action="store_true", help="no predictions at past origins")
    parser.set_defaults(func=_run)


def _as_of(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {value!r} (e.g. 2021-11-01T00:00Z)") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment > datetime.now(UTC):
        raise argparse.ArgumentTypeError(f"{value} is in the future: the track record starts at a past origin")
    return moment
