"""A pytest plugin for `make test-clock`: every test starts a few seconds from an hour boundary.

Tests that compute "the newest closed bar" from the clock are right for 59 minutes of each hour and wrong in the
first minute, when the newest bar has closed but not settled (candlecast.ingest.SETTLE_SECONDS); one such test kept a
day's work out of CI. Under tests/clock_shift.c (LD_PRELOAD) this plugin moves the wall clock of pytest and of the
servers it started, PostgreSQL, Redis and moto, forward before each test's setup, to one of STARTS seconds from the
next turn of the hour, or of the day, week or calendar month (which turn the hour too). The monotonic clock, timeouts
and sleeps are untouched. The clock ends a run of ~560 tests some seven years ahead.
"""

import os
import struct
import time
import zlib
from datetime import UTC, datetime

import pytest

# Seconds from the hour at which a test's setup starts: the hour turns during setup, or has just turned. Either way
# the body runs in the minute when the newest hourly bar has closed but not settled. Each test gets one, the same on
# every run. CLOCK_STARTS (seconds, comma-separated) replaces them: CLOCK_STARTS=58 lets the bar settle mid-test.
STARTS = tuple(float(start) for start in os.environ.get("CLOCK_STARTS", "-2,1").split(","))
# What turns at a test's start, one per test (UTC; weeks turn on Monday, months on the 1st): the 1d, 1w and 1m bars
# close there. CLOCK_TURNS=hour keeps the clock within weeks of now.
TURNS = tuple(os.environ.get("CLOCK_TURNS", "hour,day,week,month").split(","))
OFFSET = struct.Struct("<q")  # nanoseconds, as tests/clock_shift.c reads it


def move_wall_clock(seconds: float) -> None:
    with open(os.environ["CLOCK_SHIFT_FILE"], "r+b") as offset_file:
        (offset_ns,) = OFFSET.unpack(offset_file.read(OFFSET.size))
        offset_file.seek(0)
        offset_file.write(OFFSET.pack(offset_ns + round(seconds * 1e9)))


def next_turn(moment: float, turn: str) -> float:
    """The first turn of the hour, day, week or month strictly after `moment`."""
    if turn == "month":
        start = datetime.fromtimestamp(moment, UTC)
        first = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
        return first.timestamp()
    period, phase = {"hour": (3600, 0), "day": (86_400, 0), "week": (604_800, 4 * 86_400)}[turn]  # 1970-01-05: Monday
    return ((moment - phase) // period + 1) * period + phase


def next_instant(now: float, seconds_from_turn: float, turn: str = "hour") -> float:
    """The first instant after `now` that lies `seconds_from_turn` from a turn of the hour (day, week, month)."""
    return next_turn(now - seconds_from_turn, turn) + seconds_from_turn


def start_of(nodeid: str) -> tuple[float, str]:
    choice = zlib.crc32(nodeid.encode())
    return STARTS[choice % len(STARTS)], TURNS[choice // len(STARTS) % len(TURNS)]


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("CLOCK_SHIFT_FILE"):
        raise pytest.UsageError("tests.clock_boundaries needs CLOCK_SHIFT_FILE and tests/clock_shift.c preloaded: "
                                "run it with `make test-clock`")
    before = time.time()
    move_wall_clock(3600)
    moved = time.time() - before
    move_wall_clock(-3600)
    if not 3599 < moved < 3700:
        raise pytest.UsageError("the wall clock did not move: tests/clock_shift.c is not preloaded (make test-clock)")


def pytest_report_header() -> str:
    starts = ", ".join(f"{start:+g} s" for start in STARTS)
    return f"clock: each test starts at one of {starts} from the turn of one of: {', '.join(TURNS)} " \
           "(tests/clock_boundaries.py)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    now = time.time()
    target = next_instant(now, *start_of(item.nodeid))
    move_wall_clock(target - now)
    item.add_report_section("setup", "clock", f"setup started at {datetime.fromtimestamp(target, UTC).isoformat()}")
