"""The live track record per model: GET /models, GET /models/{timeframe} and health's drift (no numpy).

Every live figure is a sum over model_live_stats cells (model, in-sample flag, horizon, confidence bin), so the
figures stay exact after retention deletes old predictions. Live figures count out-of-sample steps only: a
prediction whose origin lies inside its model's training window is a replay and is reported apart. Drift is
judged from the live coverage per outcome day (model_live_days, candlecast.drift.live_coverage).
"""

from collections import defaultdict
from collections.abc import Iterable

from aws_lambda_powertools import Logger

from candlecast import cache, db
from candlecast.drift import live_coverage
from candlecast.errors import NotFound
from candlecast.repositories import models as model_repository
from candlecast.repositories import scores as score_repository
from candlecast.schemas import (
    BacktestFigures,
    HorizonCoverage,
    LiveFigures,
    ModelSummary,
    ModelTrackRecord,
    ReliabilityBin,
    list_adapter,
)
from candlecast.timeframes import TIMEFRAMES

logger = Logger(child=True)
_records = list_adapter(ModelTrackRecord)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def live_figures(cells: Iterable[dict], *, in_sample: bool, detail: bool) -> LiveFigures:
    """Figures over model_live_stats cells; the ECE uses the 10 confidence bins across all horizons, as the
    backtest's does (candlecast.forecast.evaluate)."""
    cells = list(cells)
    n = sum(cell["n"] for cell in cells)
    bins: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0.0])  # n, events, confidence sum
    horizons: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, inside 80, inside 95
    for cell in cells:
        sums = bins[cell["confidence_bin"]]
        sums[0] += cell["n"]
        sums[1] += cell["events"]
        sums[2] += cell["confidence_sum"]
        counts = horizons[cell["horizon"]]
        counts[0] += cell["n"]
        counts[1] += cell["inside_80"]
        counts[2] += cell["inside_95"]
    pinball = sum(cell["pinball_sum"] for cell in cells)
    baseline = sum(cell["baseline_pinball_sum"] for cell in cells)
    ece = sum(abs(total_conf / count - events / count) * count for count, events, total_conf in bins.values())
    figures = LiveFigures(
        in_sample=in_sample,
        n_scored=n,
        period_start=min((cell["first_ts"] for cell in cells), default=None),
        period_end=max((cell["last_ts"] for cell in cells), default=None),
        coverage_80=_ratio(sum(cell["inside_80"] for cell in cells), n),
        coverage_95=_ratio(sum(cell["inside_95"] for cell in cells), n),
        ece=_ratio(ece, n),
        pinball=_ratio(pinball, n),
        baseline_pinball=_ratio(baseline, n),
        pinball_skill=1 - pinball / baseline if baseline else None,
        mean_confidence=_ratio(sum(cell["confidence_sum"] for cell in cells), n),
        hit_rate=_ratio(sum(cell["events"] for cell in cells), n),
    )
    if detail:
        figures.coverage_by_horizon = [
            HorizonCoverage(h=h, n=count, coverage_80=inside_80 / count, coverage_95=inside_95 / count)
            for h, (count, inside_80, inside_95) in sorted(horizons.items())
        ]
        figures.reliability = [
            ReliabilityBin(mean_confidence=total_conf / count, observed=events / count, n=count)
            for _, (count, events, total_conf) in sorted(bins.items())
        ]
    return figures


def backtest_figures(metrics: dict, *, detail: bool) -> BacktestFigures:
    """The walk-forward figures registered with the model: `metrics["comparison"]` (the shipped model among its
    peers, comparison.compare_methods) or, in manifests written before it, `metrics["test"]`."""
    comparison = metrics.get("comparison")
    if comparison:
        methods = comparison["methods"]
        model = methods[comparison["reference"]]
        baseline = methods.get("baseline")
        figures = BacktestFigures(
            coverage_80=model.get("coverage_80"), coverage_95=model.get("coverage_95"), ece=model.get("ece"),
            pinball_skill=1 - model["pin5"] / baseline["pin5"] if baseline and baseline.get("pin5") else None,
            n_pairs=model.get("n_pairs"), n_origins=model.get("n_origins"))
        if detail:
            per = model.get("per_horizon") or {}
            figures.coverage_by_horizon = [
                HorizonCoverage(h=h, coverage_80=cov_80, coverage_95=cov_95)
                for h, (cov_80, cov_95) in enumerate(zip(per.get("coverage_80", []), per.get("coverage_95", []),
                                                         strict=True), start=1)
            ]
            figures.reliability = [
                ReliabilityBin(mean_confidence=item["confidence"], observed=item["observed"], n=item["count"])
                for item in model.get("reliability") or []
            ]
        return figures
    test = metrics.get("test") or {}
    figures = BacktestFigures(**{key: test.get(key) for key in (
        "coverage_80", "coverage_95", "ece", "pinball_skill", "n_pairs", "n_origins")})
    if detail:
        per_horizon = test.get("per_horizon") or []
        figures.coverage_by_horizon = [
            HorizonCoverage(h=item["h"], n=item.get("n_pairs"), coverage_80=item.get("coverage_80"),
                            coverage_95=item.get("coverage_95"))
            for item in per_horizon
        ]
        figures.reliability = [
            ReliabilityBin(mean_confidence=item["mean_confidence"], observed=item["hit_rate"], n=item["n_pairs"])
            for item in per_horizon
            if item.get("mean_confidence") is not None and item.get("hit_rate") is not None
        ]
    return figures


def _registered_figures(model: dict, *, detail: bool) -> BacktestFigures:
    """backtest_figures, or none at all when the row's metrics are malformed (edited by hand, or written by a
    newer trainer): the model stays listed with its live figures, and the log names the row."""
    try:
        return backtest_figures(model["metrics"] or {}, detail=detail)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        logger.error("malformed model metrics", extra={"model_id": str(model["id"]), "error": type(error).__name__})
        return BacktestFigures()


def _record(model: dict, cells: list[dict], days: list[tuple[int, int]], *, detail: bool) -> ModelTrackRecord:
    live = live_figures((c for c in cells if not c["in_sample"]), in_sample=False, detail=detail)
    evidence = live_coverage(model["timeframe"], days)
    live.coverage_80_standard_error = evidence.standard_error
    replay_cells = [c for c in cells if c["in_sample"]]
    return ModelTrackRecord(
        timeframe=model["timeframe"],
        model=ModelSummary.model_validate(model, from_attributes=False),
        backtest=_registered_figures(model, detail=detail),
        live=live,
        replay=live_figures(replay_cells, in_sample=True, detail=detail) if replay_cells else None,
        drift=evidence.drifting,
    )


def _load(timeframe: str | None) -> list[ModelTrackRecord]:
    with db.connection() as conn:
        if timeframe is None:
            models = model_repository.get_all_active_models(conn)
        else:
            models = [row] if (row := model_repository.get_active_model_by_timeframe(conn, timeframe)) else []
        cells = score_repository.get_active_model_stats(conn, timeframe) if models else []
        days = score_repository.get_active_live_days(conn, timeframe) if models else {}
    by_timeframe: dict[str, list[dict]] = defaultdict(list)
    for cell in cells:
        by_timeframe[cell["timeframe"]].append(cell)
    order = {tf: index for index, tf in enumerate(TIMEFRAMES)}
    return [_record(model, by_timeframe[model["timeframe"]], days.get(model["timeframe"], []),
                    detail=timeframe is not None)
            for model in sorted(models, key=lambda model: order[model["timeframe"]])]


def all_models() -> bytes:
    """GET /models: each timeframe's active model with its backtest and live headline figures."""
    lookup = cache.lookup_track_record(None)
    if lookup.value is not None:
        return lookup.value
    body = _records.dump_json(_load(None))
    cache.fill_track_record(None, body, lookup)
    return body


def one_timeframe(timeframe: str) -> bytes:
    """GET /models/{timeframe}: the same plus coverage by horizon and reliability bins."""
    lookup = cache.lookup_track_record(timeframe)
    if lookup.value is not None:
        return lookup.value
    records = _load(timeframe)
    if not records:
        raise NotFound(f"no active model for timeframe {timeframe}", code="model_not_found")
    body = records[0].model_dump_json().encode()
    cache.fill_track_record(timeframe, body, lookup)
    return body
