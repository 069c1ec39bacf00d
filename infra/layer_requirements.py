"""Derive each layer's requirements.txt from pyproject.toml, the single source of dependencies.

    python infra/layer_requirements.py --write   # regenerate
    python infra/layer_requirements.py --check   # fail if a layer file drifted
"""

import argparse
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from pyproject.toml by infra/layer_requirements.py; do not edit.\n"


def layer_requirements() -> dict[Path, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        ROOT / "layers/common/requirements.txt": project["dependencies"],
        ROOT / "layers/science/requirements.txt": project["optional-dependencies"]["science"],
    }


def render(requirements: list[str]) -> str:
    return HEADER + "".join(f"{line}\n" for line in requirements)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    drifted = []
    for path, requirements in layer_requirements().items():
        wanted = render(requirements)
        if args.write:
            path.write_text(wanted)
        elif not path.exists() or path.read_text() != wanted:
            drifted.append(path.relative_to(ROOT))
    if drifted:
        print(f"out of date (run `make requirements`): {', '.join(map(str, drifted))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
