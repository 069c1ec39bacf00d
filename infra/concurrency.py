"""Whether API Gateway's route throttles can ever put more requests in flight than a function may run.

A route's throttle is a token bucket of `burst` tokens refilled at `rate` per second: in any T seconds it lets
through at most burst + rate x T requests. A request keeps a unit of its function's concurrency from the
moment Lambda takes it until its function returns, which is at most Lambda's 10 s init limit (a request
that meets no warm container waits for one to start) plus the function's Timeout; call that D. The
requests in flight at any instant were all let through within the last D seconds, so a function never has
more than

    in flight <= sum over its routes of (burst + rate x D)

requests running. When that is at most its reserved concurrency, Lambda never throttles an invoke from
the API, which API Gateway would answer with a 500; the throttle answers 429 instead. The reservation in
turn caps the function's containers, and so its database connections.

    python -m infra.concurrency            # the table for template.yaml's defaults and infra/samconfig.toml
"""

from __future__ import annotations

import logging
import shlex
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from infra.sam_template import DEFAULT_TEMPLATE, Route, load_template, parameter_values, parse_functions, parse_routes

INIT_LIMIT_S = 10  # Lambda's limit on a container's Init phase (on-demand); a longer one is retried in the invoke
SAMCONFIG = Path(__file__).resolve().with_name("samconfig.toml")


@dataclass(frozen=True)
class FunctionBudget:
    function_id: str
    reserved: int | None  # ReservedConcurrentExecutions; None: unreserved
    timeout_s: float
    routes: tuple[Route, ...]

    @property
    def longest_s(self) -> Fraction:
        """How long one request may hold a unit of concurrency: a cold start's init, then the invoke."""
        return INIT_LIMIT_S + Fraction(str(self.timeout_s))

    @property
    def in_flight(self) -> Fraction | None:
        """The most requests the routes' throttles can have in flight at once; None when a route has none."""
        if any(route.throttle is None for route in self.routes):
            return None
        return sum((route.throttle.burst + Fraction(str(route.throttle.rate)) * self.longest_s
                    for route in self.routes if route.throttle is not None), Fraction(0))

    @property
    def problem(self) -> str | None:
        """Why Lambda could throttle a request the API let through (a 500), or None."""
        unthrottled = [route.route_key for route in self.routes if route.throttle is None]
        if unthrottled:
            return f"{', '.join(unthrottled)} has no throttle, so nothing bounds its requests in flight"
        if self.reserved is None:
            return None  # only the account's unreserved concurrency bounds it: the README says what that risks
        if self.in_flight > self.reserved:
            return (f"its routes can have {float(self.in_flight):g} requests in flight (burst + rate x "
                    f"{float(self.longest_s):g} s per route), over its reserved concurrency of {self.reserved}")
        return None


def budgets(template: Mapping, parameters: Mapping[str, Any], template_dir: Path) -> list[FunctionBudget]:
    """One budget per function that has HttpApi routes."""
    notes = logging.getLogger("local_api")
    level = notes.level
    notes.setLevel(logging.ERROR)  # parse_functions' notes on layers a local run skips are not this check's
    try:
        functions = parse_functions(template, template_dir, parameters)
    finally:
        notes.setLevel(level)
    routes = parse_routes(template, parameters)
    return [FunctionBudget(name, spec.reserved_concurrency, spec.timeout_s,
                           tuple(route for route in routes if route.function_id == name))
            for name, spec in functions.items() if any(route.function_id == name for route in routes)]


def samconfig_overrides(path: Path = SAMCONFIG) -> dict[str, dict[str, str]]:
    """Each environment's deploy `parameter_overrides` in samconfig.toml ("Key=\"value\" ..."), by environment."""
    config = tomllib.loads(path.read_text())
    environments = {}
    for name, commands in config.items():
        if not isinstance(commands, dict):  # `version = 0.1`
            continue
        overrides = (commands.get("deploy") or {}).get("parameters", {}).get("parameter_overrides")
        if isinstance(overrides, str):
            environments[name] = dict(item.split("=", 1) for item in shlex.split(overrides))
    return environments


def table(items: list[FunctionBudget]) -> str:
    lines = [f"{'function':26} {'routes':>6} {'timeout':>7} {'held <=':>7} {'in flight <=':>12} {'reserved':>8}  ok"]
    for item in items:
        bound = "unbounded" if item.in_flight is None else f"{float(item.in_flight):g}"
        lines.append(f"{item.function_id:26} {len(item.routes):>6} {item.timeout_s:>6g}s {float(item.longest_s):>6g}s "
                     f"{bound:>12} {item.reserved if item.reserved is not None else 'none':>8}  "
                     f"{'no: ' + item.problem if item.problem else 'yes'}")
    return "\n".join(lines)


def check(template_path: Path = DEFAULT_TEMPLATE, samconfig: Path = SAMCONFIG) -> list[str]:
    """The invariant for the template's defaults and each samconfig environment; prints a table for each and
    returns the problems (empty: none)."""
    template = load_template(template_path)
    problems = []
    environments = {f"samconfig.toml [{name}]": values for name, values in samconfig_overrides(samconfig).items()}
    for where, overrides in {"template defaults": {}, **environments}.items():
        items = budgets(template, parameter_values(template, overrides), Path(template_path).resolve().parent)
        print(f"-- {where}: requests in flight at most, against each function's reserved concurrency\n{table(items)}")
        problems += [f"{where}: {item.function_id}: {item.problem}" for item in items if item.problem]
        unreserved = [item.function_id for item in items if item.reserved is None]
        if unreserved:
            print(f"   unreserved ({', '.join(unreserved)}): only the account's unreserved concurrency bounds them")
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(f"throttle over reservation: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
