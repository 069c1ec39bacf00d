"""Offline checks of template.yaml, run by `make check-template` (and so by `make test`).

    python infra/template_checks.py                  # every check below, in order
    python infra/template_checks.py throttles        # route throttles within reserved concurrency
    python infra/template_checks.py lint             # cfn-lint, sam validate --lint
    python infra/template_checks.py build            # sam build (arm64, no Docker), ELF check, size report
    python infra/template_checks.py checkov          # checkov on the template translated by aws-sam-translator
    python infra/template_checks.py science-smoke    # trimmed science layer, built for this machine, imports
    python infra/template_checks.py migrations-hash [--write]

Tools live in their own virtual environments (they pin boto3 and friends): SAM CLI in .local/sam-venv,
checkov in .local/checkov-venv; the Makefile creates both from the `sam` and `checkov` extras of
pyproject.toml. sam build needs python3.12 on PATH (the Makefile adds pyenv's).
Standard library only at import time: `translate` runs under the SAM venv's interpreter.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
MIGRATIONS = ROOT / "migrations"
SAMCONFIG = ROOT / "infra/samconfig.toml"
BUILD_DIR = ROOT / ".aws-sam/build"
SKIPS = ROOT / "infra/checkov/skips.json"
SAM_VENV = ROOT / ".local/sam-venv"
CHECKOV_VENV = ROOT / ".local/checkov-venv"

LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024  # function code plus all its layers
ELF_MACHINE_AARCH64 = 183
# Libraries the Lambda python3.12 runtime (Amazon Linux 2023) provides: the manylinux system set, plus
# those its own Python links (zlib, expat, libcrypt).
SYSTEM_LIBRARIES = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libutil.so.1",
    "libresolv.so.2", "libnsl.so.1", "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-aarch64.so.1",
    "libz.so.1", "libcrypt.so.1", "libexpat.so.1",
}  # fmt: skip
MIGRATIONS_HASH_LINE = re.compile(r"^(\s*MigrationsHash:\s*)([0-9a-f]{64})\s*$", re.MULTILINE)


class CheckFailed(RuntimeError):
    pass


def tool_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env["SAM_CLI_TELEMETRY"] = "0"
    return env


def run(command: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    shown = " ".join(str(part) for part in command)
    print("$", shown if len(shown) < 300 else shown[:300] + " …", flush=True)
    return subprocess.run([str(part) for part in command], cwd=ROOT, env=tool_environment(), **kwargs)


def require(path: Path, hint: str) -> Path:
    if not path.exists():
        raise CheckFailed(f"{path.relative_to(ROOT)} is missing: {hint}")
    return path


# ---------------------------------------------------------------- migrations hash
def migrations_hash(directory: Path = MIGRATIONS) -> str:
    """candlecast.migrate.migrations_hash: the Migrate function compares the same hash of its bundled folder
    with the request's MigrationsHash (imported here, not at the top: `translate` runs under the SAM venv)."""
    layer = str(ROOT / "layers/common")
    if layer not in sys.path:
        sys.path.insert(0, layer)
    from candlecast.migrate import migrations_hash as folder_hash

    return folder_hash(directory)


def template_migrations_hash(text: str | None = None) -> str:
    match = MIGRATIONS_HASH_LINE.search(text if text is not None else TEMPLATE.read_text())
    if not match:
        raise CheckFailed("template.yaml has no `MigrationsHash: <sha256>` line on DbMigration")
    return match.group(2)


def check_migrations_hash(write: bool = False) -> None:
    wanted = migrations_hash()
    text = TEMPLATE.read_text()
    if template_migrations_hash(text) == wanted:
        print(f"migrations hash up to date: {wanted}")
        return
    if write:
        TEMPLATE.write_text(MIGRATIONS_HASH_LINE.sub(lambda m: m.group(1) + wanted, text, count=1))
        print(f"template.yaml MigrationsHash set to {wanted}")
        return
    raise CheckFailed(
        "DbMigration.MigrationsHash does not match migrations/: run "
        "`make migrations-hash` (python infra/template_checks.py migrations-hash --write)"
    )


# ---------------------------------------------------------------- throttles within reservations
def throttles() -> None:
    """No route throttle can put more requests in flight than its function's reserved concurrency
    (infra/concurrency.py), for the template's defaults and every samconfig.toml environment."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from infra import concurrency

    problems = concurrency.check(TEMPLATE, SAMCONFIG)
    if problems:
        raise CheckFailed("a throttle can overrun a reservation (API Gateway answers Lambda's throttle with 500):\n  "
                          + "\n  ".join(problems))


# ---------------------------------------------------------------- lint
def lint() -> None:
    if run([Path(sys.executable).parent / "cfn-lint", "--", TEMPLATE]).returncode != 0:
        raise CheckFailed("cfn-lint reported problems")
    sam = require(SAM_VENV / "bin/sam", "run `make tools`")
    if run([sam, "validate", "--lint", "--template", TEMPLATE]).returncode != 0:
        raise CheckFailed("sam validate --lint failed")


# ---------------------------------------------------------------- build, ELF check, sizes
def build() -> None:
    sam = require(SAM_VENV / "bin/sam", "run `make tools`")
    if shutil.which("python3.12") is None:
        raise CheckFailed("python3.12 is not on PATH (the Makefile adds pyenv's 3.12)")
    # --config-env default reads [default.build.parameters]: template, build dir, parallel.
    if run([sam, "build", "--config-file", SAMCONFIG]).returncode != 0:
        raise CheckFailed("sam build failed")


def directory_size(path: Path) -> int:
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_file() or entry.is_symlink())


def load_template(path: Path = TEMPLATE) -> dict:
    """The template as plain data, short-form intrinsics (!Ref ...) expanded, via cfn-lint's loader."""
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(path))


def function_layers(template: dict) -> dict[str, list[str]]:
    """Logical id of each function -> logical ids of its layers (Globals first, as SAM merges them)."""
    global_layers = template.get("Globals", {}).get("Function", {}).get("Layers", [])
    layers = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            refs = global_layers + resource["Properties"].get("Layers", [])
            # Layers built from this template; an external ARN (the secrets extension, by !If) is not built here.
            layers[name] = [ref["Ref"] for ref in refs if isinstance(ref, dict) and "Ref" in ref]
    return layers


def size_report(build_dir: Path = BUILD_DIR) -> dict[str, dict]:
    layers = function_layers(load_template())
    sizes = {}
    for function, layer_ids in layers.items():
        parts = {function: directory_size(require(build_dir / function, "run sam build first"))}
        parts.update({layer: directory_size(build_dir / layer) for layer in layer_ids})
        sizes[function] = {"parts": parts, "total": sum(parts.values())}
    mb = 1024 * 1024
    print(f"{'function (unzipped, with layers)':<34}{'total MB':>10}   parts")
    for function, size in sizes.items():
        parts = ", ".join(f"{name} {value / mb:.1f}" for name, value in size["parts"].items())
        print(f"{function:<34}{size['total'] / mb:>10.1f}   {parts}")
    too_big = [name for name, size in sizes.items() if size["total"] > LAMBDA_UNZIPPED_LIMIT]
    if too_big:
        raise CheckFailed(f"over the 250 MB unzipped limit: {', '.join(too_big)}")
    return sizes


def elf_machine(path: Path) -> int | None:
    with path.open("rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "big" if header[5] == 2 else "little")


def needed_libraries(path: Path) -> list[str]:
    output = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", output)


def check_native_code(build_dir: Path = BUILD_DIR) -> int:
    """Every ELF file in the build is aarch64, and (with readelf) each NEEDED library is shipped or system."""
    elves = [p for p in build_dir.rglob("*") if p.is_file() and not p.is_symlink() and elf_machine(p) is not None]
    wrong_arch = [p for p in elves if elf_machine(p) != ELF_MACHINE_AARCH64]
    if wrong_arch:
        listed = ", ".join(str(p.relative_to(build_dir)) for p in wrong_arch[:5])
        raise CheckFailed(f"{len(wrong_arch)} native files are not arm64 (aarch64): {listed}")
    if shutil.which("readelf") is None:
        print("readelf not found (binutils): skipped the NEEDED-library check")
        return len(elves)
    for artifact in {p.relative_to(build_dir).parts[0] for p in elves}:
        shipped = {p.name for p in (build_dir / artifact).rglob("*") if ".so" in p.name}
        for path in (p for p in elves if p.relative_to(build_dir).parts[0] == artifact):
            missing = [lib for lib in needed_libraries(path) if lib not in shipped | SYSTEM_LIBRARIES]
            if missing:
                raise CheckFailed(f"{path.relative_to(build_dir)} needs {missing}, not in {artifact}")
    print(f"{len(elves)} native files: all aarch64, every NEEDED library present")
    return len(elves)


SCIENCE_SMOKE = """
import io, sys
sys.path.insert(0, sys.argv[1])
import joblib, numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.dataset, pyarrow.parquet as pq
buffer = io.BytesIO()
pq.write_table(pa.table({"close": np.arange(4096, dtype="float64")}), buffer, row_group_size=1024)
tail = pq.ParquetFile(io.BytesIO(buffer.getvalue())).read_row_groups([3])
assert tail.num_rows == 1024 and pc.max(tail["close"]).as_py() == 4095.0
print("science layer imports:", np.__version__, pa.__version__, joblib.__version__)
"""


def science_layer_smoke() -> None:
    """The same Makefile and trim for this machine's architecture, then the imports candlecast uses.

    arm64 code cannot run here; this proves the trim leaves numpy, pyarrow (parquet, dataset, compute,
    S3 filesystem) and joblib importable, while check_native_code proves the arm64 build is complete.
    """
    import platform

    machine = platform.machine()
    platforms = f"--platform manylinux_2_28_{machine} --platform manylinux_2_17_{machine}"
    python = shutil.which("python3.12") or sys.executable
    with tempfile.TemporaryDirectory() as scratch:
        built = run(
            ["make", "--no-print-directory", "-C", ROOT / "layers/science", "build-ScienceLayer",
             f"ARTIFACTS_DIR={scratch}", f"PLATFORMS={platforms}", f"PYTHON={python}"],
        )  # fmt: skip
        if built.returncode != 0:
            raise CheckFailed("building the science layer for this machine failed")
        if run([python, "-I", "-c", SCIENCE_SMOKE, Path(scratch) / "python"]).returncode != 0:
            raise CheckFailed("the trimmed science layer does not import")


# ---------------------------------------------------------------- checkov on the translated template
class _NoManagedPolicies:
    """aws-sam-translator asks for AWS managed policy names only when a template uses them by name."""

    def load(self) -> dict[str, str]:
        return {}


def translate(source: Path, target: Path) -> None:
    """SAM -> CloudFormation with aws-sam-translator, offline (runs under the SAM venv's Python)."""
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    sam_template = yaml_parse(source.read_text())
    for name, resource in sam_template["Resources"].items():  # as `sam package` would upload them
        properties = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(properties.get(key), str) and not properties[key].startswith("s3://"):
                properties[key] = f"s3://packaged-artifacts/{name}.zip"
    parameters = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::Partition": "aws"}
    translated = transform(sam_template, parameters, _NoManagedPolicies())
    target.write_text(json.dumps(translated, indent=1, sort_keys=True))


def load_skips() -> dict[str, dict]:
    """{check id: {"resources": [logical ids] or ["*"], "reason": why}} from infra/checkov/skips.json."""
    skips = json.loads(SKIPS.read_text())
    bad = [
        check
        for check, skip in skips.items()
        if len(skip.get("reason", "").strip()) < 20 or not skip.get("resources")
    ]
    if bad:
        raise CheckFailed(f"checkov skips need resources and a real reason in {SKIPS.name}: {bad}")
    return skips


def is_skipped(check: dict, skips: dict[str, dict]) -> bool:
    skip = skips.get(check["check_id"])
    logical_id = check["resource"].rsplit(".", 1)[-1]
    return skip is not None and ("*" in skip["resources"] or logical_id in skip["resources"])


def checkov() -> None:
    python = require(SAM_VENV / "bin/python", "run `make tools`")
    checkov_bin = require(CHECKOV_VENV / "bin/checkov", "run `make tools`")
    skips = load_skips()
    with tempfile.TemporaryDirectory() as scratch:
        translated = Path(scratch) / "template.json"
        if run([python, __file__, "translate", TEMPLATE, translated]).returncode != 0:
            raise CheckFailed("aws-sam-translator could not translate template.yaml")
        result = run(
            [checkov_bin, "--file", translated, "--framework", "cloudformation", "--skip-download",
             "--output", "json", "--quiet", "--compact"],
            capture_output=True, text=True,
        )  # fmt: skip
    if not result.stdout.strip():
        raise CheckFailed(f"checkov printed nothing (exit {result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [check for item in reports for check in item.get("results", {}).get("failed_checks", [])]
    passed = sum(item.get("summary", {}).get("passed", 0) for item in reports)
    accepted = [check for check in failed if is_skipped(check, skips)]
    unexpected = [check for check in failed if not is_skipped(check, skips)]
    for check in unexpected:
        print(f"FAILED {check['check_id']} {check['resource']}: {check['check_name']}")
    print(
        f"checkov: {passed} passed, {len(unexpected)} failed, "
        f"{len(accepted)} accepted by the reviewed skip list {SKIPS.relative_to(ROOT)}"
    )
    if unexpected:
        raise CheckFailed(f"checkov: {len(unexpected)} failed checks (fix them, or skip with a reason)")


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("all")
    sub.add_parser("throttles")
    sub.add_parser("lint")
    sub.add_parser("build")
    sub.add_parser("sizes")
    sub.add_parser("checkov")
    sub.add_parser("science-smoke")
    hash_parser = sub.add_parser("migrations-hash")
    hash_parser.add_argument("--write", action="store_true", help="update template.yaml")
    translate_parser = sub.add_parser("translate")
    translate_parser.add_argument("source", type=Path)
    translate_parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)

    steps = {
        "throttles": [throttles],
        "lint": [lint],
        "build": [build, check_native_code, size_report],
        "sizes": [check_native_code, size_report],
        "checkov": [checkov],
        "science-smoke": [science_layer_smoke],
        "all": [check_migrations_hash, throttles, lint, checkov, build, check_native_code, size_report,
                science_layer_smoke],
    }
    try:
        if args.command == "translate":
            translate(args.source, args.target)
        elif args.command == "migrations-hash":
            check_migrations_hash(write=args.write)
        else:
            for step in steps[args.command or "all"]:
                print(f"== {step.__name__}", flush=True)
                step()
    except CheckFailed as error:
        print(f"check-template: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
