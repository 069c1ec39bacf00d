"""`candlecast seed`: load the committed sample into a stack.

Upserts every symbol of data/symbols.csv, uploads the files of data/ the bucket does not hold yet (a candle file it
holds, which Refresh keeps current, is never replaced: `candlecast put-candles` replaces one), uploads models/
(laid out as the bucket is) and registers each model of models/manifest.json as its timeframe's active model (with
a versioned copy). Then it builds a track record: predictions at past origins of every sample series, made by the
forecasting service as a request would make them, scored against the stored candles that followed. The origins lie
after each model's training window (`train_end`), so the scores are live figures; it says so plainly when the
stored candles end before that window does. A model whose track record an earlier seed built gets none again,
unless that seed was interrupted: then the rest of its past forecasts. `--as-of` (operator only; never an API
parameter) sets the first origin instead. Running it twice changes nothing the second time.

`candlecast install-models` uploads and registers the models alone: a release's models on a running stack.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from candlecast.errors import UnusableInput
from candlecast.forecast.artifact import sha256_hex

if TYPE_CHECKING:
    from candlecast.schemas import ModelCreate
    from candlecast.storage import WrittenFile

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = ROOT / "data"
DEFAULT_MODELS_DIR = ROOT / "models"
SYMBOLS_FILE = "symbols.csv"
MANIFEST_FILE = "manifest.json"


TRACK_RECORD_ORIGINS = 15  # at most, per series, when no --as-of is given
TRACK_RECORD_STRIDE = 4  # candles between two origins
BATCH_DB_SECONDS = 60  # per statement and per connection wait while seeding


@dataclass
class SeedReport:
    symbols: int = 0
    data_files: int = 0
    data_files_kept: int = 0  # held by the bucket already, left as they were
    model_files: int = 0
    models: dict[str, str] = field(default_factory=dict)  # timeframe -> "name version"
    past_predictions: int = 0
    scored_steps: int = 0
    no_live: list[str] = field(default_factory=list)  # timeframes whose past origins are all in-sample (or unknown)
    plans: list[TrackRecordPlan] = field(default_factory=list)  # the track record's origins, per timeframe

    def summary(self) -> str:
        models = ", ".join(f"{tf}: {name}" for tf, name in self.models.items()) or "none"
        kept = (f" (kept {self.data_files_kept} the bucket holds already; `candlecast put-candles` replaces a "
                "candle file)" if self.data_files_kept else "")
        return (f"seeded {self.symbols} symbols, uploaded {self.data_files} data{kept} and "
                f"{self.model_files} model files, active models: {models}; track record: "
                f"{self.past_predictions} predictions at past origins, {self.scored_steps} steps scored"
                + (f"; NO LIVE FIGURES for {', '.join(self.no_live)} (see above)" if self.no_live else ""))


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
    data = json.loads(path.read_text(), parse_constant=lambda name: _not_json(path, name))
    from candlecast.timeframes import TIMEFRAMES

    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if isinstance(data, list):
        data = {entry.get("timeframe") if isinstance(entry, dict) else None: entry for entry in data}
    if not isinstance(data, dict):
        raise UnusableInput(f"{path} is not an object of models by timeframe, nor a list of them")
    # A model under another name (1H, daily) would be left out, and the release installed without it.
    if unknown := [str(tf) for tf in data if tf not in TIMEFRAMES]:
        raise UnusableInput(f"{path} names models by {', '.join(unknown)}, which are no timeframes (the timeframes: "
                            f"{', '.join(TIMEFRAMES)}); nothing uploaded or registered")
    return data


def _not_json(path: Path, name: str):
    raise UnusableInput(f"{path} holds {name}, which is not JSON (the models table refuses it): write the figure as "
                     "null, as `candlecast train` does for a horizon no test outcome reached")


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
    symbols = read_symbols(path)
    with db.connection() as conn:
        count = upsert_symbols(conn, symbols)
    print(f"symbols: {count} upserted from {path}")
    if not cache.invalidate_symbols(retry=True):
        print(f"cache: Redis did not take the invalidation; symbols cached before are served for up to "
              f"{cache.SYMBOLS_STALE_SECONDS} s (seed again, or wait)")
    return count


def _signature(model_file: Path, data: bytes, key: bytes, resign: bool, sha256_checked: bool) -> str:
    """The file's signature under the configured key: the committed .sig when it verifies, or (with
    --resign, for a deployment whose key differs from the one the models were trained with) a new one, for a
    file whose sha256 the manifest gives (checked already): never a blind signature of whatever is there."""
    from candlecast.errors import ModelIntegrityError
    from candlecast.forecast import artifact

    signature_file = model_file.with_name(model_file.name + ".sig")
    committed = signature_file.read_text().strip() if signature_file.is_file() else None
    try:
        artifact.verify(data, committed, key)
        return committed
    except ModelIntegrityError as error:
        if resign and sha256_checked:
            return artifact.sign(data, key)
        if resign:
            raise UnusableInput(f"signature: {error.message}; the manifest gives no sha256 to check the file "
                                "against, so --resign does not sign it") from None
        raise UnusableInput(
            f"signature: {error.message}"
            + ("; its sha256 matches models/manifest.json, so run with --resign to sign it with the configured key"
               if sha256_checked else "")
        ) from None


class CheckedModel(NamedTuple):
    """A manifest model that passed every check: the row to register, its file and the signature to upload."""

    timeframe: str
    model: ModelCreate
    file: Path
    signature: str


def checked_models(models_dir: Path, resign: bool = False) -> list[CheckedModel]:
    """Every manifest model, checked before anything is uploaded or registered (`_checked_model`). When any is
    refused, UnusableInput with one line per refused entry (its timeframe and the fields at fault): a release is
    installed whole or not at all."""
    from candlecast.config import get_settings, model_signing_key

    manifest = read_manifest(models_dir)
    key = model_signing_key(get_settings()) if manifest else b""
    registered = _registered_files() if manifest else []
    checked, refused = [], []
    for timeframe, entry in manifest.items():
        try:
            checked.append(_checked_model(models_dir, timeframe, entry, key, resign, registered))
        except UnusableInput as error:
            refused.append(f"{timeframe}: {error}")
    if refused:
        raise UnusableInput(f"{len(refused)} of the {len(manifest)} models of {models_dir / MANIFEST_FILE} refused; "
                            "nothing uploaded or registered:\n  " + "\n  ".join(refused))
    return checked


def _registered_files() -> list[dict]:
    from candlecast import db
    from candlecast.repositories.models import get_registered_model_files

    with db.connection() as conn:
        return get_registered_model_files(conn)


def _checked_model(models_dir: Path, timeframe: str, entry: Any, key: bytes, resign: bool,
                   registered: list[dict]) -> CheckedModel:
    """One manifest entry as the row it registers, or UnusableInput naming what is wrong: a field the models row
    refuses (no version, an unknown kind, a date that is none), a missing file, a sha256 other than the manifest's,
    a name and version (or versioned key) registered with another file (`_taken`), a signature that does not verify
    (`_signature`), or a file holding another model than the entry names (the service's own check,
    `require_registered`, after the signature and sha256 are verified: nothing unverified is unpickled)."""
    from candlecast.errors import ModelIntegrityError
    from candlecast.forecast import artifact
    from candlecast.services.model_loading import require_registered

    if not isinstance(entry, dict):
        raise UnusableInput(f"not a JSON object: {type(entry).__name__}")
    model_file = models_dir / str(entry.get("file") or f"{timeframe}.pkl")
    data = model_file.read_bytes() if model_file.is_file() else None
    sha256 = sha256_hex(data) if data is not None else None
    problems = []
    if data is None:
        problems.append(f"file: {model_file} does not exist")
    elif entry.get("sha256") and entry["sha256"] != sha256:
        problems.append(f"sha256: {model_file}'s is {sha256}, not the manifest's {entry['sha256']}")
    model, invalid = _model_row(timeframe, entry, sha256 or "0" * 64)
    problems += invalid
    if model is not None and not problems:
        problems += _taken(model, registered)
    if problems:
        raise UnusableInput("; ".join(problems))
    signature = _signature(model_file, data, key, resign, sha256_checked=bool(entry.get("sha256")))
    try:
        require_registered(artifact.verify_and_load(data, signature, key, sha256), model.model_dump())
    except ModelIntegrityError as error:
        raise UnusableInput(f"file: {error.message}") from None
    return CheckedModel(timeframe, model, model_file, signature)


def _model_row(timeframe: str, entry: dict[str, Any], sha256: str) -> tuple[ModelCreate | None, list[str]]:
    """(the models row `entry` registers, None when it cannot be built; what is wrong with its fields)."""
    from pydantic import ValidationError

    from candlecast import storage
    from candlecast.schemas import ModelCreate

    problems = []
    version = entry.get("version")
    if version is None or str(version) == "":
        problems.append("version: missing")
    name = str(entry.get("name") or f"{timeframe}-model")
    dates = {}
    for field_name in ("train_start", "train_end"):
        try:
            dates[field_name] = _timestamp(entry.get(field_name))
        except (ValueError, TypeError, OverflowError, OSError):
            problems.append(f"{field_name}: not an ISO time or a Unix time: {entry.get(field_name)!r}"[:200])
    try:  # the other fields' problems too, on the same line
        model = ModelCreate(
            timeframe=timeframe,
            name=name,
            version=str(version),
            kind=entry.get("kind") or ("baseline" if "baseline" in name.lower() else "learned"),
            s3_key=storage.versioned_model_key(timeframe, str(version)),
            sha256=sha256,
            accuracy=None,  # the live 80 % coverage, set by scoring (the backtest's figures stay in metrics)
            metrics=entry.get("metrics") or {},
            features=entry.get("features") or [],
            **dates,
        )
    except ValidationError as error:
        model = None
        problems += [f"{'.'.join(map(str, item['loc']))}: {item['msg']}"[:200] for item in error.errors()]
    return (None if problems else model), problems


def _taken(model: ModelCreate, registered: list[dict]) -> list[str]:
    """Why `model` cannot be registered over a row of `registered`: its name and version, or its versioned file's
    key, held by a row of another file. Predictions name that row and the file it was made with; registering
    the same file again (a release installed twice) is no change, but for its metrics; a kind or training window
    other than the row's is a manifest edited by mistake, which would move the track record's first origin into
    the data the model was trained on (a row without a date takes the manifest's)."""
    for row in registered:
        if row["sha256"] == model.sha256:
            if (row["name"], row["version"]) == (model.name, model.version):
                return [f"{field}: {model.name} {model.version} is registered with {field} {row[field]}, and the "
                        f"manifest says {getattr(model, field)}; a file's kind and training window do not change"
                        for field in ("kind", "train_start", "train_end")
                        if row[field] is not None and row[field] != getattr(model, field)]
            continue
        if (row["name"], row["version"]) == (model.name, model.version):
            return [f"version: {model.name} {model.version} is registered with another file (sha256 "
                    f"{row['sha256'][:12]}…); a changed model needs a new version"]
        if row["s3_key"] == model.s3_key:
            return [f"version: {model.s3_key} is the file of the registered {row['name']} {row['version']} (another "
                    "file); give this model a version of its own"]
    return []


def register_models(models: list[CheckedModel], progress: bool = True) -> dict[str, str]:
    """Upload each checked model to its versioned key, register the row that names that immutable key (never
    written over with another file: `_taken`, and `register_model`'s ModelVersionTaken should one be registered
    since), then refresh the timeframe's `models/{tf}.pkl` copy. A reader never sees a row whose file is not
    there. The cached model answers (GET /models) are dropped once any row changed, even when a later model
    failed or the run was interrupted: they would name the models before it for 10 minutes."""
    from candlecast import cache, db, storage
    from candlecast.repositories.models import register_model

    registered = {}
    items: Any = models
    if progress:
        from tqdm import tqdm

        items = tqdm(models, desc="register models", unit="model")
    try:
        for timeframe, model, model_file, signature in items:
            _put_model(model.s3_key, model_file, signature)
            with db.connection() as conn:
                register_model(conn, model, activate=True)
            registered[timeframe] = f"{model.name} {model.version}"
            _put_model(storage.active_model_key(timeframe), model_file, signature)
    finally:
        if registered:
            cache.invalidate_track_record()
    return registered


def _put_model(key: str, model_file: Path, signature: str) -> None:
    from candlecast import storage

    storage.put_bytes(key, model_file.read_bytes())
    storage.put_bytes(storage.signature_key(key), signature.encode(), "text/plain")


def past_origins(open_times, *, train_end: datetime | None = None, as_of: datetime | None = None,
                 min_history: int = 2, stride: int = TRACK_RECORD_STRIDE,
                 most: int = TRACK_RECORD_ORIGINS) -> list[int]:
    """Indices of the origin candles of one series (open times ascending), each with at least `min_history`
    candles up to it and one after it to score.

    - `as_of` (operator): every `stride` candles from the first that opens at or after it, in- or out-of-sample.
    - `train_end`: out of sample, up to `most` origins spread evenly (at least `stride` apart) over the
      candles that open after the model's training window; none when no candle does.
    - neither: the last `most` origins, `stride` apart (an in-sample replay when the model saw them).
    """
    import numpy as np

    times = np.asarray(open_times)
    last = len(times) - 2
    if as_of is not None:
        first = int(np.searchsorted(times, as_of.timestamp(), side="left"))
        return list(range(max(first, min_history), last + 1, stride))
    if train_end is not None:
        first = int(np.searchsorted(times, train_end.timestamp(), side="right"))
    else:
        first = last - stride * (most - 1)
    first = max(first, min_history)
    if first > last:
        return []
    spread = np.linspace(first, last, min(most, (last - first) // stride + 1))
    return sorted({int(index) for index in spread.round()})


@dataclass
class TrackRecordPlan:
    """The past origins of one timeframe's stored series, and how they relate to its model's training window."""

    timeframe: str
    train_end: datetime | None
    mode: str  # "as-of", "live" (after train_end), "replay" (nothing after train_end) or "none"
    origins: list[tuple[str, Any, int]]  # (ticker, candles, origin index)
    series: int
    sample_end: datetime | None

    def describe(self) -> str:
        end = self.train_end.strftime("%Y-%m-%dT%H:%MZ") if self.train_end else "unknown"
        sample_end = self.sample_end.strftime("%Y-%m-%dT%H:%MZ") if self.sample_end else "none"
        count = f"{len(self.origins)} origins in {len({t for t, _, _ in self.origins})} of {self.series} series"
        if self.mode == "as-of" and self.train_end is None:
            return f"track record {self.timeframe}: --as-of: {count}; the model has no train_end, so all count as live"
        if self.mode == "as-of":
            return f"track record {self.timeframe}: --as-of: {count}; those up to train_end {end} are in-sample replays"
        if self.mode == "live":
            return f"track record {self.timeframe}: {count} after the model's training window (train_end {end}): live"
        if self.mode == "replay":
            return (f"track record {self.timeframe}: NO LIVE FIGURES: no stored candle opens after the model's "
                    f"train_end {end} (the sample ends {sample_end}); {count} replayed in-sample, reported "
                    "as `replay`, never as live")
        return (f"track record {self.timeframe}: none: the model has no train_end, so a past origin cannot be "
                "told apart from its training data")


def plan_track_record(model_row: dict, model, stored: list[tuple[str, Any]], as_of: datetime | None) -> TrackRecordPlan:
    """Which past origins of `stored` [(ticker, candles)] the track record of `model_row`'s timeframe uses."""
    train_end = model_row["train_end"]
    ends = [int(candles.open_time[-1]) for _, candles in stored if len(candles.open_time)]
    sample_end = datetime.fromtimestamp(max(ends), UTC) if ends else None
    history = max(2, model.config.min_history)

    def origins(**where) -> list[tuple[str, Any, int]]:
        return [(ticker, candles, index) for ticker, candles in stored
                for index in past_origins(candles.open_time, min_history=history, **where)]

    if as_of is not None:
        mode, chosen = "as-of", origins(as_of=as_of)
    elif train_end is None:
        mode, chosen = "none", []
    elif chosen := origins(train_end=train_end):
        mode = "live"
    else:
        mode, chosen = "replay", origins()
    return TrackRecordPlan(model_row["timeframe"], train_end, mode, chosen, len(stored), sample_end)


def build_track_record(data_dir: Path, as_of: datetime | None = None,
                       progress: bool = True) -> tuple[int, int, list[TrackRecordPlan]]:
    """Predictions at past origins of every sample series with an active model, then scored.

    By default the origins lie after each model's training window, so their scores are live figures; when the
    stored candles end before that, the series' last origins are replayed (in-sample, reported apart) and the
    plan says so. Returns (new predictions, newly scored steps, the plans). Each prediction sees only the
    candles up to its origin.
    """
    from candlecast import db, storage
    from candlecast.repositories.models import get_all_active_models
    from candlecast.services import forecasting, scoring
    from candlecast.services.model_loading import verified_model
    from candlecast.tickers import normalize_ticker

    with db.connection() as conn:
        models = {row["timeframe"]: row for row in get_all_active_models(conn)}
    plans = []
    for timeframe, row in models.items():
        stored = []
        for path in sorted(data_dir.glob(f"*/{timeframe}.parquet")):
            ticker = normalize_ticker(path.parent.name)
            candles = storage.read_all_candles(ticker, timeframe)
            if candles is not None:
                stored.append((ticker, candles))
        if not stored:
            continue
        model = verified_model(row)
        plan = plan_track_record(row, model, stored, as_of)
        made = forecasting.past_prediction_keys(row["id"]) if as_of is None else set()
        if made:
            # An earlier seed's. If all of them are among this plan's, it planned the same origins and was
            # interrupted: the rest are made. Otherwise the candles have changed since (Refresh lengthened them,
            # which spreads the origins anew): a second set would count the model twice, so none are.
            planned = {forecasting.as_of_key(row, model, ticker, timeframe, candles.head(index + 1)):
                       (ticker, candles, index) for ticker, candles, index in plan.origins}
            lacking = [origin for key, origin in planned.items() if key not in made]
            if not lacking or not made <= planned.keys():
                print(f"track record {timeframe}: kept: {row['name']} {row['version']} has the past predictions an "
                      "earlier seed made", flush=True)
                continue
            print(f"track record {timeframe}: an earlier seed was interrupted after {len(made)} of its "
                  f"{len(planned)} past forecasts with {row['name']} {row['version']}: making the other "
                  f"{len(lacking)}", flush=True)
            plan = replace(plan, origins=lacking)
        else:
            print(plan.describe(), flush=True)
        plans.append(plan)
    work = [(plan.timeframe, *origin) for plan in plans for origin in plan.origins]
    items: Any = work
    if progress:
        from tqdm import tqdm

        items = tqdm(work, desc="past forecasts", unit="forecast")
    created = sum(forecasting.create_as_of(ticker, tf, candles.head(index + 1)) for tf, ticker, candles, index in items)
    report = scoring.run(float("inf"), since=scoring.EVERYTHING_SINCE)
    return created, report.scored, plans


def seed(data_dir: Path = DEFAULT_DATA_DIR, models_dir: Path = DEFAULT_MODELS_DIR, *,
         progress: bool = True, resign: bool = False, track_record: bool = False,
         as_of: datetime | None = None) -> SeedReport:
    """Symbols into the database, data/ and models/ into the bucket, models registered, and (with
    `track_record`, as the CLI and `make run` do) a track record from past origins. Idempotent."""
    from candlecast import db, storage

    report = SeedReport()
    _require_directory(data_dir)
    _require_directory(models_dir)
    if not (data_dir / SYMBOLS_FILE).is_file():
        raise UnusableInput(f"no {SYMBOLS_FILE} in {data_dir}: not a data directory; nothing seeded")
    models = checked_models(models_dir, resign)
    if refused := refused_data_files(data_dir):
        shown = "; ".join(refused[:5]) + (f"; ... {len(refused) - 5} more" if len(refused) > 5 else "")
        raise UnusableInput(f"{len(refused)} candle files in {data_dir} are not usable (every read would refuse "
                            f"them): {shown}; nothing seeded")
    with db.batch(BATCH_DB_SECONDS):  # batch work: not a request's 1 s bound
        report.symbols = seed_symbols(data_dir)
        report.data_files, report.data_files_kept = storage.upload_directory(data_dir, "data", progress=progress,
                                                                              replace=False)
        if not models:
            print(f"no models in {models_dir / MANIFEST_FILE}; none registered")
        # Each file and its signature land on their keys before the row that names them.
        report.model_files = 2 * len(models)
        report.models = register_models(models, progress=progress)
        if track_record and report.models:
            report.past_predictions, report.scored_steps, report.plans = build_track_record(data_dir, as_of, progress)
            report.no_live = [plan.timeframe for plan in report.plans if plan.mode in ("replay", "none")]
    return report


def install_models(models_dir: Path = DEFAULT_MODELS_DIR, *, progress: bool = True,
                   resign: bool = False) -> dict[str, str]:
    """Upload each model of models/manifest.json with its signature, checked against the manifest, and register
    it as its timeframe's active model: a release's models on a running stack. No symbols, candles or track
    record. Returns {timeframe: "name version"}."""
    from candlecast import db

    _require_directory(models_dir)
    models = checked_models(models_dir, resign)
    if not models:
        raise UnusableInput(f"no models in {models_dir / MANIFEST_FILE}; nothing installed")
    with db.batch(BATCH_DB_SECONDS):
        return register_models(models, progress=progress)


def _require_directory(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))


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
    parser = subparsers.add_parser("seed", help="load data/ (the candle files the bucket does not hold), models/ and "
                                   "data/symbols.csv into the stack",
                                   description=__doc__)
    parser.add_argument("--bucket", help="target bucket (default: DATA_BUCKET)")
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="local data directory (default: data/)")
    parser.add_argument("--models", default=str(DEFAULT_MODELS_DIR), help="local models directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resign", action="store_true",
                        help="sign the model files with the configured key (MODEL_SIGNING_KEY[_SECRET_ARN]) after "
                             "checking each against models/manifest.json")
    parser.add_argument("--as-of", type=_as_of, metavar="ISO_TIME",
                        help="operator only: the first past origin of the track record's predictions, every "
                             f"{TRACK_RECORD_STRIDE} candles, e.g. 2021-11-01T00:00Z; origins up to a model's "
                             "train_end are in-sample replays (default: up to "
                             f"{TRACK_RECORD_ORIGINS} origins per series after its model's train_end)")
    parser.add_argument("--no-track-record", action="store_true", help="no predictions at past origins")
    parser.set_defaults(func=_run)
    install = subparsers.add_parser("install-models", help="upload and register the models of models/manifest.json "
                                    "(each checked against it) as their timeframes' active models; uploads no "
                                    "data, touches no symbol or prediction (a release's models on a running stack)")
    install.add_argument("--bucket", help="target bucket (default: DATA_BUCKET)")
    install.add_argument("--models", default=str(DEFAULT_MODELS_DIR), help="local models directory")
    install.add_argument("--quiet", action="store_true", help="no progress bar")
    install.add_argument("--resign", action="store_true",
                         help="sign the model files with the configured key after checking each against "
                              "models/manifest.json")
    install.set_defaults(func=_install_models)
    resign = subparsers.add_parser("resign-models", help="re-sign every registered model file's .sig in the bucket "
                                   "with the current signing key (a key rotation); uploads and registers nothing")
    resign.add_argument("--bucket", help="target bucket (default: DATA_BUCKET)")
    resign.set_defaults(func=_resign_models)
    put = subparsers.add_parser("put-candles", help="replace one symbol's candle file in the bucket and drop its "
                                "cached candles (a fixed file is used by the next forecast)")
    put.add_argument("file", help="local Parquet file: open_time, open, high, low, close, volume")
    put.add_argument("--symbol", required=True, help="e.g. BTC-USD or X:BTCUSD")
    put.add_argument("--timeframe", required=True, help="1h, 4h, 1d, 1w or 1m")
    put.add_argument("--bucket", help="target bucket (default: DATA_BUCKET)")
    put.set_defaults(func=_put_candles)


def _install_models(args: argparse.Namespace) -> int:
    if args.bucket:
        from candlecast.config import get_settings

        os.environ["DATA_BUCKET"] = args.bucket
        get_settings.cache_clear()
    installed = install_models(Path(args.models), progress=not args.quiet, resign=args.resign)
    print("active models: " + ", ".join(f"{tf}: {name}" for tf, name in installed.items()))
    return 0


def resign_models() -> tuple[int, int, list[str]]:
    """Re-sign, in place, the `.sig` of every registered model file in the bucket (each row's file, and the active
    copy models/{tf}.pkl when it is that row's file) with the current signing key: the step of a key rotation
    between adding the new key (the old one as previous) and dropping the old one. Uploads no data, registers
    nothing. A file is re-signed only when it verifies, under the current or the previous key, and its sha256 is
    its row's: a tampered file is never blessed. Returns (re-signed, already current, refused)."""
    from candlecast import db, storage
    from candlecast.config import get_settings, model_signing_keys
    from candlecast.errors import ModelIntegrityError
    from candlecast.forecast import artifact
    from candlecast.repositories.models import get_registered_model_files

    key, previous = model_signing_keys(get_settings())
    with db.connection() as conn:
        rows = get_registered_model_files(conn)
    files = {row["s3_key"]: row["sha256"] for row in rows}
    for row in rows:
        if row["is_active"]:
            files.setdefault(storage.active_model_key(row["timeframe"]), row["sha256"])
    resigned, current, refused = 0, 0, []
    for model_key, sha256 in sorted(files.items()):
        data = storage.get_bytes(model_key)
        if data is None:
            if model_key in {row["s3_key"] for row in rows}:
                refused.append(f"{model_key}: missing")
            continue
        signature_key = storage.signature_key(model_key)
        old = (storage.get_bytes(signature_key) or b"").decode("ascii", "replace")
        try:
            artifact.verify(data, old, key, sha256, previous_key=previous)
        except ModelIntegrityError as error:
            if artifact.sha256_hex(data) != sha256 and model_key not in {row["s3_key"] for row in rows}:
                continue  # an active copy that an older file left: not the registered one, and never read
            refused.append(f"{model_key}: {error.message}")
            continue
        new = artifact.sign(data, key)
        if old.strip().lower() == new:
            current += 1
            continue
        storage.put_bytes(signature_key, new.encode(), "text/plain")
        resigned += 1
    return resigned, current, refused


def _resign_models(args: argparse.Namespace) -> int:
    if args.bucket:
        from candlecast.config import get_settings

        os.environ["DATA_BUCKET"] = args.bucket
        get_settings.cache_clear()
    resigned, current, refused = resign_models()
    print(f"re-signed {resigned} model files with the current key; {current} were signed with it already"
          + (f"; REFUSED {len(refused)} (left as they were):" if refused else ""))
    for line in refused:
        print(f"  {line}")
    if refused:
        raise UnusableInput(f"{len(refused)} registered model files verify under neither key or are missing")
    return 0


def candle_file(path: Path, timeframe: str) -> tuple[Any, str | None]:
    """(the local Parquet file's candles, None), or (None, why not) when every read of it from the bucket would
    refuse it (`storage.candle_damage`, the read path's own check: the timeframe's grid, no open time in the
    future). A missing file raises FileNotFoundError."""
    from candlecast import storage

    try:
        data = path.read_bytes()
        return storage.candle_damage(lambda: storage.normalize_candles(storage.parquet_to_candles(data)), timeframe)
    except OSError as error:  # unreadable here, or Parquet that pyarrow cannot parse (it raises OSError for some)
        if isinstance(error, FileNotFoundError):
            raise
        return None, type(error).__name__


def refused_data_files(data_dir: Path) -> list[str]:
    """data/'s candle files (`<symbol>/<timeframe>.parquet`) that every read from the bucket would refuse, each
    with why (`candle_file`)."""
    from candlecast.timeframes import TIMEFRAMES

    refused = []
    for timeframe in TIMEFRAMES:
        for path in sorted(data_dir.glob(f"*/{timeframe}.parquet")):
            damage = candle_file(path, timeframe)[1] if path.is_file() else "not a file"
            if damage is not None:
                refused.append(f"{path.relative_to(data_dir)}: {damage}")
    return refused


def put_candles(ticker: str, timeframe: str, path: Path) -> WrittenFile:
    """Replace one symbol's candle file in the bucket with a local Parquet file (columns as data/'s): refused,
    before any change, when every read of it would refuse it (`candle_file`); else sorted, deduplicated and
    written in one PUT, and its cached candles dropped, so the next forecast reads it (a file copied in by hand
    is not seen for up to an hour). When the cache does not drop them (unreachable, or refusing writes), a
    warning on stderr says forecasts may use the old candles until their TTL (`cache_stale` in what is returned).
    Returns the file written (its rows, version and `cache_stale`)."""
    from candlecast import cache, storage
    from candlecast.tickers import normalize_ticker
    from candlecast.timeframes import TIMEFRAMES

    if timeframe not in TIMEFRAMES:
        raise UnusableInput(f"unknown timeframe {timeframe!r} (one of {', '.join(TIMEFRAMES)})")
    ticker = normalize_ticker(ticker)
    candles, damage = candle_file(path, timeframe)
    if candles is None:
        raise UnusableInput(f"{path} is not a usable {timeframe} candle file ({damage}); the bucket is unchanged")
    written = storage.write_candles(ticker, timeframe, candles)
    print(f"put {written.rows} {timeframe} candles of {ticker} at {storage.candles_key(ticker, timeframe)}")
    if written.cache_stale:
        print(f"candlecast put-candles: the file is written, but the cache (Redis) did not drop its cached candles: "
              f"forecasts may use the old ones for up to {cache.TTL_SECONDS['candles']} s; run put-candles again "
              "once Redis takes writes", file=sys.stderr)
    return written


def _put_candles(args: argparse.Namespace) -> int:
    """Exit 1 when the file is written but its cached candles stay (said on stderr)."""
    if args.bucket:
        from candlecast.config import get_settings

        os.environ["DATA_BUCKET"] = args.bucket
        get_settings.cache_clear()
    return 1 if put_candles(args.symbol, args.timeframe, Path(args.file)).cache_stale else 0


def _as_of(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {value!r} (e.g. 2021-11-01T00:00Z)") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment > datetime.now(UTC):
        raise argparse.ArgumentTypeError(f"{value} is in the future: the track record starts at a past origin")
    return moment
