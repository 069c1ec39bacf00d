"""`make mutation`: mutmut over the core modules, each against its own tests; prints the kill rate per module.

    python -m infra.mutation                  # every module (tens of minutes on two cores)
    python -m infra.mutation tickers cache    # some of them (an interrupted run resumes where it stopped)

Each module works on its own copy of the tracked files (.local/mutation/<module>/tree), so the checkout is
never left mutated and runs for different modules may go side by side, and one PostgreSQL serves every
test run (TEST_DATABASE_URL; each run starts its own Redis, which the cache's outage tests stop and
restart). For the API only the body guards are mutated (a patch file names their lines). The survivors'
diffs go to .local/mutation/<module>/survivors.txt: each is a change the tests cannot see.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".local" / "mutation"
MUTMUT = ROOT / ".local" / "qa-venv" / "bin" / "mutmut"
LAYER = "layers/common/candlecast"


@dataclass(frozen=True)
class Target:
    paths: tuple[str, ...]
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # only these functions' lines are mutated (all when empty)


TARGETS = {
    "tickers": Target((f"{LAYER}/tickers.py",), ("tests/test_tickers.py", "tests/test_openapi.py")),
    "timeframes": Target((f"{LAYER}/timeframes.py",), ("tests/test_timeframes.py",)),
    "cache": Target((f"{LAYER}/cache.py",), ("tests/test_cache.py",)),
    "api body guards": Target((f"{LAYER}/api.py",), ("tests/test_api_guards.py",),
                              ("_refused_body", "_json_loads", "_error_result", "lambda_handler_for")),
    "repositories": Target(tuple(f"{LAYER}/repositories/{name}.py" for name in ("symbols", "models", "predictions",
                                                                                  "stats")),
                           ("tests/test_repositories.py",)),
}
KILLED = {"ok_killed", "bad_timeout", "ok_suspicious"}  # a timeout or a slowdown is a mutant the tests noticed


def copy_tree(target: Path) -> None:
    """The tracked and new (not ignored) files, as a clean clone would have them. Copied over an earlier
    copy, mutmut's cache stays: an interrupted run resumes, and survivors are tried again on changed tests."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def folder(name: str) -> Path:
    return WORK / name.replace(" ", "-")


def guard_patch(tree: Path, path: str, functions: tuple[str, ...]) -> Path:
    """A unified diff that 'adds' the named functions' lines: mutmut then mutates only those."""
    source = (tree / path).read_text().splitlines()
    wanted = set()
    for node in ast.walk(ast.parse("\n".join(source))):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            wanted.update(range(node.lineno, node.end_lineno + 1))
    hunks = []
    for number in sorted(wanted):
        hunks.append(f"@@ -{number - 1},0 +{number},1 @@\n+{source[number - 1]}")
    patch = tree.parent / f"{Path(path).stem}.patch"
    patch.write_text(f"--- a/{path}\n+++ b/{path}\n" + "\n".join(hunks) + "\n")
    return patch


def results(tree: Path, paths: tuple[str, ...]) -> tuple[int, int, list[int]]:
    """(killed, total, surviving mutant ids) for the files of one target."""
    with sqlite3.connect(tree / ".mutmut-cache") as db:
        rows = db.execute(
            "SELECT m.id, m.status, f.filename FROM Mutant m JOIN Line l ON m.line = l.id "
            "JOIN SourceFile f ON l.sourcefile = f.id").fetchall()
    mine = [(mutant, status) for mutant, status, filename in rows if filename in paths]
    survivors = [mutant for mutant, status in mine if status == "bad_survived"]
    tested = [status for _, status in mine if status in KILLED or status == "bad_survived"]  # not skipped/untested
    return sum(status in KILLED for status in tested), len(tested), survivors


def run_target(name: str, target: Target, env: dict[str, str]) -> tuple[int, int, list[int]]:
    tree = folder(name) / "tree"
    copy_tree(tree)
    # mutmut 2 counts only exit code 1 as a failure; an import or collection error (pytest's 2, 4) kills too.
    runner = (f"bash -c '{sys.executable} -m pytest -x -q -p no:cacheprovider -o addopts= "
              f"--timeout 120 {' '.join(target.tests)} || exit 1'")
    command = [str(MUTMUT), "run", "--paths-to-mutate", ",".join(target.paths), "--tests-dir", "tests",
               "--runner", runner, "--simple-output", "--no-progress"]
    if target.functions:
        command += ["--use-patch-file", str(guard_patch(tree, target.paths[0], target.functions))]
    started = time.monotonic()
    print(f"[{name}] mutating {', '.join(target.paths)} against {', '.join(target.tests)} …", flush=True)
    subprocess.run(command, cwd=tree, env=env, check=False)
    killed, total, survivors = results(tree, target.paths)
    print(f"[{name}] {killed}/{total} killed in {time.monotonic() - started:.0f} s", flush=True)
    with (folder(name) / "survivors.txt").open("w") as out:
        for mutant in survivors:
            shown = subprocess.run([str(MUTMUT), "show", str(mutant)], cwd=tree, capture_output=True, text=True)
            out.write(f"## mutant {mutant}\n{shown.stdout}\n")
    return killed, total, survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"some of: {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.modules) - set(TARGETS)
    if unknown:
        parser.error(f"unknown module(s) {', '.join(sorted(unknown))}: choose from {', '.join(TARGETS)}")
    if not MUTMUT.exists():
        print(f"{MUTMUT} is missing: run `make qa-tools`", file=sys.stderr)
        return 1
    chosen = args.modules or list(TARGETS)
    sys.path.insert(0, str(ROOT / "layers" / "common"))
    from infra.local_stack import LocalStack

    stack = LocalStack.start(bucket="candlecast-mutation")  # its Redis goes unused
    try:
        env = {**os.environ, "TEST_DATABASE_URL": stack.database_url,
               "PYTHONDONTWRITEBYTECODE": "1"}
        table = {name: run_target(name, TARGETS[name], env) for name in chosen}
    finally:
        stack.close()
    print(f"\n{'module':18} {'killed':>7} {'mutants':>8} {'kill rate':>10}  survivors")
    for name, (killed, total, _) in table.items():
        print(f"{name:18} {killed:7d} {total:8d} {killed / total if total else 0:10.1%}  "
              f"{(folder(name) / 'survivors.txt').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
