"""infra/artifacts.py and infra/lambda_bootstrap.py: the twin is derived from the template, every function
is covered, and the bootstrap reports what check-artifacts fails on (import errors, writes outside /tmp)."""

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from infra import artifacts
from infra.template_checks import load_template

ROOT = Path(__file__).resolve().parent.parent


def test_twin_template_is_this_machines_architecture_with_absolute_code_paths():
    twin = artifacts.twin_template((ROOT / "template.yaml").read_text(), ROOT)
    sam_arch, _ = artifacts.machine()
    assert f"Architectures: [{sam_arch}]" in twin
    assert f"BuildArchitecture: {sam_arch}" in twin
    assert f"CodeUri: {ROOT}/functions/health" in twin
    assert f"ContentUri: {ROOT}/layers/common" in twin
    if sam_arch != "arm64":
        assert not [line for line in twin.splitlines() if "Architecture" in line and "arm64" in line]


def test_an_architecture_the_twin_cannot_rewrite_is_refused():
    text = "Globals:\n  Function:\n    Architectures:\n      - arm64\n"
    with pytest.raises(artifacts.ArtifactCheckFailed, match="arm64"):
        artifacts.twin_template(text.replace("Architectures:\n      - arm64", "Architectures: [ 'arm64' ]"), ROOT)


def test_every_function_has_events_or_a_reason():
    functions = artifacts.template_functions(load_template(ROOT / "template.yaml"))
    assert {f.logical_id for f in functions} >= {"HealthFunction", "MigrateFunction", "PredictionCreateFunction"}
    for function in functions:
        events = artifacts.function_events(function)
        assert events or function.logical_id in artifacts.NOT_INVOKED, function.logical_id
        for _, event in events:  # an HTTP event belongs to one of the function's own routes
            assert "routeKey" not in event or event["routeKey"] in function.routes
    migrate = next(f for f in functions if f.folder == "migrate")
    assert "RequestType" in artifacts.function_events(migrate)[0][1]  # CloudFormation's Create comes first


def test_the_environment_resolver_evaluates_the_templates_intrinsics():
    template = load_template(ROOT / "template.yaml")
    health = next(f for f in artifacts.template_functions(template) if f.logical_id == "HealthFunction")
    resolver = artifacts.Resolver(template, {"DbSecretArn": "arn:secret", "RedisEndpoint": "127.0.0.1:7",
                                             "RedisTls": "false"}, {"DataBucket": "bucket"})
    env = {name: resolver.value(value) for name, value in health.environment.items()}
    assert env["REDIS_URL"] == "redis://127.0.0.1:7/0"
    assert env["DB_SECRET_ARN"] == "arn:secret"
    assert env["DATA_BUCKET"] == "bucket"
    assert env["POWERTOOLS_TRACE_DISABLED"] == "true"


def test_a_shipped_module_importing_a_training_library_is_found(tmp_path):
    module = tmp_path / "CommonLayer/python/candlecast/forecast/fit.py"
    module.parent.mkdir(parents=True)
    module.write_text("def fit():\n    import lightgbm\n    from arch import arch_model\n")
    (module.parent / "model.py").write_text("import numpy as np\n")
    found = artifacts.offline_imports(tmp_path)
    assert found == ["CommonLayer/python/candlecast/forecast/fit.py imports arch, lightgbm"]


def _bootstrap(tmp_path: Path, source: str, events: list[dict], layers: tuple[str, ...] = (),
               runtime: tuple[str, ...] = ()) -> dict:
    task = tmp_path / "task"
    task.mkdir(parents=True)
    (task / "app.py").write_text(source)
    spec = {"task_root": str(task), "layers": list(layers), "runtime": list(runtime), "handler": "app.lambda_handler",
            "events": events, "function_name": "probe", "memory_mb": 128, "timeout_s": 10}
    environment = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    report, _ = artifacts.run_bootstrap(artifacts.python312(), spec, environment)
    return report


def test_the_bootstrap_reports_writes_outside_tmp_and_allows_tmp(tmp_path):
    # /var/tmp, not the checkout: a clone may itself live under /tmp
    outside = Path("/var/tmp") / f"candlecast-written-by-the-function-{tmp_path.name}.txt"
    report = _bootstrap(tmp_path, f"""
def lambda_handler(event, context):
    open("/tmp/allowed-by-lambda", "w").close()
    open({str(outside)!r}, "w").close()
    return {{"statusCode": 200}}
""", [{}])
    assert report["results"][0]["result"] == {"statusCode": 200}
    outside.unlink()
    assert len(report["writes"]) == 1 and str(outside) in report["writes"][0]
    assert not (tmp_path / "task/__pycache__").exists()  # PYTHONDONTWRITEBYTECODE is honoured under -I


def test_the_bootstrap_reports_a_module_missing_from_the_artifact(tmp_path):
    report = _bootstrap(tmp_path, "import pydantic\ndef lambda_handler(event, context):\n    return 1\n", [{}])
    assert report["init_error"].startswith("ModuleNotFoundError")  # site-packages are not on the path
    assert report["results"] == []


STARTUP_APP = """
import gc

from candlecast import startup

startup.begin()
PAUSED_WHILE_LOADING = not gc.isenabled()
LOADED = [[index] for index in range(1000)]
{done}
def lambda_handler(event, context):
    return {{"paused": PAUSED_WHILE_LOADING, "frozen": gc.get_freeze_count()}}
"""


def test_a_function_loads_with_the_collector_paused_then_freezes_what_it_loaded(tmp_path):
    report = _bootstrap(tmp_path, STARTUP_APP.format(done="startup.done()"), [{}], (str(ROOT / "layers/common"),))
    assert report["gc_enabled"] is True
    result = report["results"][0]["result"]
    assert result["paused"] is True
    assert result["frozen"] >= 2000  # the loaded objects, which later collections skip


def test_the_bootstrap_reports_a_function_that_leaves_the_collector_off(tmp_path):
    report = _bootstrap(tmp_path, STARTUP_APP.format(done=""), [{}], (str(ROOT / "layers/common"),))
    assert report["gc_enabled"] is False  # check-artifacts fails on it


def test_the_bootstrap_path_is_task_layers_runtime_then_the_standard_library(tmp_path):
    report = _bootstrap(tmp_path, "import sys\ndef lambda_handler(event, context):\n    return sys.path\n", [{}])
    path = report["results"][0]["result"]
    assert path[0] == str(tmp_path / "task")
    assert not any("site-packages" in entry for entry in path)


def test_no_tracked_symlinks_so_a_checkout_without_symlinks_builds_the_same():
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line for line in listing.splitlines() if line.startswith("120000")] == []


def test_bench_prints_the_issue_targets_beside_the_functions_they_concern():
    folders = {f.folder for f in artifacts.template_functions(load_template(ROOT / "template.yaml"))}
    assert set(artifacts.COLD_TARGETS) <= folders
    assert {"health", "symbols", "predictions_get", "predictions_create", "migrate"} <= set(artifacts.COLD_TARGETS)


def test_the_database_forwarder_survives_an_upstream_that_is_gone(tmp_path):
    """TcpToUnixSocket's accept loop died on the first connection whose unix socket was missing (PostgreSQL
    stopped): every later connection, after PostgreSQL was back, was accepted by the kernel and never answered."""
    import socket
    import threading

    path = str(tmp_path / "upstream.sock")
    proxy = artifacts.TcpToUnixSocket(path)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as first:  # nothing at `path` yet
            assert first.recv(1) == b""  # closed, as by a stopped server
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen()

        def echo_once():
            connection, _ = server.accept()
            with connection:
                connection.sendall(connection.recv(16))

        threading.Thread(target=echo_once, daemon=True).start()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as second:
            second.sendall(b"ping")
            assert second.recv(16) == b"ping"
        server.close()
    finally:
        proxy.close()


def test_layer_bytecode_that_names_its_build_folder_is_found(tmp_path):
    import sys

    for layer in ("Mounted", "BuildPath"):  # as layers/platforms.mk compiles now, and as it did before
        site = tmp_path / layer / "python"
        (site / "pkg").mkdir(parents=True)
        (site / "pkg" / "mod.py").write_text("VALUE = 1\n")
        mounted = ["-s", str(site), "-p", "/opt/python"] if layer == "Mounted" else []
        subprocess.run([sys.executable, "-m", "compileall", "-q", *mounted, str(site)], check=True)
    found = artifacts.build_paths_in_bytecode(tmp_path, sys.executable)
    assert len(found) == 1 and found[0].startswith("BuildPath/python/pkg/__pycache__/mod.")
    assert found[0].endswith(f": {tmp_path}/BuildPath/python/pkg/mod.py")


def _sdk_stub(folder: Path) -> str:
    for name in ("boto3", "botocore"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"WHERE = {str(folder)!r}\n")
    return str(folder)


def test_the_sdk_must_come_from_the_functions_layers_not_the_runtime(tmp_path):
    layer, runtime = _sdk_stub(tmp_path / "CommonLayer/python"), _sdk_stub(tmp_path / "runtime")
    app = "import botocore\ndef lambda_handler(event, context):\n    return botocore.WHERE\n"
    report = _bootstrap(tmp_path / "with-layer", app, [{}], (layer,), (runtime,))
    assert report["results"][0]["result"] == layer
    assert report["sdk"]["botocore"] == {"file": f"{layer}/botocore/__init__.py", "loaded": True}
    assert artifacts.sdk_from_layers(report, [layer]) == ("CommonLayer (loaded)", [])
    # A function without the layer, that had not imported boto3 yet: where an import would find it is enough
    report = _bootstrap(tmp_path / "without", "def lambda_handler(event, context):\n    return 1\n", [{}], (),
                        (runtime,))
    assert report["sdk"]["boto3"] == {"file": f"{runtime}/boto3/__init__.py", "loaded": False}
    shown, problems = artifacts.sdk_from_layers(report, [layer])
    assert shown.startswith("NOT A LAYER") and len(problems) == 2
    assert "botocore found at" in problems[1] and "runtime's SDK" in problems[1]
    assert artifacts.sdk_from_layers({}, [layer])[1]  # a report without origins fails too


def _pinned(requirements: list[str], name: str):
    from packaging.requirements import Requirement

    (requirement,) = [Requirement(line) for line in requirements if Requirement(line).name == name]
    return requirement


FIRST_BOTOCORE_WITH_PUT_IF_MATCH = "1.35.69"  # 1.35.68's PutObject has IfNoneMatch (from 1.35.2), not IfMatch


def test_the_layer_ships_an_sdk_with_conditional_puts_and_the_runtime_stand_in_does_not():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = Version(FIRST_BOTOCORE_WITH_PUT_IF_MATCH)
    assert _pinned(project["dependencies"], "boto3").specifier.contains(floor)  # the layer's floor
    assert not _pinned(project["dependencies"], "boto3").specifier.contains("1.35.68")
    pins = dict(line.split("==") for line in (ROOT / "layers/constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert Version(pins["boto3"]) >= floor and Version(pins["botocore"]) >= floor
    runtime = project["optional-dependencies"]["lambda-runtime"]
    for name in ("boto3", "botocore"):  # exact, and older than the code needs
        (spec,) = _pinned(runtime, name).specifier
        assert spec.operator == "==" and Version(spec.version) < floor, (name, spec)


CONDITIONAL_PUTS = """
import botocore.session
from botocore.exceptions import ParamValidationError
from botocore.validate import validate_parameters

def lambda_handler(event, context):
    shape = botocore.session.get_session().get_service_model("s3").operation_model("PutObject").input_shape
    try:
        validate_parameters({"Bucket": "b", "Key": "k", "Body": b"", **event}, shape)  # what a client checks first
    except ParamValidationError:
        return "refused"
    return "accepted"
"""


@pytest.mark.skipif(not (artifacts.RUNTIME_DIR / "botocore").is_dir(), reason="make check-artifacts builds it")
def test_a_conditional_put_fails_on_the_runtime_stand_ins_sdk_and_passes_on_the_layers(tmp_path):
    import botocore  # the dev venv's: layers/constraints.txt's pin, the layer's

    events = [{"IfMatch": '"etag"'}, {"IfNoneMatch": "*"}]
    old = _bootstrap(tmp_path / "runtime", CONDITIONAL_PUTS, events, (), (str(artifacts.RUNTIME_DIR),))
    assert [result["result"] for result in old["results"]] == ["refused", "refused"]
    assert old["sdk"]["botocore"]["file"].startswith(str(artifacts.RUNTIME_DIR))
    layer = str(Path(botocore.__file__).parent.parent)
    new = _bootstrap(tmp_path / "layer", CONDITIONAL_PUTS, events, (layer,), (str(artifacts.RUNTIME_DIR),))
    assert [result["result"] for result in new["results"]] == ["accepted", "accepted"]


def _refresh(failed: list[str], seconds: float = 3.5, **counts) -> dict:
    report = {"symbols_upserted": 3, "symbols_inactivated": 0, "symbols_kept_active": 38, "files_written": 57,
              "candles_added": 6591, "symbols_done": 41, "remaining": [], "failed": failed, "unrecorded": [],
              "errors": [], "requests": 84, "seconds": seconds, "continuation": None, "chained": False,
              "scoring": "inline", **counts}
    return {"ok": True, "result": report}


def test_equal_statuses_with_different_failed_symbols_are_a_problem():
    dev, artifact = _refresh([]), _refresh(["X:C000USD", "X:C001USD"])
    assert artifacts.outcome(dev, None, 0) == artifacts.outcome(artifact, None, 0) == "ok"
    problems = artifacts.result_problems("RefreshFunction refresh_scheduled.json", dev, artifact)
    assert any("!= dev" in problem and "X:C000USD" in problem for problem in problems)
    assert any("the artifact run failed ['X:C000USD', 'X:C001USD']" in problem for problem in problems)


def test_a_refresh_failure_in_the_dev_run_is_a_problem_even_when_both_agree():
    unrecorded = _refresh([], unrecorded=["X:C002USD"])  # files written, metadata not: failed too
    assert artifacts.result_problems("refresh", unrecorded, unrecorded) == ["refresh: the dev run failed ['X:C002USD']",
                                                                           "refresh: the artifact run failed "
                                                                           "['X:C002USD']"]


def test_what_legitimately_differs_between_the_two_runs_is_not_compared():
    # the second run finds the first one's candles; timings, request counts and messages vary
    dev = _refresh([], seconds=3.5, errors=["38 of 38 active symbols are missing"])
    artifact = _refresh([], seconds=2.8, files_written=0, candles_added=0, requests=90, scoring="off",
                        errors=["38 of 41 active symbols are missing"])
    assert artifacts.result_problems("refresh", dev, artifact) == []
    score = {"predictions": 2, "scored": 60, "skipped": 0, "seconds": 0.02}
    assert artifacts.result_problems("score", {"ok": True, "result": {**score, "failed": []}},
                                     {"ok": True, "result": {**score, "failed": [], "seconds": 0.05}}) == []
    assert artifacts.result_problems("score", {"ok": True, "result": {**score, "failed": []}},
                                     {"ok": True, "result": {**score, "failed": ["3f0c…: no model"]}})


def test_an_http_answer_is_compared_by_its_error_code_not_its_message():
    def answer(status: int, code: str | None, message: str = "") -> dict:
        body = json.dumps({"error": {"code": code, "message": message}} if code else {"id": message})
        return {"ok": True, "result": {"statusCode": status, "body": body}}

    assert artifacts.result_problems("get", answer(404, "prediction_not_found", "no prediction 1"),
                                     answer(404, "prediction_not_found", "no prediction 2")) == []
    assert artifacts.result_problems("create", answer(201, None, "id-1"), answer(201, None, "id-2")) == []
    assert artifacts.result_problems("get", answer(503, "model_unavailable"), answer(503, "storage_unavailable")) == [
        "get: artifact achieved {'code': 'storage_unavailable'} != dev {'code': 'model_unavailable'}"]


def test_the_artifact_runs_first_where_the_first_run_does_the_writes_and_never_reaches_aws():
    from types import SimpleNamespace

    template = load_template(ROOT / "template.yaml")
    functions = {f.folder: f for f in artifacts.template_functions(template)}
    # the refresh's second run finds the first one's candles stored: an artifact that cannot write must go first
    assert artifacts.invoke_order(functions["refresh"]) == ("artifact", "dev")
    assert artifacts.invoke_order(functions["migrate"]) == ("artifact", "dev")
    assert artifacts.invoke_order(functions["health"]) == ("dev", "artifact")
    stack = SimpleNamespace(redis_url="redis://127.0.0.1:7/0", s3_endpoint_url="http://127.0.0.1:9", bucket="b")
    deployment = artifacts.Deployment(stack=stack, secret_arns={}, response=None)
    env = deployment.artifact_environment(template, functions["refresh"], ROOT / "functions/refresh")
    assert env["SCORE_FUNCTION_NAME"]  # it starts Score after adding candles: at moto, not at AWS
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == stack.s3_endpoint_url
