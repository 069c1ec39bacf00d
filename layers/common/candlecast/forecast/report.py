"""PNG report of a walk-forward test: reliability diagram, coverage by horizon, one fan chart (matplotlib, Agg)."""

from pathlib import Path

import numpy as np

from candlecast.candles import COLUMNS, Candles
from candlecast.forecast.evaluate import Origins, reliability
from candlecast.forecast.features import MEDIAN
from candlecast.forecast.model import HORIZONS, ForecastModel


def write_report(directory: Path, timeframe: str, loaded: list, test: Origins, results: dict,
                 model: ForecastModel, outputs: tuple, kind: str) -> Path:
    """One PNG for the shipped `kind`: `outputs` = its (z-quantiles, baseline z-quantiles, confidence) at `test`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    figure, (ax_rel, ax_cov, ax_fan) = plt.subplots(1, 3, figsize=(18, 5.5))

    q, _, confidence = outputs
    known = np.isfinite(test.log_return)
    median = test.scale * q[..., MEDIAN]
    hit = np.abs(np.expm1(test.log_return - median)) <= model.config.tolerance
    points = reliability(confidence[known], hit[known].astype(float))
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    ax_rel.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{kind} model")
    top = max(0.05, max(max(p[0], p[1]) for p in points) * 1.1)
    ax_rel.set(xlim=(0, top), ylim=(0, top), xlabel="predicted confidence", ylabel="observed frequency",
               title=f"{timeframe} reliability (ECE {results[kind]['ece']:.3f})")
    ax_rel.legend()

    for name, result in results.items():
        style = "-" if name == kind else ":"
        per = result["per_horizon"]
        ax_cov.plot(HORIZONS, [p["coverage_80"] for p in per], style, color="C0", label=f"80% {name}")
        ax_cov.plot(HORIZONS, [p["coverage_95"] for p in per], style, color="C1", label=f"95% {name}")
    ax_cov.axhspan(0.77, 0.83, color="C0", alpha=0.1)
    ax_cov.axhspan(0.93, 0.97, color="C1", alpha=0.1)
    ax_cov.set(xlabel="horizon (bars)", ylabel="coverage", ylim=(0.6, 1.0),
               title=f"{timeframe} interval coverage by horizon (held-out symbols)")
    ax_cov.legend(fontsize=8)

    _fan_chart(ax_fan, timeframe, loaded, test, model)
    figure.tight_layout()
    path = directory / "report.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _fan_chart(ax, timeframe: str, loaded: list, test: Origins, model: ForecastModel) -> None:
    full = np.flatnonzero(np.isfinite(test.log_return).all(axis=1))
    if not len(full):
        return
    origin = full[-1]
    series, candles = loaded[int(test.series[origin])]
    position = int(np.searchsorted(candles.open_time, test.time[origin]))
    forecast = model.predict(Candles(*(getattr(candles, name)[: position + 1] for name in COLUMNS)))
    history = candles.close[max(0, position - 60) : position + 1]
    actual = candles.close[position + 1 : position + 31]
    past = np.arange(-len(history) + 1, 1)
    ax.plot(past, history, color="black", label="history")
    ax.fill_between(HORIZONS, forecast.lower_95, forecast.upper_95, color="C0", alpha=0.15, label="95%")
    ax.fill_between(HORIZONS, forecast.lower_80, forecast.upper_80, color="C0", alpha=0.3, label="80%")
    ax.plot(HORIZONS, forecast.close, color="C0", label="median (random walk)")
    ax.plot(HORIZONS[: len(actual)], actual, color="C3", label="what happened")
    ax.set(xlabel="bars from the origin", ylabel=f"{series.pair} close",
           title=f"{timeframe} fan chart, {series.pair} (held out)")
    ax.legend(fontsize=8)
