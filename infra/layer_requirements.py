"""Derive each layer's requirements.txt from pyproject.toml, the single source of dependencies, and pin what
the layers install (layers/constraints.txt), so `sam build` installs the versions CI built and ran.

    python infra/layer_requirements.py --write   # regenerate the requirements files
    python infra/layer_requirements.py --check   # fail if a layer file drifted, or a requirement is not pinned
    python infra/layer_requirements.py --lock    # resolve both layers for Lambda arm64 again (the registry's newest)
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from pyproject.toml by infra/layer_requirements.py; do not edit.\n"
CONSTRAINTS = ROOT / "layers/constraints.txt"
LOCK_HEADER = ("# Every distribution the two layers install, pinned. `make lock-layers`\n"
               "# resolves layers/*/requirements.txt for Lambda arm64 again; the layer Makefiles install under it.\n")
LAMBDA_TARGET = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
                 "--platform", "manylinux2014_aarch64", "--implementation", "cp", "--python-version", "3.12",
                 "--only-binary=:all:"]


def layer_requirements() -> dict[Path, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        ROOT / "layers/common/requirements.txt": project["dependencies"],
        ROOT / "layers/science/requirements.txt": project["optional-dependencies"]["science"],
    }


def render(requirements: list[str]) -> str:
    return HEADER + "".join(f"{line}\n" for line in requirements)


def unpinned_requirements() -> list[str]:
    """Each layer requirement that constraints.txt does not pin to a version it allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines() if CONSTRAINTS.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    unpinned = []
    for requirements in layer_requirements().values():
        for line in requirements:
            requirement = Requirement(line)
            pinned = pins.get(canonicalize_name(requirement.name))
            if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
                unpinned.append(line)
    return unpinned


def lock() -> str:
    """layers/constraints.txt's text: pip's resolution of both layers' requirements for the Lambda runtime. Read
    from pyproject.toml, not the generated files: `--write` refuses a requirement that is not pinned yet."""
    requirements = [line for lines in layer_requirements().values() for line in lines]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--dry-run",
                        "--ignore-installed", "--target", scratch, "--report", report, *LAMBDA_TARGET,
                        *requirements], check=True)
        installed = json.loads(report.read_text())["install"]
    pins = sorted(f"{re.sub(r'[-_.]+', '-', item['metadata']['name']).lower()}=={item['metadata']['version']}"
                  for item in installed)
    return LOCK_HEADER + "".join(f"{pin}\n" for pin in pins)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--lock", action="store_true")
    args = parser.parse_args()
    if args.lock:
        CONSTRAINTS.write_text(lock())
        return 0
    unpinned = unpinned_requirements()
    if unpinned:
        print(f"not pinned in {CONSTRAINTS.relative_to(ROOT)} (run `make lock-layers`): {', '.join(unpinned)}",
              file=sys.stderr)
        return 1
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
