"""Reading OHLCV files (CSV or Parquet) into Candles and resampling them to coarser timeframes (numpy only)."""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from candlecast.candles import COLUMNS, Candles, usable_candles
from candlecast.timeframes import TIMEFRAMES, Timeframe, nominal_seconds

_CSV_NAME = re.compile(r"^(?P<base>[A-Z0-9]+)-(?P<quote>[A-Z0-9]+)_(?P<tf>1h|4h|1d|1w|1m)$", re.IGNORECASE)
_DAY = 86400
# 1970-01-01 was a Thursday: shifting by 3 days puts Monday at the start of each 7-day block.
_MONDAY_SHIFT_DAYS = 3


@dataclass(frozen=True)
class Series:
    """One OHLCV file: `pair` is the storage name (e.g. BTCUSDT), `base` the coin (BTC)."""

    pair: str
    base: str
    quote: str
    timeframe: Timeframe
    path: Path
    source: str  # "csv" or "parquet"

    @property
    def place(self) -> Path:
        """The folder the series belongs to: the file's, or above the pair folder of the bucket layout. The same
        pair in two places (one folder per exchange) is two series."""
        return self.path.parent.parent if self.path.stem in TIMEFRAMES else self.path.parent


def describe_file(path: Path) -> Series | None:
    """Series metadata from a file name: `BTC-USDT_1h.csv`, or the bucket layout `BTCUSDT/1h.parquet`."""
    from candlecast.tickers import split_pair

    stem, suffix = path.stem, path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        return None
    match = _CSV_NAME.match(stem)
    if match:
        base, quote, tf = match["base"].upper(), match["quote"].upper(), match["tf"].lower()
        pair = base + quote
    elif stem in TIMEFRAMES:
        pair, tf = path.parent.name.upper(), stem
        base, quote = split_pair(pair)
    else:
        return None
    return Series(pair, base, quote, tf, path, suffix[1:])


UNPARSED_NAME = f"name is neither <BASE>-<QUOTE>_<tf>.csv nor <PAIR>/<tf>.parquet, <tf> one of {', '.join(TIMEFRAMES)}"


def unparsed_files(directory: Path) -> list[Path]:
    """CSV and Parquet files under `directory` whose names say no pair and timeframe: `list_series` skips them."""
    _require_directory(directory)
    return [path for path in sorted(Path(directory).rglob("*"))
            if path.is_file() and path.suffix.lower() in (".csv", ".parquet") and describe_file(path) is None]


def list_series(directory: Path) -> list[Series]:
    """Every OHLCV file under `directory` (recursively), sorted by path."""
    _require_directory(directory)
    found = (describe_file(path) for path in sorted(Path(directory).rglob("*")) if path.is_file())
    return [series for series in found if series is not None]


class OHLCVError(ValueError):
    """OHLCV input that cannot be used: the message names the file (or folder) and the problem."""


def _require_directory(directory: Path) -> None:
    """An OHLCVError for a folder that is missing or a file: not "no OHLCV files" in it."""
    if not Path(directory).exists():
        raise OHLCVError(f"{directory}: no such directory")
    if not Path(directory).is_dir():
        raise OHLCVError(f"{directory}: not a directory")


def read_ohlcv(path: Path) -> Candles:
    """Candles from a CSV (timestamp,open,high,low,close,volume; names in any case) or Parquet (open_time,...)
    file, sorted, one per open time."""
    import pyarrow as pa

    path = Path(path)
    try:
        times, columns = _read_parquet(path) if path.suffix.lower() == ".parquet" else _read_csv(path)
    except (pa.ArrowException, OSError) as error:
        raise OHLCVError(f"{path}: {error}") from error
    order = np.argsort(times, kind="stable")
    keep = np.diff(times[order], prepend=times[order][:1] - 1) != 0  # dedup on open_time
    order = order[keep]
    return Candles(open_time=times[order], **{name: values[order] for name, values in columns.items()})


def _read_parquet(path: Path) -> tuple[np.ndarray, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _require_columns(path, pq.read_schema(path).names, COLUMNS)
    table = pq.read_table(path, columns=list(COLUMNS))
    open_time = table["open_time"]
    if pa.types.is_timestamp(open_time.type):
        open_time = open_time.cast(pa.timestamp("s", tz="UTC")).cast(pa.int64())
    return np.asarray(open_time.to_numpy(), dtype=np.int64), _prices(table)


def _read_csv(path: Path) -> tuple[np.ndarray, dict]:
    import pyarrow as pa
    from pyarrow import csv

    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline().strip().split(",")
    names = {name.strip().lower(): name for name in header}
    _require_columns(path, names, ("timestamp", *COLUMNS[1:]))
    types = {names["timestamp"]: pa.string()} | {names[name]: pa.float64() for name in COLUMNS[1:]}
    try:
        table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as error:
        raise OHLCVError(f"{path}: {_first_bad_number(path) or _with_column_name(str(error), header)}") from error
    table = table.rename_columns([name.strip().lower() for name in table.column_names])
    return _epoch_seconds(path, table["timestamp"].combine_chunks()), _prices(table)


_MISSING_VALUES = {"", "na", "n/a", "#n/a", "null", "nan", "-nan", "none"}  # read as no value, not an error


def _first_bad_number(path: Path) -> str | None:
    """`line N: <column> '<value>' is not a number` for the first price or volume that is not one (the header is
    line 1), or None when every one is."""
    import csv

    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        columns = {header.index(name): name for name in COLUMNS[1:] if name in header}
        for row in reader:
            for index, name in columns.items():
                value = row[index] if index < len(row) else ""
                if value.strip().lower() in _MISSING_VALUES:
                    continue
                try:
                    float(value)
                except ValueError:
                    return f"line {reader.line_num}: {name} {value!r} is not a number"
    return None


def _with_column_name(message: str, header: list[str]) -> str:
    """pyarrow's "In CSV column #3: ..." (counted from 0) with the column's name instead."""
    match = re.search(r"column #(\d+)", message)
    if match and int(match[1]) < len(header):
        return message.replace(match[0], f"column {header[int(match[1])].strip()}")
    return message


_EPOCH_DIGITS = {10 ** 14: 10 ** 6, 10 ** 11: 10 ** 3}  # beyond the year 5138 in seconds: µs, ms


def _epoch_seconds(path: Path, text) -> np.ndarray:
    """Open times of CSV `text` (strings): ISO 8601 with a zone, or without one (read as UTC), or epoch seconds,
    milliseconds or microseconds (told apart by size)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(text) and pc.all(pc.match_substring_regex(text, r"^\s*\d+\s*$")).as_py():
        values = np.asarray(pc.cast(pc.utf8_trim_whitespace(text), pa.int64()).to_numpy(), dtype=np.int64)
        divisor = next((unit for bound, unit in _EPOCH_DIGITS.items() if values.max() >= bound), 1)
        return values // divisor
    times = _iso_times(text)
    if times is not None:
        return np.asarray(times.cast(pa.int64()).to_numpy(), dtype=np.int64)
    bad = next(((row, value) for row, value in enumerate(text.to_pylist(), 2)
                if value is None or _iso_times(pa.array([value], pa.string())) is None), None)
    if bad is None:
        raise OHLCVError(f"{path}: some timestamps name a zone and some do not")
    raise OHLCVError(f"{path}: line {bad[0]}: timestamp {bad[1]!r} is neither ISO 8601 (UTC when it names no zone) "
                     "nor epoch seconds, milliseconds or microseconds")


def _iso_times(text):
    """`text` (strings) as UTC timestamps when all name a zone or all name none (read as UTC); else None."""
    import pyarrow as pa

    for zone in ("UTC", None):
        try:
            return text.cast(pa.timestamp("s", tz=zone))
        except pa.ArrowInvalid:
            continue
    return None


def _require_columns(path: Path, present, required) -> None:
    missing = [name for name in required if name not in present]
    if missing:
        raise OHLCVError(f"{path}: no column {', '.join(missing)} (expected {','.join(required)})")


def _prices(table) -> dict:
    return {name: table[name].to_numpy().astype(np.float64) for name in COLUMNS[1:]}


def bucket_starts(open_time: np.ndarray, timeframe: Timeframe) -> np.ndarray:
    """Vectorised `candlecast.timeframes.bucket_start` for epoch seconds (UTC, Monday weeks, calendar months)."""
    t = np.asarray(open_time, dtype=np.int64)
    if timeframe in ("1h", "4h", "1d"):
        step = nominal_seconds(timeframe)
        return t - t % step
    if timeframe == "1w":
        days = t // _DAY
        return (days - (days + _MONDAY_SHIFT_DAYS) % 7) * _DAY
    return t.astype("datetime64[s]").astype("datetime64[M]").astype("datetime64[s]").astype(np.int64)


def bucket_ends(starts: np.ndarray, timeframe: Timeframe) -> np.ndarray:
    if timeframe != "1m":
        return starts + nominal_seconds(timeframe)
    months = starts.astype("datetime64[s]").astype("datetime64[M]") + np.timedelta64(1, "M")
    return months.astype("datetime64[s]").astype(np.int64)


def resample(candles: Candles, source: Timeframe, target: Timeframe) -> Candles:
    """Aggregate `candles` of timeframe `source` into `target` buckets. The last bucket is dropped unless the
    source reaches its end, and the first unless the source starts at its open: a candle built from part of its
    period (a month from its last 7 days) would be stored and trained on as a whole one.

    Buckets with missing source candles inside the data (exchange gaps) are kept, built from the candles present.
    """
    if source == target:
        return candles
    if len(candles) == 0:
        return candles
    starts = bucket_starts(candles.open_time, target)
    first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1]])
    last = np.r_[first[1:], len(starts)] - 1
    result = Candles(
        open_time=starts[first],
        open=candles.open[first],
        high=np.maximum.reduceat(candles.high, first),
        low=np.minimum.reduceat(candles.low, first),
        close=candles.close[last],
        volume=np.add.reduceat(candles.volume, first),
    )
    data_end = candles.open_time[-1] + nominal_seconds(source)
    keep = slice(1 if candles.open_time[0] > result.open_time[0] else 0,
                 -1 if bucket_ends(result.open_time[-1:], target)[0] > data_end else None)
    if keep != slice(0, None):
        result = Candles(*(getattr(result, name)[keep] for name in COLUMNS))
    return result


def sources_for(series: list[Series], timeframe: Timeframe) -> list[Series]:
    """One file per pair and place that can give `timeframe`: the file of that timeframe, else the coarsest finer
    one."""
    rank = {tf: i for i, tf in enumerate(TIMEFRAMES)}
    best: dict[tuple, Series] = {}
    for item in series:
        if rank[item.timeframe] > rank[timeframe]:
            continue
        current = best.get((item.place, item.pair))
        if current is None or rank[item.timeframe] > rank[current.timeframe]:
            best[(item.place, item.pair)] = item
    return sorted(best.values(), key=lambda item: (item.pair, str(item.place)))


def series_names(series: list[Series]) -> list[str]:
    """A name per series for reports: its pair, or `<folders>/<pair>` where the pair is in more than one place,
    with as many of the place's last folders as tell those places apart (`kraken/…`, or `a/kraken/…`)."""
    places: dict[str, set[Path]] = {}
    for item in series:
        places.setdefault(item.pair, set()).add(item.place)

    def folders(item: Series) -> str:
        others = places[item.pair] - {item.place}
        depth = next((k for k in range(1, len(item.place.parts) + 1)
                      if all(place.parts[-k:] != item.place.parts[-k:] for place in others)), len(item.place.parts))
        return "/".join(item.place.parts[-depth:])

    return [item.pair if len(places[item.pair]) == 1 else f"{folders(item)}/{item.pair}" for item in series]


_SPACING_TOLERANCE = (0.5, 1.5)  # median gap between open times over the timeframe's nominal length (months vary)
_MEANING = {"1h": "one hour", "4h": "four hours", "1d": "one day", "1w": "one week", "1m": "one calendar month"}


def check_spacing(series: Series, candles: Candles) -> None:
    """Refuse a file whose candles are not of the timeframe its name gives (e.g. one-minute candles in a `_1m`
    file, where 1m means a calendar month): the median gap between open times must be about that timeframe."""
    if len(candles) < 3:
        return
    gap = float(np.median(np.diff(candles.open_time)))
    nominal = nominal_seconds(series.timeframe)
    low, high = _SPACING_TOLERANCE
    if not low * nominal <= gap <= high * nominal:
        raise OHLCVError(f"{series.path}: its candles open a median {_duration(gap)} apart, but {series.timeframe} "
                         f"in a file name means {_MEANING[series.timeframe]}")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            count = seconds / size
            return f"{count:g} {unit[:-1] if count == 1 else unit}"
    return f"{seconds:g} seconds"


def load_timeframe(directory: Path, timeframe: Timeframe, *, clean: bool = True, progress: bool = False):
    """[(Series, Candles)] for every file in `directory` that gives `timeframe` (resampled when finer)."""
    items = sources_for(list_series(directory), timeframe)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"reading {timeframe}", unit="file", leave=False)
    loaded = []
    for series in items:
        candles = read_ohlcv(series.path)
        check_spacing(series, candles)
        if clean:
            candles = usable_candles(candles)
        candles = resample(candles, series.timeframe, timeframe)
        if len(candles):
            loaded.append((series, candles))
    return loaded


def unused_files(directory: Path, timeframe: Timeframe, loaded: list, with_origin: set, min_history: int,
                 until: str = "") -> list[dict]:
    """[{"file", "reason"}] of the files under `directory` that give no origin: names that say no pair and
    timeframe, series without a complete `timeframe` candle (`until` a cutoff, when one is named: the series in
    `loaded` end there), and series in `loaded` too short for an origin with a known outcome (indices not in
    `with_origin`)."""
    found = [{"file": str(path), "reason": UNPARSED_NAME} for path in unparsed_files(directory)]
    kept = {series.path for series, _ in loaded}
    cutoff = f" up to {until}" if until else ""
    for series in sources_for(list_series(directory), timeframe):
        if series.path not in kept:
            found.append({"file": str(series.path), "reason": f"no complete {timeframe} candle{cutoff}"})
    for index, (series, candles) in enumerate(loaded):
        if index not in with_origin:
            found.append({"file": str(series.path), "reason": f"{len(candles)} {timeframe} candles{cutoff}: an "
                          f"origin needs {min_history} before it and one after it"})
    return found
