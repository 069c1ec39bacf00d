"""Subcommands build-sample, train and backtest; `candlecast.cli` calls `register(subparsers)`."""

import argparse
import json
import os
import sys
from functools import wraps
from pathlib import Path

from candlecast.errors import UnusableInput
from candlecast.seed import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR, ROOT
from candlecast.timeframes import TIMEFRAMES

# Beside the checkout, whatever folder the command runs in.
DEFAULT_SOURCE = str(ROOT.parent / "shared" / "data" / "ohlcv")
DEFAULT_MANIFEST = str(DEFAULT_MODELS_DIR / "manifest.json")


def register(subparsers) -> None:
    sample = subparsers.add_parser("build-sample", help="rebuild data/ (sample Parquet + symbols.csv) from CSVs")
    sample.add_argument("--source", default=DEFAULT_SOURCE, help="folder of <BASE>-<QUOTE>_<tf>.csv files")
    sample.add_argument("--out", default=str(DEFAULT_DATA_DIR), help="output folder (bucket layout)")
    sample.set_defaults(func=stopping_on_bad_files(build_sample_command))

    train = subparsers.add_parser("train", help="walk-forward backtest, fit and sign a model for a timeframe")
    train.add_argument("--timeframe", required=True, choices=TIMEFRAMES)
    train.add_argument("--data", default=DEFAULT_SOURCE, help="folder of OHLCV files (CSV or Parquet)")
    train.add_argument("--out", default=str(DEFAULT_MODELS_DIR),
                       help="folder for {tf}.pkl, {tf}.pkl.sig and manifest.json")
    train.add_argument("--reports", default=str(ROOT / "reports"), help="folder for the PNG report")
    train.add_argument("--folds", type=int, help="walk-forward test folds (default: the timeframe's plan)")
    train.add_argument("--holdout-bars", type=int, help="newest candles that training never reads (default: the "
                       "timeframe's HOLDOUT_BARS; the manifest's train_end is the last candle before them)")
    train.add_argument("--test-fraction", type=float, help="share of time the walk-forward tests cover (default: "
                       "the timeframe's plan)")
    train.add_argument("--evaluate-only", action="store_true", help="walk-forward comparison only: print it and "
                       "write {reports}/{tf}/comparison.png; no model is fitted on all coins or written")
    train.add_argument("--save-walk-forward", help="also write the walk-forward's test origins and every method's "
                       "outputs there (npz), for `candlecast rescore`")
    train.add_argument("--register", action="store_true", help="record the model in the models table")
    train.set_defaults(func=stopping_on_bad_files(train_command))

    scorecard = subparsers.add_parser("scorecard", help="print the shipped models' walk-forward tables against the "
                                      "peers (from the manifest written by train)")
    scorecard.add_argument("--manifest", default=DEFAULT_MANIFEST)
    scorecard.add_argument("--summary", action="store_true", help="one row per timeframe (the README table)")
    scorecard.add_argument("--readme", help="rewrite the summary block of this README file instead of printing")
    scorecard.set_defaults(func=scorecard_command)

    rescore = subparsers.add_parser("rescore", help="recompute a timeframe's walk-forward figures in the manifest "
                                    "from a saved walk-forward (train --evaluate-only --save-walk-forward) and score "
                                    "the shipped file on its holdout; no model file is written")
    rescore.add_argument("--timeframe", required=True, choices=TIMEFRAMES)
    rescore.add_argument("--walk-forward", required=True, help="the npz train --save-walk-forward wrote")
    rescore.add_argument("--manifest", default=DEFAULT_MANIFEST, help="its model files sit beside it")
    rescore.add_argument("--data", default=DEFAULT_SOURCE, help="folder of OHLCV files, the holdout included")
    rescore.add_argument("--reports", help="folder for {tf}/comparison.png (not the repository's)")
    rescore.set_defaults(func=stopping_on_bad_files(rescore_command))

    backtest = subparsers.add_parser("backtest", help="evaluate a model on every OHLCV file in a folder (JSON)")
    backtest.add_argument("--data", required=True, help="folder of OHLCV files (CSV or Parquet)")
    backtest.add_argument("--timeframe", required=True, choices=TIMEFRAMES)
    backtest.add_argument("--model", help="model file (default: the repository's models/{tf}.pkl, wherever "
                          "the command runs); its .sig is verified")
    backtest.add_argument("--no-peers", action="store_true", help="skip the peers (GARCH-t, Gaussian and conformal "
                          "random walks, the file's own baseline)")
    backtest.add_argument("--report", help="folder for {tf}/comparison.png (every method by horizon, reliability, "
                          "per era)")
    backtest.set_defaults(func=stopping_on_bad_files(backtest_command))


def stopping_on_bad_files(command):
    """`command`, printing an unreadable OHLCV file's name and problem and returning 2 instead of a traceback."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        from candlecast.forecast.dataset import OHLCVError

        try:
            return command(args)
        except OHLCVError as error:
            print(f"candlecast {args.command}: {error}", file=sys.stderr)
            return 2

    return run


def build_sample_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.sample import build_sample

    result = build_sample(Path(args.source), Path(args.out))
    print(f"wrote {len(result['files'])} Parquet files and {result['symbols']} symbols to {args.out}",
          file=sys.stderr)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.report import comparison_text
    from candlecast.forecast.train import register, signing_key, train_timeframe

    if not args.evaluate_only:
        signing_key()  # a missing or refused key stops the command before the training, not after it
    entry = train_timeframe(args.timeframe, Path(args.data), Path(args.out), Path(args.reports), folds=args.folds,
                            holdout_bars=args.holdout_bars, test_fraction=args.test_fraction,
                            evaluate_only=args.evaluate_only,
                            save_walk_forward=Path(args.save_walk_forward) if args.save_walk_forward else None)
    if args.evaluate_only:
        from candlecast.forecast.report import write_comparison_report

        print(comparison_text(args.timeframe, entry["comparison"]), file=sys.stderr)
        path = write_comparison_report(Path(args.reports) / args.timeframe, args.timeframe, entry["comparison"])
        print(json.dumps({"timeframe": args.timeframe, "would_ship": entry["kind"], "reason": entry["reason"],
                          "folds": entry["folds"], "methods": headline_scores(entry["comparison"]),
                          "report": str(path)}, indent=2, default=float))
        return 0
    comparison = entry["metrics"]["comparison"]
    print(comparison_text(args.timeframe, comparison), file=sys.stderr)
    print(json.dumps({"timeframe": args.timeframe, "shipped": entry["metrics"]["shipped"], "kind": entry["kind"],
                      "version": entry["version"],
                      "reason": entry["metrics"]["reason"],
                      "held_out_symbols": entry["metrics"]["held_out_symbols"],
                      "methods": headline_scores(comparison), "report": entry.get("report")}, indent=2))
    if args.register:
        if not os.environ.get("DATABASE_URL"):
            print("--register needs DATABASE_URL", file=sys.stderr)
            return 2
        print(f"registered model {register(entry, Path(args.out))}", file=sys.stderr)
    return 0


def rescore_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.report import comparison_text, holdout_text
    from candlecast.forecast.train import rescore_timeframe

    entry = rescore_timeframe(args.timeframe, Path(args.walk_forward), Path(args.manifest), Path(args.data),
                              progress=True)
    metrics = entry["metrics"]
    print(comparison_text(args.timeframe, metrics["comparison"]), file=sys.stderr)
    print(holdout_text(args.timeframe, metrics["holdout"]), file=sys.stderr)
    if args.reports:
        from candlecast.forecast.report import write_comparison_report

        path = write_comparison_report(Path(args.reports) / args.timeframe, args.timeframe, metrics["comparison"])
        print(f"wrote {path}", file=sys.stderr)
    return 0


def scorecard_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.report import comparison_text, holdout_text

    manifest = json.loads(Path(args.manifest).read_text())
    if args.readme:
        path = Path(args.readme)
        path.write_text(readme_with_summary(path.read_text(), manifest))
        return 0
    if args.summary:
        print(summary_table(manifest))
        return 0
    for timeframe in TIMEFRAMES:
        metrics = manifest.get(timeframe, {}).get("metrics", {})
        if "comparison" not in metrics:
            print(f"### {timeframe}: no walk-forward comparison in {args.manifest} (retrain it)\n")
            continue
        print(f"shipped: {metrics['shipped']} ({metrics['reason']})")
        print(comparison_text(timeframe, metrics["comparison"]) + "\n")
        print((holdout_text(timeframe, metrics["holdout"]) if metrics.get("holdout") else
               f"### {timeframe} holdout: not scored in this manifest (candlecast rescore)") + "\n")
    return 0


PEER_LABELS = {"garch-t": "GARCH-t", "gaussian-rw": "Gaussian RW", "conformal-rw": "conformal RW",
               "baseline": "own baseline"}  # the summary's column order
CANDIDATES = {"learned", "garch-scale", "combined"}  # the model's own candidates besides its baseline: not peers
README_BEGIN, README_END = "<!-- scorecard --summary: begin -->", "<!-- scorecard --summary: end -->"


NOT_RECOMPUTED = "n/a¹"
FOOTNOTE = ("¹ not in this timeframe's manifest entry: its figures predate the calendar-floor batches, the holdout "
            "scoring, the coverage intervals and the per-horizon ECE (`candlecast rescore`); its Δ intervals are "
            "the old 60-bar ones.")


def band_counts(timeframe: str, model: dict) -> tuple[int, int, int | None, int]:
    """(horizons in band, horizons tested, horizons whose 80 % and 95 % intervals both overlap their bands or None
    when the comparison has no intervals, horizons with both intervals)."""
    from candlecast.forecast.evaluate import measured
    from candlecast.forecast.train import targets

    bands, horizon = targets(timeframe), model["per_horizon"]
    band80, band95 = bands["coverage_80"], bands["coverage_95"]
    reached = [(c80, c95) for c80, c95 in zip(horizon["coverage_80"], horizon["coverage_95"], strict=True)
               if measured(c80) and measured(c95)]  # an untested horizon counts neither in band nor out
    in_band = sum(band80[0] <= c80 <= band80[1] and band95[0] <= c95 <= band95[1] for c80, c95 in reached)
    uncertainty = model.get("coverage_uncertainty")
    if not uncertainty:
        return in_band, len(reached), None, 0
    consistent = judged = 0
    for i80, i95 in zip(uncertainty["per_horizon"]["80"], uncertainty["per_horizon"]["95"], strict=True):
        if not (i80.get("ci95") and i95.get("ci95")):
            continue
        judged += 1
        consistent += (i80["ci95"][0] <= band80[1] and i80["ci95"][1] >= band80[0]
                       and i95["ci95"][0] <= band95[1] and i95["ci95"][1] >= band95[0])
    return in_band, len(reached), consistent, judged


def _short_delta(item: dict | None) -> str:
    """Δ in % with the batch t interval or the reason for none, then the bootstrap's interval or "too few blocks"."""
    if item is None:
        return "—"
    if item.get("ci95") is None:
        text = f"{100 * item['delta']:+.1f} % [too few batches: {item['blocks']}]"
    else:
        text = f"{100 * item['delta']:+.1f} % [{100 * item['ci95'][0]:+.1f}, {100 * item['ci95'][1]:+.1f}] " \
               f"({item['blocks']} batches)"
    boot = item.get("bootstrap")
    if boot is None:
        return text
    if boot.get("ci95") is None:
        return f"{text}; bootstrap: too few blocks ({boot['blocks']})"
    return f"{text}; bootstrap [{100 * boot['ci95'][0]:+.1f}, {100 * boot['ci95'][1]:+.1f}] ({boot['blocks']} blocks)"


def _holdout_cell(metrics: dict) -> str:
    hold = metrics.get("holdout")
    if not hold:
        return NOT_RECOMPUTED
    if not hold.get("n_origins"):
        return "no origins"
    kind = hold["reference"]
    own, garch = hold["methods"][kind], hold["methods"].get("garch-t")
    text = f"{hold['n_origins']:,} origins, {hold['first_origin'][:10]} on: {own['pin5']:.3f}"
    if garch is None:
        return text
    return f"{text} vs GARCH-t {garch['pin5']:.3f}, Δ {_short_delta(garch['vs_' + kind])}"


def summary_table(manifest: dict) -> str:
    """Markdown, one row per timeframe: the shipped model's pin5 and Δ against GARCH-t with its intervals, the
    holdout (after `train_end`), coverage over horizons, horizons in band and consistent with it, ECE pooled and
    its largest per horizon against chance; then the other peers, coverage per era and per calendar year."""
    rows = {tf: manifest[tf] for tf in TIMEFRAMES if "comparison" in manifest.get(tf, {}).get("metrics", {})}
    names = {name for entry in rows.values() for name in entry["metrics"]["comparison"]["methods"]}
    order = list(PEER_LABELS)
    peers = sorted(names - CANDIDATES - {"garch-t"},
                   key=lambda name: (order.index(name) if name in order else len(order), name))
    header = ["tf", "shipped", "pin5", "GARCH-t pin5, Δ [95 % CI] (batch t; block bootstrap)",
              "holdout after train_end: pin5, GARCH-t pin5, Δ", "cov80 / cov95 (range over h)",
              "horizons in band; consistent with it²", "ECE pooled (chance); worst h (chance); worst bin",
              "origins", "train_end"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    others = ["| tf | " + " | ".join(f"{PEER_LABELS.get(p, p)} pin5, Δ [95 % CI]" for p in peers) + " |",
              "|---|" + "---|" * len(peers)]
    eras, years, nesting, missing = [], [], [], False
    fitted = ["| tf | vs GARCH-t where GARCH-t was fitted (not its t(5) fallback): Δ [95 % CI] (batch t; block "
              "bootstrap) | origins | GARCH-t fallback share of the test origins |", "|---|---|---|---|"]
    selection = ["| tf | each pass's kind, chosen on its training coins³ | pin5 | GARCH-t pin5, Δ [95 % CI] | Δ "
                 "where GARCH-t was fitted | cov80 / cov95 (range over h) | horizons in band |",
                 "|---|---|---|---|---|---|---|"]
    for timeframe, entry in rows.items():
        metrics = entry["metrics"]
        methods, kind = metrics["comparison"]["methods"], metrics["shipped"]
        model, head = methods[kind], metrics["headline"]
        garch = methods.get("garch-t") if kind != "garch-t" else None
        garch_cell = "—" if garch is None else f"{garch['pin5']:.3f}, {_short_delta(garch.get('vs_' + kind))}"
        low80, high80 = head["coverage_80_over_horizons"]
        low95, high95 = head["coverage_95_over_horizons"]
        in_band, tested, consistent, judged = band_counts(timeframe, model)
        counted = f"{in_band} of {tested}" + (" tested" if tested < len(model["per_horizon"]["coverage_80"]) else "")
        if consistent is None:
            consistent_cell = NOT_RECOMPUTED
        elif not judged:
            consistent_cell = "no interval (too few batches)"
        else:
            none = "" if judged == tested else f" with an interval ({tested - judged} none)"
            consistent_cell = f"{consistent} of {judged}{none}"
        chance = model.get("ece_chance")
        if chance:
            worst = f", worst of 30 {chance['worst_chance']:.3f}" if chance.get("worst_chance") is not None else ""
            ece = (f"{model['ece']:.3f} ({chance['pooled_chance']:.3f}); h{chance['max_h']} {chance['max_ece']:.3f} "
                   f"({chance['max_chance']:.3f}{worst}); {head['worst_reliability_gap']:.3f}")
        else:
            ece = f"{model['ece']:.3f} ({NOT_RECOMPUTED}); {NOT_RECOMPUTED}; {head['worst_reliability_gap']:.3f}"
        missing |= not chance or not metrics.get("holdout") or consistent is None
        lines.append(f"| {timeframe} | {kind} | {model['pin5']:.3f} | {garch_cell} | {_holdout_cell(metrics)} "
                     f"| {model['coverage_80']:.3f} ({low80:.2f}–{high80:.2f}) / {model['coverage_95']:.3f} "
                     f"({low95:.2f}–{high95:.2f}) | {counted}; {consistent_cell} | {ece} "
                     f"| {model['n_origins']:,} | {entry.get('train_end', '?')[:10]} |")
        fitted.append(f"| {timeframe} | {_fitted_cells(garch, kind)} |")
        selection.append(f"| {timeframe} | {_selection_cells(timeframe, metrics['comparison'])} |")
        nesting.append(f"{timeframe} {_pass_choices(metrics.get('pass_choices'))}")
        cells = []
        for peer in peers:
            scores = methods.get(peer) if peer != kind else None
            cells.append("—" if scores is None else f"{scores['pin5']:.3f}, {_short_delta(scores.get('vs_' + kind))}")
        others.append(f"| {timeframe} | " + " | ".join(cells) + " |")
        era_cells = [f"{era} {e['coverage_80']:.3f} / {e['coverage_95']:.3f} ({e['n_pairs']:,} pairs)"
                     for era, e in model.get("eras", {}).items()]
        eras.append(f"| {timeframe} | " + "; ".join(era_cells) + " |")
        by_year = (model.get("coverage_uncertainty") or {}).get("years")
        years.append(f"| {timeframe} | " + ("; ".join(
            f"{year} {_coverage_cell(item['80'])} / {_coverage_cell(item['95'])} ({item['n_origins']:,})"
            for year, item in by_year.items()) if by_year else NOT_RECOMPUTED) + " |")
    notes = ["", "² the horizons whose 80 % and 95 % coverage intervals (block bootstrap with ≥ 10 blocks, else "
             "batch t) both overlap the bands; \"none\": too few batches for an interval.",
             "", "Plan and `TimeframeConfig` choices per coin-group pass of the walk-forward (`train.PASS_CHOICES`: "
             "made by the inner check "
             "on that pass's training coins alone, so nested in coins, not in time): " + "; ".join(nesting) + "."]
    if missing:
        notes.append(FOOTNOTE)
    selection += ["", "³ the shipped kind is chosen on the walk-forward it is reported on; here each pass's test coins "
                  "get the kind `train.choose` picked without them (`infra.calibration_check --kinds`, "
                  "`train.PASS_CHOICES`), so this row is the choice of kind nested in coins."]
    return "\n".join([*lines, *notes, "", *fitted, "", *selection, "", *others, "",
                      "| tf | shipped model's cov80 / cov95 per era |",
                      "|---|---|", *eras, "", "| tf | shipped model's cov80 / cov95 [95 % CI] per calendar year of "
                      "origin (origins) |", "|---|---|", *years])


def _pass_choices(choices: list[dict] | None) -> str:
    """A manifest's `pass_choices` in words: each pass's overrides of the plan and of its `TimeframeConfig`."""
    if choices is None:
        return "not nested (the plan in every pass)"
    changed = [f"pass {number} " + ", ".join(f"{field} {value}" for field, value in overrides.items())
               for number, overrides in enumerate(choices, 1) if overrides]
    return ", ".join(changed) if changed else "the plan's in every pass"


def _selection_cells(timeframe: str, comparison: dict) -> str:
    """The walk-forward's nested choice of kind (`train.nested_selection`) against GARCH-t, or why there is none."""
    from candlecast.forecast.comparison import NESTED_SELECTION
    from candlecast.forecast.evaluate import measured_range

    chosen = comparison.get("nested_selection")
    if not chosen:
        return "not chosen per pass on these candles | — | — | — | — | —"
    model, garch = chosen["methods"][NESTED_SELECTION], chosen["methods"]["garch-t"]
    (low80, high80), (low95, high95) = (measured_range(model["per_horizon"][key])
                                        for key in ("coverage_80", "coverage_95"))
    in_band, tested, _, _ = band_counts(timeframe, model)
    return (f"{', '.join(chosen['kinds'])} | {model['pin5']:.3f} | {garch['pin5']:.3f}, "
            f"{_short_delta(garch['vs_' + NESTED_SELECTION])} | "
            f"{_short_delta(garch.get('vs_' + NESTED_SELECTION + '_fitted'))} | {model['coverage_80']:.3f} "
            f"({low80:.2f}–{high80:.2f}) / {model['coverage_95']:.3f} ({low95:.2f}–{high95:.2f}) | "
            f"{in_band} of {tested}")


def _fitted_cells(peer: dict | None, kind: str) -> str:
    """Δ against `peer` where it was fitted, those origins, and its fallback share (manifests without them: —)."""
    delta = None if peer is None else peer.get(f"vs_{kind}_fitted")
    if delta is None:
        return "— | — | —"
    return (f"{_short_delta(delta)} | {delta['n_origins']:,} | {100 * peer['fallback_share']:.1f} % "
            f"({peer['n_fallback']:,})")


def _coverage_cell(item: dict) -> str:
    if item.get("ci95") is None:
        return f"{item['coverage']:.2f}"
    return f"{item['coverage']:.2f} [{item['ci95'][0]:.2f}, {item['ci95'][1]:.2f}]"


def readme_with_summary(readme: str, manifest: dict) -> str:
    """`readme` with the text between README_BEGIN and README_END replaced by `summary_table(manifest)`."""
    return readme_with_block(readme, README_BEGIN, README_END, summary_table(manifest))


def readme_with_block(readme: str, begin: str, end: str, text: str) -> str:
    """`readme` with the text between the marker lines `begin` and `end` replaced by `text`: how every generated
    README block is written (this summary; infra.local_track_record's figures of the seeded local stack), and how
    the tests that keep each in sync compare it (`readme_with_...(readme, ...) == readme`)."""
    head, found, rest = readme.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise UnusableInput(f"README has no {begin} ... {end} block")
    return f"{head}{begin}\n{text}\n{end}{tail}"


def headline_scores(comparison: dict) -> dict:
    """Per method: pin5, Δ against the reference with its interval, coverage, width, ECE (no per-horizon lists)."""
    keys = ("pin5", "coverage_80", "coverage_95", "width_80", "width_95", "ece", "n_origins")
    reference = "vs_" + comparison["reference"]
    return {name: {key: scores[key] for key in keys} | ({reference: scores[reference]} if reference in scores else {})
            for name, scores in comparison["methods"].items()}


def backtest_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.backtest import backtest, load_signed_model
    from candlecast.forecast.report import comparison_text
    from candlecast.forecast.train import signing_key
    from candlecast.seed import DEFAULT_MODELS_DIR

    path = Path(args.model) if args.model else DEFAULT_MODELS_DIR / f"{args.timeframe}.pkl"
    model = load_signed_model(path, signing_key())
    result = backtest(model, Path(args.data), args.timeframe, progress=True, peers=not args.no_peers)
    for item in result["unscored_files"]:
        print(f"not scored: {item['file']}: {item['reason']}", file=sys.stderr)
    if "comparison" in result:
        print(comparison_text(args.timeframe, result["comparison"]), file=sys.stderr)
        if args.report:
            from candlecast.forecast.report import write_comparison_report

            path = write_comparison_report(Path(args.report) / args.timeframe, args.timeframe, result["comparison"])
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m candlecast.forecast.cli ...`); `candlecast` wires the same commands."""
    parser = argparse.ArgumentParser(prog="candlecast-forecast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from candlecast.cli import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
