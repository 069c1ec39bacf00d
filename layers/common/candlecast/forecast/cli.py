"""Subcommands build-sample, train and backtest; `candlecast.cli` calls `register(subparsers)`."""

import argparse
import json
import os
import sys
from functools import wraps
from pathlib import Path

from candlecast.timeframes import TIMEFRAMES

DEFAULT_SOURCE = "../shared/data/ohlcv"


def register(subparsers) -> None:
    sample = subparsers.add_parser("build-sample", help="rebuild data/ (sample Parquet + symbols.csv) from CSVs")
    sample.add_argument("--source", default=DEFAULT_SOURCE, help="folder of <BASE>-<QUOTE>_<tf>.csv files")
    sample.add_argument("--out", default="data", help="output folder (bucket layout)")
    sample.set_defaults(func=stopping_on_bad_files(build_sample_command))

    train = subparsers.add_parser("train", help="walk-forward backtest, fit and sign a model for a timeframe")
    train.add_argument("--timeframe", required=True, choices=TIMEFRAMES)
    train.add_argument("--data", default=DEFAULT_SOURCE, help="folder of OHLCV files (CSV or Parquet)")
    train.add_argument("--out", default="models", help="folder for {tf}.pkl, {tf}.pkl.sig and manifest.json")
    train.add_argument("--reports", default="reports", help="folder for the PNG report")
    train.add_argument("--folds", type=int, help="walk-forward test folds (default: the timeframe's plan)")
    train.add_argument("--holdout-bars", type=int, help="newest candles that training never reads (default: the "
                       "timeframe's HOLDOUT_BARS; the manifest's train_end is the last candle before them)")
    train.add_argument("--test-fraction", type=float, help="share of time the walk-forward tests cover (default: "
                       "the timeframe's plan)")
    train.add_argument("--evaluate-only", action="store_true", help="walk-forward comparison only: print it and "
                       "write {reports}/{tf}/comparison.png; no model is fitted on all coins or written")
    train.add_argument("--register", action="store_true", help="record the model in the models table")
    train.set_defaults(func=stopping_on_bad_files(train_command))

    scorecard = subparsers.add_parser("scorecard", help="print the shipped models' walk-forward tables against the "
                                      "peers (from the manifest written by train)")
    scorecard.add_argument("--manifest", default="models/manifest.json")
    scorecard.add_argument("--summary", action="store_true", help="one row per timeframe (the README table)")
    scorecard.add_argument("--readme", help="rewrite the summary block of this README file instead of printing")
    scorecard.set_defaults(func=scorecard_command)

    backtest = subparsers.add_parser("backtest", help="evaluate a model on every OHLCV file in a folder (JSON)")
    backtest.add_argument("--data", required=True, help="folder of OHLCV files (CSV or Parquet)")
    backtest.add_argument("--timeframe", required=True, choices=TIMEFRAMES)
    backtest.add_argument("--model", help="model file (default models/{tf}.pkl); its .sig is verified")
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
    from candlecast.forecast.train import register, train_timeframe

    entry = train_timeframe(args.timeframe, Path(args.data), Path(args.out), Path(args.reports), folds=args.folds,
                            holdout_bars=args.holdout_bars, test_fraction=args.test_fraction,
                            evaluate_only=args.evaluate_only)
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


def scorecard_command(args: argparse.Namespace) -> int:
    from candlecast.forecast.report import comparison_text

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
    return 0


PEER_LABELS = {"garch-t": "GARCH-t", "gaussian-rw": "Gaussian RW", "conformal-rw": "conformal RW",
               "baseline": "own baseline"}  # the summary's column order
CANDIDATES = {"learned", "garch-scale", "combined"}  # the model's own candidates besides its baseline: not peers
README_BEGIN, README_END = "<!-- scorecard --summary: begin -->", "<!-- scorecard --summary: end -->"


def summary_table(manifest: dict) -> str:
    """Markdown, one row per timeframe: the shipped model's pin5 and coverage beside each peer's pin5 and Δ
    (every peer in the manifests, GARCH-t first), the holdout (`train_end`), then coverage per era."""
    from candlecast.forecast.evaluate import measured
    from candlecast.forecast.report import delta_text
    from candlecast.forecast.train import targets

    def delta(item: dict | None) -> str:
        if item is None:
            return "—"
        return delta_text(item)

    rows = {tf: manifest[tf] for tf in TIMEFRAMES if "comparison" in manifest.get(tf, {}).get("metrics", {})}
    names = {name for entry in rows.values() for name in entry["metrics"]["comparison"]["methods"]}
    order = list(PEER_LABELS)
    peers = sorted(names - CANDIDATES, key=lambda name: (order.index(name) if name in order else len(order), name))
    header = ["tf", "shipped", "pin5"] + [f"{PEER_LABELS.get(p, p)} pin5, Δ [95 % CI]" for p in peers] + [
        "cov80 / cov95 (range over h)", "horizons in band", "ECE (worst bin)", "origins", "train_end"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    eras = []
    for timeframe, entry in rows.items():
        metrics = entry["metrics"]
        methods, kind = metrics["comparison"]["methods"], metrics["shipped"]
        model, head = methods[kind], metrics["headline"]
        cells = []
        for peer in peers:
            scores = methods.get(peer) if peer != kind else None
            cells.append("—" if scores is None else f"{scores['pin5']:.3f}, {delta(scores.get('vs_' + kind))}")
        low80, high80 = head["coverage_80_over_horizons"]
        low95, high95 = head["coverage_95_over_horizons"]
        bands, horizon = targets(timeframe), model["per_horizon"]
        reached = [(c80, c95) for c80, c95 in zip(horizon["coverage_80"], horizon["coverage_95"], strict=True)
                   if measured(c80) and measured(c95)]  # an untested horizon counts neither in band nor out
        band80, band95 = bands["coverage_80"], bands["coverage_95"]
        in_band = sum(band80[0] <= c80 <= band80[1] and band95[0] <= c95 <= band95[1] for c80, c95 in reached)
        counted = f"{in_band} of {len(reached)}" + (" tested" if len(reached) < len(horizon["coverage_80"]) else "")
        lines.append(f"| {timeframe} | {kind} | {model['pin5']:.3f} | " + " | ".join(cells)
                     + f" | {model['coverage_80']:.3f} ({low80:.2f}–{high80:.2f}) / {model['coverage_95']:.3f} "
                     f"({low95:.2f}–{high95:.2f}) | {counted} "
                     f"| {model['ece']:.3f} ({head['worst_reliability_gap']:.3f}) "
                     f"| {model['n_origins']:,} | {entry.get('train_end', '?')[:10]} |")
        era_cells = [f"{era} {e['coverage_80']:.3f} / {e['coverage_95']:.3f} ({e['n_pairs']:,} pairs)"
                     for era, e in model.get("eras", {}).items()]
        eras.append(f"| {timeframe} | " + "; ".join(era_cells) + " |")
    return "\n".join([*lines, "", "| tf | shipped model's cov80 / cov95 per era |", "|---|---|", *eras])


def readme_with_summary(readme: str, manifest: dict) -> str:
    """`readme` with the text between README_BEGIN and README_END replaced by `summary_table(manifest)`."""
    head, found, rest = readme.partition(README_BEGIN)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise ValueError(f"README has no {README_BEGIN} ... {README_END} block")
    return f"{head}{README_BEGIN}\n{summary_table(manifest)}\n{README_END}{tail}"


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

    path = Path(args.model or f"models/{args.timeframe}.pkl")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
