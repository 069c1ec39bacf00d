"""A pytest plugin for `make test-clock`: every test starts a few seconds from an hour boundary.

Tests that compute "the newest closed bar" from the clock are right for 59 minutes of each hour and wrong in the
first minute, when the newest bar has closed but not settled (candlecast.ingest.SETTLE_SECONDS); one such test kept a
day's work out of CI. Under tests/clock_shift.c (LD_PRELOAD) this plugin moves the wall clock of pytest and of the
servers it started, PostgreSQL, Redis and moto, forward before each test's setup, to one of STARTS seconds from the
next hour. The monotonic clock, timeouts and sleeps are untouched.
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
OFFSET = struct.Struct("<q")  # nanoseconds, as tests/clock_shift.c reads it


def move_wall_clock(seconds: float) -> None:
    with open(os.environ["CLOCK_SHIFT_FILE"], "r+b") as offset_file:
        (offset_ns,) = OFFSET.unpack(offset_file.read(OFFSET.size))
        offset_file.seek(0)
        offset_file.write(OFFSET.pack(offset_ns + round(seconds * 1e9)))


def next_instant(now: float, seconds_from_hour: float) -> float:
    """The first instant after `now` that lies `seconds_from_hour` from a whole hour."""
    return ((now - seconds_from_hour) // 3600 + 1) * 3600 + seconds_from_hour


def start_of(nodeid: str) -> float:
    return STARTS[zlib.crc32(nodeid.encode()) % len(STARTS)]


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
    return f"clock: each test starts at one of {starts} from an hour (tests/clock_boundaries.py)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    now = time.time()
    target = next_instant(now, start_of(item.nodeid))
    move_wall_clock(target - now)
    item.add_report_section("setup", "clock", f"setup started at {datetime.fromtimestamp(target, UTC).isoformat()}")
