"""`make test-clock`'s tools: the preloaded clock shim (tests/clock_shift.c) and the plugin's choice of instant."""

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from tests.clock_boundaries import next_instant
from tests.conftest import ROOT


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("now", "start", "expected"), [
    ("2026-12-07 17:30:00", 1.0, "2026-12-07 18:00:01"),
    ("2026-12-07 17:30:00", -2.0, "2026-12-07 17:59:58"),
    ("2026-12-07 17:59:59", -2.0, "2026-12-07 18:59:58"),
    ("2026-12-07 18:00:01", 1.0, "2026-12-07 19:00:01"),
    ("2026-12-31 23:59:00", 58.0, "2027-01-01 00:00:58"),
])
def test_the_next_instant_is_the_first_one_after_now_that_far_from_an_hour(now, start, expected):
    assert next_instant(at(now), start) == at(expected)


@pytest.mark.parametrize(("now", "start", "turn", "expected"), [
    ("2026-12-07 17:30:00", 1.0, "day", "2026-12-08 00:00:01"),
    ("2026-12-07 17:30:00", -2.0, "week", "2026-12-13 23:59:58"),  # the 14th is a Monday
    ("2026-12-14 00:00:00.5", 1.0, "week", "2026-12-14 00:00:01"),
    ("2026-12-07 17:30:00", -2.0, "month", "2026-12-31 23:59:58"),
    ("2026-12-31 23:59:59", -2.0, "month", "2027-01-31 23:59:58"),
    ("2026-12-31 23:59:59", 1.0, "month", "2027-01-01 00:00:01"),
    ("2028-02-03 10:00:00", 1.0, "month", "2028-03-01 00:00:01"),
])
def test_the_next_instant_that_far_from_a_day_week_or_month_turn(now, start, turn, expected):
    assert next_instant(at(now), start, turn) == at(expected)


@pytest.fixture(scope="module")
def clock_shift(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler: make test-clock needs one")
    library = tmp_path_factory.mktemp("clock") / "clock_shift.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(ROOT / "tests" / "clock_shift.c"),
                    "-ldl"], check=True)
    return library


CHILD = """
import json, subprocess, time
from tests.clock_boundaries import move_wall_clock
wall, monotonic = time.time(), time.monotonic()
time.sleep(0.2)
slept = time.monotonic() - monotonic
move_wall_clock(-3600)
print(json.dumps({"wall": wall, "slept": slept, "moved": time.time(),
                  "child_of_child": int(subprocess.run(["date", "+%s"], capture_output=True, text=True).stdout)}))
"""


@pytest.mark.skipif("CLOCK_SHIFT_FILE" in os.environ, reason="this run's own clock is moved (make test-clock)")
def test_the_shim_moves_the_wall_clock_of_a_process_and_its_children_but_not_the_monotonic_clock(
        clock_shift, tmp_path):
    offset = tmp_path / "offset"
    offset.write_bytes((86_400 * 10**9).to_bytes(8, "little", signed=True))
    env = {**os.environ, "LD_PRELOAD": str(clock_shift), "CLOCK_SHIFT_FILE": str(offset), "PYTHONPATH": str(ROOT)}
    before = datetime.now(UTC).timestamp()
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    after = datetime.now(UTC).timestamp()
    seen = json.loads(child.stdout)
    assert before + 86_400 <= seen["wall"] <= after + 86_400
    assert 0.2 <= seen["slept"] < 5  # sleeps and timeouts run on the monotonic clock, untouched
    assert before + 82_800 <= seen["moved"] <= after + 82_800  # the file was rewritten while the child ran
    assert before + 82_800 - 1 <= seen["child_of_child"] <= after + 82_800
    assert int.from_bytes(offset.read_bytes(), "little", signed=True) == 82_800 * 10**9
