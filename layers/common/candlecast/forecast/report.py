"""Walk-forward report: a PNG (reliability, coverage by horizon, fan chart; every method's per-horizon coverage and
width, reliability, and coverage and pin5 per era) and the text table of the model against its peers."""

from pathlib import Path

import numpy as np

from candlecast.candles import COLUMNS, Candles
from candlecast.forecast.comparison import BATCH_BARS, MIN_BLOCKS, NESTED_SELECTION
from candlecast.forecast.evaluate import Origins, measured, measured_range, reliability, worst_reliability_gap
from candlecast.forecast.features import MEDIAN
from candlecast.forecast.model import HORIZONS, ForecastModel


def write_report(directory: Path, timeframe: str, loaded: list, test: Origins, results: dict,
                 model: ForecastModel, outputs: tuple, kind: str, comparison: dict | None = None) -> Path:
    """One PNG for the shipped `kind`: `outputs` = its (z-quantiles, baseline z-quantiles, confidence) at `test`;
    `comparison` (`comparison.compare_methods`) adds two rows of every method's figures (write_comparison_report's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    rows = 1 if not comparison else 4 if comparison.get("per_series") else 3
    figure, axes = plt.subplots(rows, 3, figsize=(18, 5.5 * rows), squeeze=False)
    ax_rel, ax_cov, ax_fan = axes[0]
    if comparison:
        _methods_by_horizon(axes[1], timeframe, comparison)
        _methods_reliability_and_eras(axes[2], timeframe, comparison)
    if rows == 4:
        _per_series(figure, axes[3], timeframe, comparison)

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
    band80, band95 = _bands(timeframe)
    ax_cov.axhspan(*band80, color="C0", alpha=0.1)
    ax_cov.axhspan(*band95, color="C1", alpha=0.1)
    ax_cov.set(xlabel="horizon (bars)", ylabel="coverage", ylim=(0.6, 1.0),
               title=f"{timeframe} interval coverage by horizon (held-out symbols)")
    ax_cov.legend(fontsize=8)

    _fan_chart(ax_fan, timeframe, loaded, test, model)
    figure.tight_layout()
    path = directory / "report.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_comparison_report(directory: Path, timeframe: str, comparison: dict) -> Path:
    """A PNG of `comparison` alone (`candlecast backtest --report`): every method's coverage and width by horizon,
    reliability, and coverage and pin5 per era."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    rows = 3 if comparison.get("per_series") else 2
    figure, axes = plt.subplots(rows, 3, figsize=(18, 5.5 * rows), squeeze=False)
    _methods_by_horizon(axes[0], timeframe, comparison)
    _methods_reliability_and_eras(axes[1], timeframe, comparison)
    if rows == 3:
        _per_series(figure, axes[2], timeframe, comparison)
    figure.tight_layout()
    path = directory / "comparison.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _methods_reliability_and_eras(axes, timeframe: str, comparison: dict) -> None:
    """Every method's reliability diagram (10 confidence bins; marker area ~ pairs), then per era its 80/95 %
    coverage and its pin5."""
    ax_rel, ax_cov, ax_pin = axes
    methods = comparison["methods"]
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    top = 0.05
    for i, (name, scores) in enumerate(methods.items()):
        table = scores["reliability"]
        total = sum(item["count"] for item in table) or 1
        x, y = [item["confidence"] for item in table], [item["observed"] for item in table]
        ax_rel.plot(x, y, "-" if name == comparison["reference"] else "--", color=f"C{i}",
                    label=f"{name} (ECE {scores['ece']:.3f})")
        ax_rel.scatter(x, y, s=[400 * item["count"] / total + 4 for item in table], color=f"C{i}", alpha=0.6)
        top = max(top, *x, *y)
    ax_rel.set(xlim=(0, top * 1.1), ylim=(0, top * 1.1), xlabel="predicted confidence", ylabel="observed frequency",
               title=f"{timeframe} reliability, every method")
    eras = list(next(iter(methods.values()))["eras"])
    width = 0.8 / max(len(methods), 1)
    for i, (name, scores) in enumerate(methods.items()):
        at = np.arange(len(eras)) + (i - (len(methods) - 1) / 2) * width
        ax_cov.bar(at, [scores["eras"][era]["coverage_95"] for era in eras], width, color=f"C{i}", alpha=0.35)
        ax_cov.bar(at, [scores["eras"][era]["coverage_80"] for era in eras], width, color=f"C{i}", label=name)
        ax_pin.bar(at, [scores["eras"][era]["pin5"] for era in eras], width, color=f"C{i}", label=name)
    for level in (0.8, 0.95):
        ax_cov.axhline(level, color="grey", linestyle=":")
    labels = [f"{era}\n({next(iter(methods.values()))['eras'][era]['n_pairs']:,} pairs)" for era in eras]
    ax_cov.set(xticks=range(len(eras)), xticklabels=labels, ylim=(0.5, 1.0), ylabel="coverage",
               title=f"{timeframe} coverage per era (80 % solid, 95 % pale)")
    ax_pin.set(xticks=range(len(eras)), xticklabels=labels, ylabel="pin5 (% log return)",
               title=f"{timeframe} pin5 per era (lower is better)")
    for ax in axes:
        ax.legend(fontsize=7)


def _per_series(figure, axes, timeframe: str, comparison: dict) -> None:
    """One row: each series' 80/95 % coverage for the reference and GARCH-t (else the best peer), sorted by the
    reference's 95 % coverage (two panels wide), then Δ per series."""
    reference, peer = comparison["reference"], series_peer(comparison)
    series = sorted(comparison["per_series"].items(), key=lambda item: item[1][reference]["coverage_95"])
    for ax in axes[:2]:
        ax.remove()
    ax_cov = figure.add_subplot(axes[0].get_gridspec()[-1, :2])
    at = np.arange(len(series))
    for name, marker, offset in ((reference, "o", -0.15), (peer, "x", 0.15)):
        for level, color in (("coverage_80", "C0"), ("coverage_95", "C1")):
            ax_cov.scatter(at + offset, [scores[name][level] for _, scores in series], marker=marker, color=color,
                           label=f"{name} {level[-2:]} %")
    band80, band95 = _bands(timeframe)
    ax_cov.axhspan(*band80, color="C0", alpha=0.1)
    ax_cov.axhspan(*band95, color="C1", alpha=0.1)
    labels = [f"{name} ({scores[reference]['n_origins']:,})" for name, scores in series]
    ax_cov.set_xticks(at, labels, rotation=90, fontsize=7)
    ax_cov.set(ylabel="coverage", title=f"{timeframe} coverage per series (origins), sorted by {reference}'s 95 %")
    ax_cov.legend(fontsize=7, ncol=2)
    ax_delta = axes[2]
    deltas = [100 * (scores[peer]["pin5"] / scores[reference]["pin5"] - 1) for _, scores in series]
    origins = np.array([scores[reference]["n_origins"] for _, scores in series], dtype=float)
    # opacity by origins: a series with few origins is a few weeks of one regime, its Δ mostly noise
    alpha = 0.25 + 0.75 * origins / max(origins.max(), 1)
    for y, value, shade, count in zip(at, deltas, alpha, origins, strict=True):
        ax_delta.barh(y, value, color="C2" if value > 0 else "C3", alpha=float(shade))
        ax_delta.annotate(f"{count:,.0f}", (value, y), xytext=(3 if value >= 0 else -3, 0),
                          textcoords="offset points", va="center", ha="left" if value >= 0 else "right", fontsize=6)
    ax_delta.axvline(0, color="grey")
    ax_delta.set_yticks(at, [name for name, _ in series], fontsize=7)
    ax_delta.invert_yaxis()  # top to bottom in the coverage panel's left-to-right order
    ax_delta.set(xlabel=f"Δ {peer} vs {reference} (%; > 0: {reference} ahead)",
                 title=f"{timeframe} Δ per series (origins; paler: fewer)")


def _methods_by_horizon(axes, timeframe: str, comparison: dict) -> None:
    ax80, ax95, ax_width = axes
    for i, (name, scores) in enumerate(comparison["methods"].items()):
        per = scores["per_horizon"]
        style = "-" if name == comparison["reference"] else "--"
        label = f"{name} (pin5 {scores['pin5']:.3f})"
        ax80.plot(HORIZONS, per["coverage_80"], style, color=f"C{i}", label=label)
        ax95.plot(HORIZONS, per["coverage_95"], style, color=f"C{i}", label=label)
        ax_width.plot(HORIZONS, per["width_80"], style, color=f"C{i}", label=f"{name} 80%")
        ax_width.plot(HORIZONS, per["width_95"], ":", color=f"C{i}", label=f"{name} 95%")
    band80, band95 = _bands(timeframe)
    ax80.axhspan(*band80, color="grey", alpha=0.15)
    ax95.axhspan(*band95, color="grey", alpha=0.15)
    uncertainty = comparison["methods"][comparison["reference"]].get("coverage_uncertainty")
    if uncertainty:  # the reference's 95 % interval per horizon, where it has one
        for ax, level in ((ax80, "80"), (ax95, "95")):
            rows = [(h, item["ci95"]) for h, item in zip(HORIZONS, uncertainty["per_horizon"][level], strict=True)
                    if item.get("ci95")]
            if rows:
                ax.fill_between([h for h, _ in rows], [ci[0] for _, ci in rows], [ci[1] for _, ci in rows],
                                color="C0", alpha=0.15, label=f"{comparison['reference']} 95 % CI")
    ax80.set(xlabel="horizon (bars)", ylabel="coverage", title=f"{timeframe} 80% coverage by horizon, every method")
    ax95.set(xlabel="horizon (bars)", ylabel="coverage", title=f"{timeframe} 95% coverage by horizon, every method")
    ax_width.set(xlabel="horizon (bars)", ylabel="mean ln(upper/lower)", title=f"{timeframe} interval width")
    for ax in axes:
        ax.legend(fontsize=7)


def _bands(timeframe: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """The timeframe's own 80 % and 95 % coverage targets (`train.targets`: wider at 1w and 1m)."""
    from candlecast.forecast.train import targets

    bands = targets(timeframe)
    return tuple(bands["coverage_80"]), tuple(bands["coverage_95"])


def delta_text(delta: dict) -> str:
    """Δ in % with its 95 % interval (or the reason there is none), then the block bootstrap's when recorded (or
    "too few blocks")."""
    if delta.get("ci95") is None:
        text = f"{100 * delta['delta']:+.1f} % [{delta.get('note', 'no interval')}]"
    else:
        low, high = delta["ci95"]
        text = f"{100 * delta['delta']:+.1f} % [{100 * low:+.1f}, {100 * high:+.1f}]"
    if "bootstrap" not in delta:
        return text
    boot = delta["bootstrap"]
    if boot.get("ci95") is None:
        return f"{text}, bootstrap: {boot.get('note', 'too few blocks')}"
    low, high = boot["ci95"]
    return f"{text}, bootstrap [{100 * low:+.1f}, {100 * high:+.1f}] ({boot['blocks']} blocks)"


def _interval_method(delta: dict, comparison: dict) -> str:
    block_seconds = comparison["block_seconds"]
    if delta.get("method") is None:  # manifests written before the batch t interval
        return f"{delta.get('blocks', 0)} circular blocks of {block_seconds / 86400:.3g} days per resample"
    # comparisons recorded before batches had a calendar floor were BATCH_BARS bars long
    bar_seconds = comparison.get("bar_seconds", block_seconds / BATCH_BARS)
    days = delta["block_bars"] * bar_seconds / 86400
    if delta["ci95"] is None:
        return f"{delta['method']}: none, {delta['note']}"
    text = f"{delta['method']}, {delta['blocks']} batches of {days:.3g} days (t, {delta['blocks'] - 1} df)"
    if "bootstrap" in delta:
        floor = f", none below {MIN_BLOCKS} blocks" if "batch_bars" in comparison else ""  # older: no floor
        text += (f"; then the circular block bootstrap of the external re-test "
                 f"({delta['bootstrap']['block_bars']}-bar blocks{floor})")
    return text


def comparison_text(timeframe: str, comparison: dict) -> str:
    """Markdown: per method pin5 and Δ against the reference (95 % intervals), coverage overall and
    its range over horizons, width, ECE and the worst reliability bin (of those holding ≥ 0.5 % of the pairs);
    then coverage per era."""
    reference = comparison["reference"]
    series = f", {comparison['n_series']} series" if "n_series" in comparison else ""
    delta = next((m["vs_" + reference] for m in comparison["methods"].values() if "vs_" + reference in m), {})
    lines = [f"### {timeframe}: reference {reference}, best peer {comparison['best_peer']}{series}; 95 % intervals: "
             f"{_interval_method(delta, comparison)}", "",
             f"| method | pin5 (%) | Δ peer vs {reference} [95% CI] | cov80 / cov95 | cov80 range over h "
             "| cov95 range over h | width 80/95 | ECE | worst bin gap | origins |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in comparison["methods"].items():
        delta = m.get("vs_" + reference)
        shown = "—" if delta is None else delta_text(delta)
        per = m["per_horizon"]
        gap = worst_reliability_gap(m["reliability"])
        (low80, high80), (low95, high95) = measured_range(per["coverage_80"]), measured_range(per["coverage_95"])
        untested = sum(not measured(value) for value in per["coverage_80"])
        note = f" ({untested} h untested)" if untested else ""
        lines.append(
            f"| {name} | {m['pin5']:.4f} | {shown} | {m['coverage_80']:.3f} / {m['coverage_95']:.3f} "
            f"| {low80:.3f}–{high80:.3f}{note} | {low95:.3f}–{high95:.3f}{note} "
            f"| {m['width_80']:.3f} / {m['width_95']:.3f} | {m['ece']:.3f} | {gap:.3f} | {m['n_origins']:,} |")
    lines += fitted_lines(comparison)
    eras = next(iter(comparison["methods"].values()))["eras"]
    lines += ["", "| method | " + " | ".join(f"era {era} ({_origins(e)}{e['n_pairs']:,} pairs): cov80 / cov95, pin5"
                                           for era, e in eras.items()) + " |"]
    lines.append("|---|" + "---|" * len(eras))
    for name, m in comparison["methods"].items():
        cells = [f"{e['coverage_80']:.3f} / {e['coverage_95']:.3f}, {e['pin5']:.3f}" for e in m["eras"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + uncertainty_lines(comparison) + per_series_lines(comparison))


def fitted_lines(comparison: dict) -> list[str]:
    """Markdown lines: per peer that can fall back (GARCH-t), Δ where it was fitted, those origins and its fallback
    share; "—" where the comparison predates them."""
    reference = comparison["reference"]
    lines = []
    for name, m in comparison["methods"].items():
        if name != "garch-t" or name == reference:
            continue
        delta = m.get(f"vs_{reference}_fitted")
        if delta is None:
            lines.append(f"{name} where fitted (not its t(5) fallback): — (not recorded in this comparison)")
            continue
        rule = f"; fallback by {m['fallback_rule']}" if m.get("fallback_rule") else ""
        lines.append(f"{name} where fitted (not its t(5) fallback): Δ {delta_text(delta)} ({delta['n_origins']:,} "
                     f"origins; fallback share {100 * m['fallback_share']:.1f} %, {m['n_fallback']:,} origins{rule})")
    return ["", *lines, *nested_selection_lines(comparison)] if lines else nested_selection_lines(comparison)


def nested_selection_lines(comparison: dict) -> list[str]:
    """Markdown lines: the choice of kind nested in coins (`train.nested_selection`) against GARCH-t, when made."""
    chosen = comparison.get("nested_selection")
    if not chosen:
        return []
    model, garch = chosen["methods"][NESTED_SELECTION], chosen["methods"]["garch-t"]
    delta = delta_text(garch["vs_" + NESTED_SELECTION])
    return ["", f"the kind chosen per pass without its test coins ({', '.join(chosen['kinds'])}; "
                f"`infra.calibration_check --kinds`): pin5 {model['pin5']:.4f}, cov80 / cov95 "
                f"{model['coverage_80']:.3f} / {model['coverage_95']:.3f}; GARCH-t {garch['pin5']:.4f}, Δ {delta}"]


def _interval(item: dict) -> str:
    if item.get("coverage") is None:
        return "untested"
    if item.get("ci95") is None:
        return f"{item['coverage']:.3f} [none]"
    n_eff = f" (n_eff {item['n_eff']:,.0f})" if item.get("n_eff") else " (batch t)"
    return f"{item['coverage']:.3f} [{item['ci95'][0]:.3f}, {item['ci95'][1]:.3f}]{n_eff}"


def uncertainty_lines(comparison: dict) -> list[str]:
    """Markdown: the reference's coverage per horizon with its 95 % interval and effective sample, its coverage per
    calendar year of origin, and its confidence ECE per horizon against the chance level (comparisons recorded
    before these figures: nothing)."""
    reference = comparison["reference"]
    model = comparison["methods"][reference]
    uncertainty, chance = model.get("coverage_uncertainty"), model.get("ece_chance")
    if not uncertainty or not chance:
        return []
    per = uncertainty["per_horizon"]
    method = next((item["method"] for item in per["80"] if item.get("method")), "none: too few batches")
    lines = ["", f"{reference}: coverage per horizon, 95 % interval ({method}); confidence ECE per horizon and the "
             f"chance ECE of a calibrated forecaster with the same confidences ({chance['reps']} draws, seed "
             f"{chance['seed']})", "", "| h | cov80 [95 % CI] | cov95 [95 % CI] | ECE (chance) |", "|---|---|---|---|"]
    for h, (i80, i95, ece, floor) in enumerate(zip(per["80"], per["95"], chance["per_horizon_ece"],
                                                     chance["per_horizon_chance"], strict=True), start=1):
        shown = "—" if ece is None else f"{ece:.3f} ({floor:.3f})"
        lines.append(f"| {h} | {_interval(i80)} | {_interval(i95)} | {shown} |")
    lines.append(f"| all | {_interval(uncertainty['overall']['80'])} | {_interval(uncertainty['overall']['95'])} "
                 f"| {chance['pooled']:.3f} ({chance['pooled_chance']:.3f}); worst h{chance['max_h']} "
                 f"{chance['max_ece']:.3f} ({chance['max_chance']:.3f}"
                 + (f", worst of 30 by chance {chance['worst_chance']:.3f}" if chance.get("worst_chance") is not None
                    else "") + ") |")
    lines += ["", f"| year of origin | origins | {reference} cov80 [95 % CI] | cov95 [95 % CI] |", "|---|---|---|---|"]
    for year, item in uncertainty["years"].items():
        lines.append(f"| {year} | {item['n_origins']:,} | {_interval(item['80'])} | {_interval(item['95'])} |")
    return lines


def holdout_text(timeframe: str, holdout: dict) -> str:
    """Markdown: the shipped file against the peers on the holdout (`holdout.holdout_comparison`)."""
    if not holdout.get("n_origins"):
        return f"### {timeframe} holdout after {holdout['after']}: {holdout.get('note', 'no origins')}"
    reference = holdout["reference"]
    lines = [f"### {timeframe} holdout: origins after train_end {holdout['after']} ({holdout['first_origin'][:10]} to "
             f"{holdout['last_origin'][:10]}; {holdout['n_origins']:,} origins, {holdout['n_pairs']:,} pairs, "
             f"{holdout['n_series']} series; batches of >= {holdout['batch_bars']} bars), the shipped file", "",
             f"| method | pin5 (%) | Δ vs {reference} [95 % CI] | cov80 / cov95 | origins |", "|---|---|---|---|---|"]
    for name, m in holdout["methods"].items():
        delta = m.get("vs_" + reference)
        lines.append(f"| {name} | {m['pin5']:.4f} | {'—' if delta is None else delta_text(delta)} "
                     f"| {m['coverage_80']:.3f} / {m['coverage_95']:.3f} | {m['n_origins']:,} |")
    return "\n".join(lines)


def series_peer(comparison: dict) -> str:
    """The peer the per-series rows and panel show: GARCH-t (the issue's peer), else the best peer."""
    return "garch-t" if "garch-t" in comparison["methods"] else comparison["best_peer"]


def per_series_lines(comparison: dict) -> list[str]:
    """Markdown rows per series: the reference and GARCH-t (else the best peer), pin5 and coverage, and Δ's point
    value (no interval: one coin is a few regimes). Empty for comparisons recorded before `per_series`."""
    if not comparison.get("per_series"):
        return []
    reference, peer = comparison["reference"], series_peer(comparison)
    lines = ["", f"| series | origins | {reference}: pin5, cov80 / cov95 | {peer}: pin5, cov80 / cov95 "
             f"| Δ {peer} vs {reference} |", "|---|---|---|---|---|"]
    for name, methods in sorted(comparison["per_series"].items()):
        own, other = methods[reference], methods[peer]
        lines.append(f"| {name} | {own['n_origins']:,} "
                     f"| {own['pin5']:.3f}, {own['coverage_80']:.3f} / {own['coverage_95']:.3f} "
                     f"| {other['pin5']:.3f}, {other['coverage_80']:.3f} / {other['coverage_95']:.3f} "
                     f"| {100 * (other['pin5'] / own['pin5'] - 1):+.1f} % |")
    return lines


def _origins(scores: dict) -> str:
    return f"{scores['n_origins']:,} origins, " if "n_origins" in scores else ""


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
