"""The README's figures of the local stack's track record: what a fresh `make run` serves.

    python -m infra.local_track_record                     # print the block
    python -m infra.local_track_record --readme README.md  # rewrite README's block (section "Live track record")

Starts a throwaway stack (embedded PostgreSQL, Redis and S3 in a temporary folder: never .local/state, never the
servers DATABASE_URL / REDIS_URL / S3_ENDPOINT_URL name), applies the migrations, seeds the committed sample as
`make run` does (infra.run_local.seed_sample: symbols, candles, models, and the track record at past origins,
scored), reads what GET /models, GET /models/1h and GET /health serve (candlecast.services.track_record and
health, the functions those routes call), writes it between README_BEGIN and README_END, and stops everything.
The models in models/ change when they are retrained: run it then. tests/test_local_track_record.py fails while
the README's block differs from what the seeded stack serves. Offline only: infra/ ships in no Lambda layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from candlecast.drift import (
    BLOCK_MIN_BARS,
    BLOCK_MIN_DAYS,
    CALIBRATED,
    DRIFT_BAND,
    DRIFT_NORMAL_QUANTILE,
    MIN_BLOCKS,
)
from candlecast.errors import UnusableInput
from candlecast.forecast.cli import readme_with_block
from candlecast.timeframes import TIMEFRAMES

if TYPE_CHECKING:
    from candlecast.seed import SeedReport

ROOT = Path(__file__).resolve().parent.parent
README_BEGIN = "<!-- python -m infra.local_track_record: begin -->"
README_END = "<!-- python -m infra.local_track_record: end -->"
TABLE_TIMEFRAME = "1h"  # the README's `curl -s localhost:3000/models/1h` table
WIDTH = 116  # the README's prose lines
MODE_LABELS = {"live": "`live`", "replay": "`NO LIVE FIGURES` (a replay)", "none": "no track record",
               "as-of": "`--as-of`"}


@dataclass
class Served:
    """What the seeded stack says: the seed's report and the parsed bodies of GET /models, GET /models/1h and
    GET /health."""

    seed: SeedReport
    models: list[dict]
    table_model: dict
    health: dict


def served(report: SeedReport) -> Served:
    """The bodies the routes serve on the stack that os.environ names, which `report`'s seed filled."""
    from candlecast.services import health, track_record

    return Served(seed=report, models=json.loads(track_record.all_models()),
                  table_model=json.loads(track_record.one_timeframe(TABLE_TIMEFRAME)),
                  health=json.loads(health.check()[1]))


def readme_with_track_record(readme: str, figures: Served) -> str:
    """`readme` with its README_BEGIN ... README_END block replaced by `block(figures)`."""
    return readme_with_block(readme, README_BEGIN, README_END, block(figures))


def _number(value: float | None, sign: str = "") -> str:
    return "—" if value is None else f"{value:{sign}.3f}"


def _day(timestamp: str | None) -> str:
    return timestamp[:10] if timestamp else "—"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _wrapped(text: str) -> str:
    """`text` wrapped as the README's prose is, never inside a `code span`, "80 %" or "a → b"."""
    glued = re.sub(r"`[^`]*`", lambda span: span[0].replace(" ", "\0"), text)
    glued = glued.replace(" %", "\0%").replace(" → ", "\0→\0")
    return textwrap.fill(glued, WIDTH, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def block(figures: Served) -> str:
    """The README block: what the seed printed, the 1h table, and every other timeframe's live 80 % coverage
    against its backtest's, with what /health says about drift."""
    return "\n\n".join((_wrapped(_seed_sentence(figures.seed)), _table(figures), _wrapped(_others(figures))))


def _seed_sentence(report: SeedReport) -> str:
    modes: dict[str, list[str]] = {}
    for plan in sorted(report.plans, key=lambda plan: TIMEFRAMES.index(plan.timeframe)):
        modes.setdefault(plan.mode, []).append(plan.timeframe)
    if list(modes) == ["live"] and len(modes["live"]) == len(TIMEFRAMES):
        said = "`live` for every timeframe"
    else:
        said = "; ".join(f"{MODE_LABELS.get(mode, mode)} for {_listed(timeframes)}"
                         for mode, timeframes in modes.items()) or "no track record"
    return (f"A fresh `make run` prints {said} ({report.past_predictions:,} predictions, {report.scored_steps:,} "
            f"steps scored). `curl -s localhost:3000/models/{TABLE_TIMEFRAME}` then shows:")


def _table(figures: Served) -> str:
    record = figures.table_model
    plan = next((plan for plan in figures.seed.plans if plan.timeframe == TABLE_TIMEFRAME), None)
    train_end = f"`train_end` {_day(record['model']['train_end'])}"
    if plan is not None:
        series = len({ticker for ticker, _, _ in plan.origins})
        origins = f"{series} series, {len(plan.origins)} origins"
        labels = {"live": f"`live` ({origins} after {train_end})" if plan.mode != "replay" else "`live`",
                  "replay": f"`replay` ({origins}, up to {train_end})" if plan.mode == "replay" else "`replay`"}
    else:
        labels = {"live": "`live`", "replay": "`replay`"}
    rows = ["| | steps | period | cov80 (`accuracy`) | cov95 | ECE | skill vs own baseline |",
            "|---|---|---|---|---|---|---|"]
    for kind in ("live", "replay"):
        if (live := record.get(kind)) is not None:
            rows.append(f"| {labels[kind]} | **{live['n_scored']:,}** | {_day(live['period_start'])} → "
                        f"{_day(live['period_end'])} | {_number(live['coverage_80'])} | {_number(live['coverage_95'])} "
                        f"| {_number(live['ece'])} | {_number(live['pinball_skill'], '+')} |")
    backtest = record["backtest"]
    origins = f", {backtest['n_origins']:,} origins" if backtest.get("n_origins") is not None else ""
    pairs = f"{backtest['n_pairs']:,}" if backtest.get("n_pairs") is not None else "—"
    rows.append(f"| `backtest` (walk-forward, held-out coins{origins}) | {pairs} | — | "
                f"{_number(backtest['coverage_80'])} | {_number(backtest['coverage_95'])} | "
                f"{_number(backtest['ece'])} | {_number(backtest['pinball_skill'], '+')} |")
    return "\n".join(rows)


def _others(figures: Served) -> str:
    record = figures.table_model
    replay = ("`replay` is null: nothing seeded lies inside the training window." if record.get("replay") is None
              else f"`replay` holds {record['replay']['n_scored']:,} steps seeded inside the training window, "
                   "never counted as live.")
    accuracy = record["model"]["accuracy"]
    text = f"{replay} `models.accuracy` is {'null' if accuracy is None else _number(accuracy)}."
    others = [item for item in figures.models if item["timeframe"] != TABLE_TIMEFRAME]
    if others:
        live = ", ".join(f"{item['timeframe']} {_number(item['live']['coverage_80'])} "
                         f"({item['live']['n_scored']:,}{' steps' if index == 0 else ''})"
                         for index, item in enumerate(others))
        backtests = _listed([_number(item["backtest"]["coverage_80"]) for item in others])
        text += (f" The other timeframes' live 80 % coverage (`GET /models`): {live}, against "
                 f"{'backtests of' if len(others) > 1 else 'a backtest of'} {backtests};")
    else:
        text += " No other timeframe has an active model;"
    return f"{text} {_drift(figures)}"


def _drift(figures: Served) -> str:
    """What GET /health says under `drift`, and which live coverage lies outside the band without evidence."""
    periods = {item["timeframe"]: item["live"] for item in figures.models}
    drifting = [tf for tf in TIMEFRAMES if tf in figures.health["drift"]]
    low, high = DRIFT_BAND

    def why(timeframe: str) -> str:
        coverage = figures.health["drift"][timeframe]["live_coverage_80"]
        live = periods.get(timeframe) or {}
        return (f"{timeframe} (bands {'too wide' if coverage > high else 'too narrow'} over "
                f"{_day(live.get('period_start'))} → {_day(live.get('period_end'))})")

    text = ("`GET /health` reports no `drift`." if not drifting else
            f"`GET /health` reports `drift` for {_listed([why(timeframe) for timeframe in drifting])}.")
    few = [item for item in figures.models if item["timeframe"] not in drifting
           and item["live"]["coverage_80"] is not None and not low <= item["live"]["coverage_80"] <= high]
    if few:
        named = _listed([f"{item['timeframe']}'s {_number(item['live']['coverage_80'])}" for item in few])
        text += (f" {named} {'lies' if len(few) == 1 else 'lie'} outside [{low}, {high}]{' too' if drifting else ''}"
                 f", but without the evidence `drift` needs ({MIN_BLOCKS} blocks of outcome days, each at least "
                 f"{BLOCK_MIN_DAYS} days and {BLOCK_MIN_BARS} candles; {DRIFT_NORMAL_QUANTILE:g} standard errors "
                 f"from {CALIBRATED:.2f}).")
    return text


def seeded_figures(progress: bool) -> Served:
    """A throwaway stack, migrated and seeded as `make run` seeds it; what it serves. Prints each step."""
    from candlecast import migrate
    from candlecast.snapstart import forget_connections_and_secrets
    from infra.local_stack import started_stack
    from infra.run_local import seed_sample

    started = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f} s] {message}", file=sys.stderr, flush=True)

    step("starting a throwaway local stack (embedded PostgreSQL, Redis and S3 in a temporary folder)…")
    with started_stack("candlecast-track-record", POWERTOOLS_LOG_LEVEL="WARNING") as stack:
        try:
            applied = migrate.apply(stack.database_url)
            step(f"migrations: {len(applied)} applied; seeding data/ and models/ as `make run` does…")
            with contextlib.redirect_stdout(sys.stderr):  # the seed's lines are progress; stdout gets the block
                report = seed_sample(ROOT / "data", ROOT / "models", progress=progress)
            step(report.summary())
            figures = served(report)
            step("read GET /models, GET /models/1h and GET /health; stopping the stack…")
        finally:
            forget_connections_and_secrets()  # the pool and clients, before their servers go away
    step("stopped")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", help="rewrite the block of this README file (between "
                        f"{README_BEGIN} and {README_END}) instead of printing it")
    args = parser.parse_args(argv)
    readme = Path(args.readme) if args.readme else None
    try:
        if readme is not None:  # before the stack starts: a missing block is said at once
            readme_with_block(readme.read_text(), README_BEGIN, README_END, "")
    except (OSError, UnusableInput) as error:
        print(f"local_track_record: {error}", file=sys.stderr)
        return 1
    figures = seeded_figures(progress=sys.stderr.isatty())
    if readme is None:
        print(block(figures))
        return 0
    readme.write_text(readme_with_track_record(readme.read_text(), figures))
    print(f"wrote the block of {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
