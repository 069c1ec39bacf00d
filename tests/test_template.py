"""Offline checks of template.yaml against the code it deploys (no AWS, no sam build needed).

`make check-template` adds what needs the tools: cfn-lint, sam validate --lint, checkov on the translated
template, sam build for arm64 and the 250 MB size report.
"""

import json
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest

from infra import concurrency, template_checks
from infra.lambda_loader import load_function_module
from infra.sam_template import load_template, parameter_values

pytestmark = pytest.mark.template

ROOT = Path(__file__).resolve().parent.parent

# The agreed route list (contract): function logical id -> routes it serves.
ROUTES = {
    "HealthFunction": {("GET", "/health")},
    "SymbolsFunction": {
        ("GET", "/symbols"),
        ("GET", "/symbols/top"),
        ("GET", "/symbols/{ticker}"),
        ("GET", "/symbols/{ticker}/predictions"),
        ("GET", "/models"),
        ("GET", "/models/{timeframe}"),
    },
    "PredictionCreateFunction": {("POST", "/predictions")},
    "PredictionGetFunction": {("GET", "/predictions/{id}")},
    "MigrateFunction": set(),
    "RefreshFunction": set(),
    "ScoreFunction": set(),
    "RetentionFunction": set(),
}
API_FUNCTIONS = [name for name, routes in ROUTES.items() if routes]
SCIENCE_FUNCTIONS = {"PredictionCreateFunction", "RefreshFunction", "ScoreFunction"}


@pytest.fixture(scope="module")
def template() -> dict:
    return template_checks.load_template()


@pytest.fixture(scope="module")
def resources(template) -> dict:
    return template["Resources"]


def functions(resources: dict) -> dict[str, dict]:
    return {
        name: resource["Properties"]
        for name, resource in resources.items()
        if resource["Type"] == "AWS::Serverless::Function"
    }


def template_routes(properties: dict) -> set[tuple[str, str]]:
    return {
        (event["Properties"]["Method"].upper(), event["Properties"]["Path"])
        for event in (properties.get("Events") or {}).values()
        if event["Type"] == "HttpApi"
    }


def load_function(properties: dict):
    module_name, attribute = properties.get("Handler", "app.lambda_handler").rsplit(".", 1)
    return load_function_module(properties["CodeUri"], f"{module_name}.{attribute}"), attribute


def resolver_routes(module) -> set[tuple[str, str]]:
    """The routes a Powertools resolver registered, with <param> written as API Gateway's {param}."""
    app = module.app
    return {
        (route.method.upper(), re.sub(r"<(\w+)>", r"{\1}", route.path))
        for route in [*app._static_routes, *app._dynamic_routes]
    }


def test_template_has_the_agreed_functions(resources):
    assert set(functions(resources)) == set(ROUTES)


def test_template_routes_are_the_agreed_ones(resources):
    for name, properties in functions(resources).items():
        assert template_routes(properties) == ROUTES[name], name


@pytest.mark.parametrize("function", sorted(ROUTES))
def test_handler_resolves_to_an_importable_lambda_handler(function, resources, importable):
    properties = functions(resources)[function]
    assert (ROOT / properties["CodeUri"]).is_dir(), f"{function}: CodeUri {properties['CodeUri']} missing"
    module, attribute = load_function(properties)
    assert callable(getattr(module, attribute, None)), f"{function}: {properties['Handler']} is not callable"


@pytest.mark.parametrize("function", API_FUNCTIONS)
def test_http_routes_are_served_by_the_functions_resolver_and_the_reverse(function, resources, importable):
    properties = functions(resources)[function]
    module, _ = load_function(properties)
    assert resolver_routes(module) == template_routes(properties)


def test_every_http_api_event_uses_the_one_api(resources):
    apis = [name for name, resource in resources.items() if resource["Type"] == "AWS::Serverless::HttpApi"]
    assert apis == ["HttpApi"]
    for name, properties in functions(resources).items():
        for event in (properties.get("Events") or {}).values():
            if event["Type"] == "HttpApi":
                assert event["Properties"]["ApiId"] == {"Ref": "HttpApi"}, name


def test_migrate_has_no_api_event_and_runs_as_the_custom_resource(template, resources):
    migrate = functions(resources)["MigrateFunction"]
    assert not migrate.get("Events")
    migration = resources["DbMigration"]
    assert migration["Type"] == "Custom::DbMigration"
    assert migration["Properties"]["ServiceToken"] == {"Fn::GetAtt": ["MigrateFunction", "Arn"]}
    # CloudFormation gives up before the function's own timeout would leave it waiting an hour.
    assert migrate["Timeout"] < migration["Properties"]["ServiceTimeout"] <= 3600
    # A deploy that points the functions at another database re-runs the custom resource there.
    database = template["Globals"]["Function"]["Environment"]["Variables"]["DB_SECRET_ARN"]
    assert migration["Properties"]["DbSecretArn"] == database == {"Ref": "DbSecretArn"}


def test_new_code_goes_live_only_after_the_migrations(resources):
    for name in set(ROUTES) - {"MigrateFunction"}:
        assert resources[name]["DependsOn"] == "DbMigration", name


def test_migrations_hash_in_the_template_matches_migrations_dir():
    assert template_checks.template_migrations_hash() == template_checks.migrations_hash(), (
        "run `make migrations-hash` after changing migrations/"
    )


def test_migrations_hash_changes_with_any_migration_file(tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    first = template_checks.migrations_hash(tmp_path)
    (tmp_path / "0001_a.rollback.sql").write_text("DROP TABLE a;")
    second = template_checks.migrations_hash(tmp_path)
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id bigint);")
    assert len({first, second, template_checks.migrations_hash(tmp_path)}) == 3


def test_migrate_function_ships_the_migrations(resources):
    """Its Makefile copies migrations/ into the function (no symlink, so a checkout without symlinks
    builds the same; check-artifacts runs the result); MIGRATIONS_DIR finds it."""
    assert not (ROOT / "functions/migrate/migrations").exists()
    assert resources["MigrateFunction"]["Metadata"]["BuildMethod"] == "makefile"
    assert "build-MigrateFunction:" in (ROOT / "functions/migrate/Makefile").read_text()
    variables = functions(resources)["MigrateFunction"]["Environment"]["Variables"]
    assert variables["MIGRATIONS_DIR"] == "/var/task/migrations"


def test_no_policy_allows_wildcard_actions_or_resources(resources):
    statements = [
        (name, statement)
        for name, properties in functions(resources).items()
        for policy in properties.get("Policies", [])
        for statement in policy["Statement"]
    ]
    assert statements
    for name, statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in action for action in actions), (name, actions)
        resources_ = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert "*" not in resources_, (name, statement)
    # The only `*` action anywhere is the bucket policy's TLS-only Deny.
    for statement in resources["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Deny"


def granted(properties: dict, action: str) -> list:
    found = []
    for policy in properties.get("Policies", []):
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if action in actions and statement["Effect"] == "Allow":
                resource = statement["Resource"]
                found.extend(resource if isinstance(resource, list) else [resource])
    return found


def test_each_function_reads_only_its_own_secrets(resources):
    db, signing, polygon = ({"Ref": name} for name in ("DbSecretArn", "ModelSigningKeySecretArn",
                                                       "PolygonApiKeySecretArn"))
    expected = {
        "HealthFunction": [db],
        "SymbolsFunction": [db],
        "PredictionCreateFunction": [db, signing, polygon],  # polygon: the any-symbol path
        "PredictionGetFunction": [db],
        "MigrateFunction": [db],
        "RefreshFunction": [db, polygon],
        "ScoreFunction": [db, signing],  # signing: the model's own baseline, from its verified file
        "RetentionFunction": [db],
    }
    for name, properties in functions(resources).items():
        assert granted(properties, "secretsmanager:GetSecretValue") == expected[name], name


def test_bucket_access_is_limited_to_the_prefixes_each_function_needs(resources):
    def prefixes(properties: dict, action: str) -> set[str]:
        return {resource["Fn::Sub"] for resource in granted(properties, action)}

    fns = functions(resources)
    assert prefixes(fns["PredictionCreateFunction"], "s3:GetObject") == {
        "${DataBucket.Arn}/data/*", "${DataBucket.Arn}/models/*"
    }
    assert prefixes(fns["RefreshFunction"], "s3:PutObject") == {"${DataBucket.Arn}/data/*"}
    assert prefixes(fns["ScoreFunction"], "s3:GetObject") == prefixes(fns["PredictionCreateFunction"], "s3:GetObject")
    assert not granted(fns["ScoreFunction"], "s3:PutObject")
    for name in ("SymbolsFunction", "PredictionGetFunction", "MigrateFunction", "HealthFunction"):
        assert not granted(fns[name], "s3:GetObject") and not granted(fns[name], "s3:PutObject"), name
    # Readers may list key names, so a missing candle file or model is a 404 (None), not AccessDenied.
    for name in ("PredictionCreateFunction", "RefreshFunction", "ScoreFunction"):
        assert granted(fns[name], "s3:ListBucket") == [{"Fn::GetAtt": ["DataBucket", "Arn"]}], name
    for name in ("SymbolsFunction", "PredictionGetFunction", "MigrateFunction"):
        assert not granted(fns[name], "s3:ListBucket"), name
    # Health lists the model files' names (its bucket check is an unsigned HEAD), and no other prefix.
    (listing,) = [statement for policy in fns["HealthFunction"]["Policies"] for statement in policy["Statement"]
                  if statement["Action"] == "s3:ListBucket"]
    assert listing["Resource"] == {"Fn::GetAtt": ["DataBucket", "Arn"]}
    assert listing["Condition"] == {"StringLike": {"s3:prefix": "models/*"}}


@pytest.mark.parametrize("parameter", ["DbSecretArn", "ModelSigningKeySecretArn", "PolygonApiKeySecretArn"])
def test_a_secret_is_given_by_its_full_arn_the_only_form_its_policy_matches(template, parameter):
    """Each secret parameter is a policy's Resource as given. IAM matches the secret's full ARN (its name and the
    six characters Secrets Manager appends), while GetSecretValue also takes a partial ARN: a stack given one
    deployed, and every read of the secret was AccessDenied (503s), in AWS only. CloudFormation now refuses it."""
    spec = template["Parameters"][parameter]
    pattern = re.compile(spec["AllowedPattern"])
    full = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:candlecast/prod/db-AbC12f"
    assert pattern.fullmatch(full)
    assert pattern.fullmatch("arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:db-x-Zz0099")
    for partial in ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:candlecast/prod/db",
                    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbC12"):
        assert not pattern.fullmatch(partial), partial
    assert "full ARN" in spec["ConstraintDescription"]


def test_refresh_may_invoke_itself_and_score_and_score_only_itself(template, resources):
    """A chained run invokes `context.invoked_function_arn`: its schedule's target, which SAM points at the
    published alias. IAM matches a qualified ARN only by a qualified resource, so both forms are granted."""
    fns = functions(resources)
    refresh, score = fns["RefreshFunction"], fns["ScoreFunction"]
    alias = template["Globals"]["Function"]["AutoPublishAlias"]
    own_arn = {name: fns[name]["FunctionName"]["Fn::Sub"] for name in ("RefreshFunction", "ScoreFunction")}

    def invocable(properties: dict) -> list[str]:
        return [target["Fn::Sub"].rsplit(":function:", 1)[1] for target in granted(properties, "lambda:InvokeFunction")]

    assert invocable(refresh) == [own_arn["RefreshFunction"], f"{own_arn['RefreshFunction']}:{alias}",
                                  own_arn["ScoreFunction"]]
    assert refresh["Environment"]["Variables"]["SCORE_FUNCTION_NAME"] == score["FunctionName"]
    assert invocable(score) == [own_arn["ScoreFunction"], f"{own_arn['ScoreFunction']}:{alias}"]
    for name in ("RefreshFunction", "ScoreFunction"):
        assert [event["Type"] for event in fns[name]["Events"].values()] == ["Schedule"], name
    for name, properties in fns.items():
        if name not in ("RefreshFunction", "ScoreFunction"):
            assert not granted(properties, "lambda:InvokeFunction"), name


def test_self_chaining_functions_are_never_retried_by_lambda(template, resources):
    """A chunk that fails after handing on the rest of its run, retried by Lambda, would hand it on again: two
    chains. SAM's EventInvokeConfig configures the published alias (AutoPublishAlias) the schedules invoke; a
    plain AWS::Lambda::EventInvokeConfig configures $LATEST, which Refresh starts Score by (its name)."""
    assert template["Globals"]["Function"]["AutoPublishAlias"] == "live"
    fns = functions(resources)
    for name in ("RefreshFunction", "ScoreFunction"):
        assert fns[name]["EventInvokeConfig"]["MaximumRetryAttempts"] == 0, name
        (latest,) = latest_invoke_configs(resources, name)
        assert (latest["Qualifier"], latest["MaximumRetryAttempts"]) == ("$LATEST", 0), name


def latest_invoke_configs(resources: dict, function: str) -> list[dict]:
    return [resource["Properties"] for resource in resources.values()
            if resource["Type"] == "AWS::Lambda::EventInvokeConfig"
            and resource["Properties"]["FunctionName"] == {"Ref": function}]


def test_failed_asynchronous_runs_go_to_an_encrypted_queue_that_an_alarm_watches(template, resources):
    """Refresh, Score and Retention had no retry (or two, for Retention) and no destination: a failed run reached
    nobody. Each EventInvokeConfig (the alias's, and $LATEST's where one is configured) now names the queue."""
    queue = {"Fn::GetAtt": ["FailedRunsQueue", "Arn"]}
    fns = functions(resources)
    for name in ("RefreshFunction", "ScoreFunction", "RetentionFunction"):
        assert fns[name]["EventInvokeConfig"]["DestinationConfig"] == {
            "OnFailure": {"Type": "SQS", "Destination": queue}}, name
        for latest in latest_invoke_configs(resources, name):
            assert latest["DestinationConfig"] == {"OnFailure": {"Destination": queue}}, name
    assert fns["RetentionFunction"]["EventInvokeConfig"]["MaximumRetryAttempts"] == 2  # idempotent: retried
    # Each is configured on $LATEST too: an invocation by name (Refresh starting Score, an operator re-invoking a
    # failed run as the README says) runs $LATEST, which the alias's configuration does not cover. Retention had
    # none, so a re-invoke that failed again reached no queue.
    for name in ("RefreshFunction", "ScoreFunction", "RetentionFunction"):
        (latest,) = latest_invoke_configs(resources, name)
        assert latest["Qualifier"] == "$LATEST", name
        assert latest["MaximumRetryAttempts"] == fns[name]["EventInvokeConfig"]["MaximumRetryAttempts"], name
    for name, properties in fns.items():  # the others are invoked synchronously (API, custom resource)
        if name not in ("RefreshFunction", "ScoreFunction", "RetentionFunction"):
            assert "EventInvokeConfig" not in properties and not latest_invoke_configs(resources, name), name

    queue_properties = resources["FailedRunsQueue"]["Properties"]
    assert queue_properties["KmsMasterKeyId"] == "alias/aws/sqs"
    assert queue_properties["MessageRetentionPeriod"] == 14 * 24 * 3600
    alarm = resources["FailedRunsAlarm"]["Properties"]
    # Visible + NotVisible: the runbook's receive-message hides a message for its visibility timeout, and an alarm on
    # Visible alone cleared then, while the failed run was still unhandled (it is until the message is deleted).
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    (total,) = [query for query in queries.values() if query.get("ReturnData")]
    stats = {query["MetricStat"]["Metric"]["MetricName"]: (query["Id"], query["MetricStat"])
             for query in queries.values() if "MetricStat" in query}
    assert set(stats) == {"ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible"}
    assert sorted(total["Expression"].replace(" ", "").split("+")) == sorted(query_id for query_id, _ in stats.values())
    for _query_id, stat in stats.values():
        assert (stat["Metric"]["Namespace"], stat["Stat"]) == ("AWS/SQS", "Maximum")
        assert stat["Metric"]["Dimensions"] == [
            {"Name": "QueueName", "Value": {"Fn::GetAtt": ["FailedRunsQueue", "QueueName"]}}]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
    notify = {"Fn::If": ["AlarmTopicOn", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    assert alarm["AlarmActions"] == alarm["OKActions"] == notify
    assert template["Parameters"]["AlarmTopicArn"]["Default"] == ""
    assert template["Outputs"]["FailedRunsQueueUrl"]["Value"] == {"Ref": "FailedRunsQueue"}


def test_score_runs_hourly(template, resources):
    (event,) = functions(resources)["ScoreFunction"]["Events"].values()
    assert event["Type"] == "Schedule" and event["Properties"]["Schedule"] == {"Ref": "ScoreSchedule"}
    assert template["Parameters"]["ScoreSchedule"]["Default"] == "rate(1 hour)"


def test_api_functions_time_out_within_api_gateway_limit(template, resources):
    default = template["Globals"]["Function"]["Timeout"]
    fns = functions(resources)
    for name in API_FUNCTIONS:
        assert fns[name].get("Timeout", default) <= 29, name
    assert fns["RefreshFunction"]["Timeout"] == 900
    assert fns["ScoreFunction"]["Timeout"] == 900  # a backlog's chunks: 810 s of work each, not 210 s


def test_globals_runtime_architecture_and_powertools(template):
    function = template["Globals"]["Function"]
    assert function["Runtime"] == "python3.12"
    assert function["Architectures"] == ["arm64"]
    variables = function["Environment"]["Variables"]
    for name in ("POWERTOOLS_SERVICE_NAME", "POWERTOOLS_LOG_LEVEL", "POWERTOOLS_METRICS_NAMESPACE",
                 "DATA_BUCKET", "REDIS_URL", "DB_SECRET_ARN", "MODEL_SIGNING_KEY_SECRET_ARN", "STAGE"):
        assert name in variables, name
    assert function["Tracing"] == {"Fn::If": ["TracingOn", "Active", "PassThrough"]}


def test_every_function_logs_to_its_own_log_group_with_retention(resources):
    groups = []
    for name, properties in functions(resources).items():
        group = properties["LoggingConfig"]["LogGroup"]["Ref"]
        assert resources[group]["Type"] == "AWS::Logs::LogGroup", name
        assert resources[group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name
        groups.append(group)
    assert len(set(groups)) == len(groups)


def test_http_api_cors_throttling_and_access_logs(resources):
    api = resources["HttpApi"]["Properties"]
    assert api["CorsConfiguration"]["AllowOrigins"] == {"Ref": "CorsAllowedOrigins"}
    assert api["DefaultRouteSettings"] == {"ThrottlingRateLimit": 1, "ThrottlingBurstLimit": 1}  # a new route's
    log_group = api["AccessLogSettings"]["DestinationArn"]["Fn::GetAtt"][0]
    assert resources[log_group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert json.loads(api["AccessLogSettings"]["Format"])["status"] == "$context.status"


def test_cors_exposes_every_response_header_a_client_reads():
    """A browser script on another origin reads only the safelisted response headers and those in
    Access-Control-Expose-Headers: without X-Next-Cursor it cannot page, without Retry-After it cannot wait."""
    document = json.loads((ROOT / "infra" / "openapi.json").read_text())
    documented = {name.lower() for item in document["paths"].values() for operation in item.values()
                  for response in operation["responses"].values() for name in response.get("headers") or {}}
    assert {"x-next-cursor", "x-cache", "retry-after"} <= documented
    expose = template_checks.load_template()["Resources"]["HttpApi"]["Properties"]["CorsConfiguration"]
    exposed = {name.lower() for name in expose.get("ExposeHeaders") or []}
    assert documented - CORS_SAFELISTED_RESPONSE_HEADERS <= exposed


# What a browser lets a cross-origin script read without Access-Control-Expose-Headers (the Fetch standard).
CORS_SAFELISTED_RESPONSE_HEADERS = {"cache-control", "content-language", "content-length", "content-type", "expires",
                                    "last-modified", "pragma"}


def test_each_api_function_has_its_reservation_and_a_throttle_on_each_route_from_its_parameters(template, resources):
    for name in API_FUNCTIONS:
        prefix = name.removesuffix("Function")
        properties = functions(resources)[name]
        condition, reserved, unreserved = properties["ReservedConcurrentExecutions"]["Fn::If"]
        assert (reserved, unreserved) == ({"Ref": f"{prefix}ReservedConcurrency"}, {"Ref": "AWS::NoValue"}), name
        assert template["Conditions"][condition] == {"Fn::Not": [{"Fn::Equals": [reserved, 0]}]}, name
        for event in properties["Events"].values():
            assert event["Properties"]["RouteSettings"] == {
                "ThrottlingRateLimit": {"Ref": f"{prefix}ThrottleRate"},
                "ThrottlingBurstLimit": {"Ref": f"{prefix}ThrottleBurst"},
            }, name


def test_the_throttles_never_overrun_a_reservation_with_the_defaults_or_any_samconfig_environment(capsys):
    assert concurrency.check() == []
    printed = capsys.readouterr().out
    assert "samconfig.toml [prod]" in printed and "PredictionCreateFunction" in printed


def _budgets(overrides: dict[str, str] | None = None) -> dict[str, concurrency.FunctionBudget]:
    template = load_template(ROOT / "template.yaml")
    items = concurrency.budgets(template, parameter_values(template, overrides), ROOT)
    return {item.function_id: item for item in items}


def test_the_in_flight_bound_is_burst_plus_rate_times_init_and_timeout_summed_over_routes():
    defaults = _budgets()
    create = defaults["PredictionCreateFunction"]
    assert (create.timeout_s, create.longest_s) == (15, 25)  # Lambda's 10 s init limit, then the invoke
    assert create.in_flight == 2 + Fraction("0.4") * 25 == create.reserved == 12
    symbols = defaults["SymbolsFunction"]
    assert len(symbols.routes) == 6 and symbols.in_flight == 6 * (2 + Fraction("0.2") * 15) == 30
    assert all(item.problem is None for item in defaults.values())


@pytest.mark.parametrize("overrides", [
    {"PredictionCreateReservedConcurrency": "11"},  # one reservation lowered
    {"PredictionCreateThrottleRate": "0.5"},  # one rate raised
    {"SymbolsThrottleBurst": "3"},  # a burst raised: counted once per route
])
def test_changing_one_parameter_past_the_bound_is_caught(overrides):
    (name,) = [item for item in ("PredictionCreate", "Symbols") if next(iter(overrides)).startswith(item)]
    problem = _budgets(overrides)[f"{name}Function"].problem
    assert problem is not None and "over its reserved concurrency" in problem


def test_an_unreserved_function_has_no_reservation_to_overrun_and_a_route_without_throttle_is_refused(tmp_path):
    assert _budgets({"PredictionCreateReservedConcurrency": "0"})["PredictionCreateFunction"].reserved is None
    assert _budgets({"PredictionCreateReservedConcurrency": "0"})["PredictionCreateFunction"].problem is None
    text = (ROOT / "template.yaml").read_text()
    unthrottled = re.sub(r"      DefaultRouteSettings:\n(        .*\n)+", "", text, count=1)
    unthrottled = unthrottled.replace("              ThrottlingRateLimit: !Ref HealthThrottleRate\n", "", 1)
    assert unthrottled != text
    (tmp_path / "template.yaml").write_text(unthrottled)
    items = concurrency.budgets(load_template(tmp_path / "template.yaml"), parameter_values(load_template(
        tmp_path / "template.yaml")), ROOT)
    (health,) = [item for item in items if item.function_id == "HealthFunction"]
    assert health.in_flight is None and "GET /health has no throttle" in health.problem


def test_samconfig_overrides_are_read_per_environment(tmp_path):
    (tmp_path / "samconfig.toml").write_text(
        'version = 0.1\n[prod.deploy.parameters]\nparameter_overrides = "Stage=\\"prod\\" '
        'PredictionCreateReservedConcurrency=\\"5\\""\n')
    assert concurrency.samconfig_overrides(tmp_path / "samconfig.toml") == {
        "prod": {"Stage": "prod", "PredictionCreateReservedConcurrency": "5"}}
    assert any("samconfig.toml [prod]: PredictionCreateFunction" in problem
               for problem in concurrency.check(ROOT / "template.yaml", tmp_path / "samconfig.toml"))


# A db.t4g.micro's max_connections (about 80) less the 5 RDS keeps for its superusers (README, Connection budget).
T4G_MICRO_USABLE_CONNECTIONS = 75
BATCH_CONNECTIONS = 5  # Retention 1, Refresh 2, Score 1, Migrate 1 (README, Connection budget)


def test_scheduled_batch_functions_run_one_at_a_time(template, resources):
    """Overlapping Score runs (the hourly one, one per refresh chunk that added candles, their continuations) each
    scanned the whole due set: 3 at once took 55 s each, against 31.6 s for one alone, and held 3 connections.
    Reserved concurrency 1 queues an asynchronous invoke that finds the function busy (Lambda retries it).
    The reservation follows the API functions' pattern (README, Connection budget: "0 leaves it unreserved"), with
    1 as its default; it was hard-coded, so an account that could not spare it could not deploy."""
    fns = functions(resources)
    for name in ("ScoreFunction", "RetentionFunction"):
        prefix = name.removesuffix("Function")
        condition, reserved, unreserved = fns[name]["ReservedConcurrentExecutions"]["Fn::If"]
        assert (reserved, unreserved) == ({"Ref": f"{prefix}ReservedConcurrency"}, {"Ref": "AWS::NoValue"}), name
        assert template["Conditions"][condition] == {"Fn::Not": [{"Fn::Equals": [reserved, 0]}]}, name
        parameter = template["Parameters"][f"{prefix}ReservedConcurrency"]
        assert (parameter["Default"], parameter["MinValue"]) == (1, 0), name


def test_the_default_reservations_fit_a_db_t4g_micro_with_room_for_operators(template):
    api = sum(item.reserved for item in _budgets().values())
    scheduled = sum(template["Parameters"][f"{name}ReservedConcurrency"]["Default"] for name in ("Score", "Retention"))
    assert scheduled + 3 == BATCH_CONNECTIONS  # + Refresh's 2 and Migrate's 1
    assert api + BATCH_CONNECTIONS <= T4G_MICRO_USABLE_CONNECTIONS - 5, api


def test_science_layer_only_where_needed_and_both_layers_build_for_arm64(template, resources):
    layers = template_checks.function_layers(template)
    for name, layer_ids in layers.items():
        assert layer_ids[0] == "CommonLayer", name
        assert ("ScienceLayer" in layer_ids) == (name in SCIENCE_FUNCTIONS), name
    common, science = resources["CommonLayer"], resources["ScienceLayer"]
    assert common["Metadata"] == {"BuildMethod": "makefile", "BuildArchitecture": "arm64"}
    assert science["Metadata"] == {"BuildMethod": "makefile", "BuildArchitecture": "arm64"}
    for layer in (common, science):
        assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
        assert (ROOT / layer["Properties"]["ContentUri"] / "requirements.txt").is_file()
    for name, layer in (("CommonLayer", common), ("ScienceLayer", science)):
        makefile = (ROOT / layer["Properties"]["ContentUri"] / "Makefile").read_text()
        assert f"build-{name}:" in makefile and "include $(HERE)../platforms.mk" in makefile
    platforms = (ROOT / "layers/platforms.mk").read_text()
    assert "--only-binary=:all:" in platforms and "manylinux2014_aarch64" in platforms
    assert "--invalidation-mode unchecked-hash" in platforms


def test_bucket_is_encrypted_private_versioned_and_tls_only(resources):
    bucket = resources["DataBucket"]["Properties"]
    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    (statement,) = resources["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_old_candle_versions_expire_sooner_than_old_model_versions(resources):
    from candlecast import storage

    rules = resources["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]

    def kept_days(key: str) -> int:  # S3 applies the shortest expiry of the rules that match a key
        return min(rule["NoncurrentVersionExpiration"]["NoncurrentDays"] for rule in rules
                   if rule["Status"] == "Enabled" and key.startswith(rule.get("Prefix", "")))

    assert kept_days(storage.candles_key("X:BTCUSD", "1h")) <= 14
    assert kept_days(storage.active_model_key("1h")) >= 90


def test_outputs_name_the_api_bucket_and_every_function(template, resources):
    outputs = template["Outputs"]
    assert "ApiUrl" in outputs and outputs["DataBucketName"]["Value"] == {"Ref": "DataBucket"}
    named = {output["Value"].get("Ref") for output in outputs.values() if isinstance(output["Value"], dict)}
    assert set(functions(resources)) <= named


def test_env_json_sets_only_variables_the_template_declares(template, resources):
    """sam local ignores variables a function does not declare, so env.json must not rely on others."""
    env = json.loads((ROOT / "infra/env.json").read_text())
    globals_ = set(template["Globals"]["Function"]["Environment"]["Variables"])
    fns = functions(resources)
    for section, variables in env.items():
        declared = set(globals_)
        if section != "Parameters":
            assert section in fns, section
            declared |= set((fns[section].get("Environment") or {}).get("Variables") or {})
        assert set(variables) <= declared, (section, set(variables) - declared)


def test_checkov_skips_are_reviewed_with_reasons():
    skips = template_checks.load_skips()
    for check, skip in skips.items():
        assert re.fullmatch(r"CKV2?_AWS_\d+", check)
        assert len(skip["reason"]) >= 40, check


def test_settings_built_from_the_deployed_environment_use_the_secret(template, monkeypatch):
    """The variables the template sets in AWS (empty DATABASE_URL included) configure the secret path."""
    from candlecast.config import Settings

    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:candlecast-db-AbCdEf"
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    for name in list(os.environ):
        if name in variables or name in ("DATABASE_URL", "S3_ENDPOINT_URL"):
            monkeypatch.delenv(name)
    aws_values = {
        "POWERTOOLS_LOG_LEVEL": "INFO", "STAGE": "dev", "DATA_BUCKET": "candlecast-dev-databucket-1a2b3c",
        "REDIS_URL": "rediss://candlecast.abc123.use1.cache.amazonaws.com:6379/0", "DB_SECRET_ARN": arn,
        "MODEL_SIGNING_KEY_SECRET_ARN": arn, "DB_PREPARE_THRESHOLD": "5",
    }
    for name, value in variables.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    for name, value in aws_values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.database_url is None and settings.db_secret_arn == arn
    assert settings.s3_endpoint_url is None
    assert settings.db_prepare_threshold == 5
    rds_proxy = template["Globals"]["Function"]["Environment"]["Variables"]["DB_PREPARE_THRESHOLD"]
    monkeypatch.setenv("DB_PREPARE_THRESHOLD", rds_proxy["Fn::If"][1])
    assert Settings().db_prepare_threshold is None


def fake_build(build_dir: Path, artifact_mb: dict[str, int]) -> Path:
    """A .aws-sam/build look-alike: one sparse file of the given size per artifact (no disk used)."""
    for name, megabytes in artifact_mb.items():
        (build_dir / name).mkdir(parents=True)
        with (build_dir / name / "payload.bin").open("wb") as handle:
            handle.truncate(megabytes * 1024 * 1024)
    return build_dir


def test_size_report_counts_layers_and_fails_over_250_mb(tmp_path, template):
    functions_ = template_checks.function_layers(template)
    sizes = dict.fromkeys(functions_, 1) | {"CommonLayer": 30, "ScienceLayer": 200}
    report = template_checks.size_report(fake_build(tmp_path / "ok", sizes))
    assert report["PredictionCreateFunction"]["total"] == 231 * 1024 * 1024
    assert report["HealthFunction"]["total"] == 31 * 1024 * 1024

    with pytest.raises(template_checks.CheckFailed, match="PredictionCreateFunction"):
        template_checks.size_report(fake_build(tmp_path / "big", sizes | {"ScienceLayer": 220}))


def test_native_code_check_refuses_x86_64_libraries(tmp_path):
    elf_header = bytearray(b"\x7fELF\x02\x01\x01" + bytes(13))
    elf_header[18:20] = (62).to_bytes(2, "little")  # EM_X86_64
    (tmp_path / "CommonLayer").mkdir()
    (tmp_path / "CommonLayer/_psycopg.so").write_bytes(bytes(elf_header))
    assert template_checks.elf_machine(tmp_path / "CommonLayer/_psycopg.so") == 62
    with pytest.raises(template_checks.CheckFailed, match="not arm64"):
        template_checks.check_native_code(tmp_path)


def test_snapstart_is_an_option_off_by_default_behind_a_published_alias(template, resources):
    assert template["Parameters"]["SnapStart"]["Default"] == "false"
    assert template["Conditions"]["SnapStartOn"] == {"Fn::Equals": [{"Ref": "SnapStart"}, "true"]}
    assert template["Globals"]["Function"]["AutoPublishAlias"] == "live"
    api_functions = {name for name, props in functions(resources).items()
                     if any(event["Type"] == "HttpApi" for event in props.get("Events", {}).values())}
    assert api_functions >= {"HealthFunction", "SymbolsFunction", "PredictionCreateFunction", "PredictionGetFunction"}
    for name in api_functions:
        assert functions(resources)[name]["SnapStart"] == {
            "ApplyOn": {"Fn::If": ["SnapStartOn", "PublishedVersions", "None"]}}, name
        assert functions(resources)[name].get("EphemeralStorage", {"Size": 512})["Size"] <= 512
        assert "ProvisionedConcurrencyConfig" not in functions(resources)[name]


def test_the_secrets_extension_is_an_optional_layer_with_its_port(template):
    parameter = template["Parameters"]["SecretsExtensionLayerArn"]
    assert parameter["Default"] == ""
    assert {"Fn::If": ["SecretsExtensionOn", {"Ref": "SecretsExtensionLayerArn"}, {"Ref": "AWS::NoValue"}]} in \
        template["Globals"]["Function"]["Layers"]
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    assert variables["PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"] == {"Fn::If": ["SecretsExtensionOn", "2773", ""]}


API_ALARMS = ("Api5xxAlarm", "ApiFunctionErrorsAlarm", "ApiFunctionThrottlesAlarm")


def test_an_api_outage_raises_an_alarm_on_the_alarm_topic(template, resources):
    """Only failed scheduled runs had an alarm: the API answering nothing but 503s (the database down) or 500s
    (functions failing or throttled) reached nobody. The API's 5xx, and the four API functions' Lambda Errors and
    Throttles, now each have an alarm that notifies AlarmTopicArn as FailedRunsAlarm does."""
    notify = {"Fn::If": ["AlarmTopicOn", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for name in API_ALARMS:
        alarm = resources[name]["Properties"]
        assert resources[name]["Type"] == "AWS::CloudWatch::Alarm", name
        assert alarm["AlarmActions"] == alarm["OKActions"] == notify, name
        assert alarm["TreatMissingData"] == "notBreaching", name
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold" and alarm["Threshold"] >= 1, name
        assert alarm["AlarmName"]["Fn::Sub"].startswith("candlecast-${Stage}-"), name
    api = resources["Api5xxAlarm"]["Properties"]
    assert (api["Namespace"], api["MetricName"], api["Statistic"]) == ("AWS/ApiGateway", "5xx", "Sum")
    assert api["Dimensions"] == [{"Name": "ApiId", "Value": {"Ref": "HttpApi"}}]
    for name, metric in (("ApiFunctionErrorsAlarm", "Errors"), ("ApiFunctionThrottlesAlarm", "Throttles")):
        queries = resources[name]["Properties"]["Metrics"]
        (total,) = [query for query in queries if query.get("ReturnData")]
        stats = [query["MetricStat"] for query in queries if "MetricStat" in query]
        assert total["Expression"] == f"SUM([{', '.join(query['Id'] for query in queries if 'MetricStat' in query)}])"
        assert {(stat["Metric"]["Namespace"], stat["Metric"]["MetricName"], stat["Stat"]) for stat in stats} == {
            ("AWS/Lambda", metric, "Sum")}, name
        assert sorted(stat["Metric"]["Dimensions"][0]["Value"]["Ref"] for stat in stats) == sorted(API_FUNCTIONS)
        assert all(stat["Metric"]["Dimensions"][0]["Name"] == "FunctionName" for stat in stats)



@pytest.mark.parametrize(("name", "function"), [("RefreshFailedShareAlarm", "refresh"),
                                                ("ScoreFailedShareAlarm", "score")])
def test_a_scheduled_functions_failed_share_alarm_reads_its_own_metrics_and_notifies_the_topic(
        template, resources, name, function):
    """A Score chunk whose predictions failed completed and emitted nothing: no alarm could go off. Each failed-share
    alarm reads its function's EMF metrics (a day's sums) and notifies AlarmTopicArn as the others do."""
    alarm = resources[name]["Properties"]
    notify = {"Fn::If": ["AlarmTopicOn", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    assert alarm["AlarmActions"] == alarm["OKActions"] == notify
    assert alarm["AlarmName"] == {"Fn::Sub": f"candlecast-${{Stage}}-{function}-failed-share"}
    assert (alarm["TreatMissingData"], alarm["ComparisonOperator"], alarm["Threshold"]) == (
        "notBreaching", "GreaterThanOrEqualToThreshold", 0.2)
    [share] = [query for query in alarm["Metrics"] if query.get("ReturnData", True)]
    stats = [query for query in alarm["Metrics"] if "MetricStat" in query]
    assert set(re.findall(r"[a-z]+", share["Expression"])) == {query["Id"] for query in stats}
    for query in stats:
        metric = query["MetricStat"]["Metric"]
        assert metric["MetricName"].startswith(function.capitalize()), metric
        assert metric["Namespace"] == template["Globals"]["Function"]["Environment"]["Variables"][
            "POWERTOOLS_METRICS_NAMESPACE"]
        assert {item["Name"]: item["Value"] for item in metric["Dimensions"]} == {
            "service": "candlecast", "stage": {"Ref": "Stage"}, "function": function}
        assert (query["MetricStat"]["Period"], query["MetricStat"]["Stat"]) == (86400, "Sum")
    assert name in " ".join(template["Parameters"]["AlarmTopicArn"]["Description"].split())


def test_the_readme_names_every_alarm_of_the_template(resources):
    readme = (ROOT / "README.md").read_text()
    for name, resource in resources.items():
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            assert f"**{name}**" in readme, name


def test_the_access_log_joins_api_gateways_request_id_with_the_lambda_invocations():
    """The access log had only API Gateway's requestId (the functions' correlation_id); with the invocation's id
    beside it, a line of it leads to the function's REPORT line and its logs either way."""
    api = template_checks.load_template()["Resources"]["HttpApi"]["Properties"]
    fields = json.loads(api["AccessLogSettings"]["Format"])
    assert fields["requestId"] == "$context.requestId"
    assert fields["lambdaRequestId"] == "$context.integration.requestId"


def test_every_function_logs_in_lambdas_json_format_at_the_log_level(template):
    """In Lambda's text format a function that died (an uncaught error, a timeout) wrote its traceback as plain
    text: no level to filter an ERROR by. Lambda's JSON format writes it as a JSON record with "level": "ERROR";
    Powertools' JSON lines are passed on as they are, and take Lambda's application level as theirs."""
    logging_config = template["Globals"]["Function"]["LoggingConfig"]
    assert logging_config["LogFormat"] == "JSON"
    assert logging_config["ApplicationLogLevel"] == {"Fn::FindInMap": ["LambdaLogLevels", {"Ref": "LogLevel"}, "Level"]}
    levels = {name: row["Level"] for name, row in template["Mappings"]["LambdaLogLevels"].items()}
    assert set(levels) == set(template["Parameters"]["LogLevel"]["AllowedValues"])


def test_the_readme_lists_every_route_of_each_function(resources):
    """What gets created listed 4 Symbols routes; the template has 6 (/models, /models/{timeframe} were missing)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### What gets created", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("  | ")}
    for name, properties in functions(resources).items():
        for _method, path in template_routes(properties):
            assert re.search(rf"[` ]{re.escape(path)}`", rows[name.removesuffix("Function")]), (name, path)


def test_the_runbook_re_invokes_a_failed_run_by_a_name_that_exists(resources):
    """The runbook re-invoked `candlecast-dev-<function>`: only Refresh and Score have such a fixed name, so the
    command failed for Retention. A literal name in it must be one the template fixes; else it is a variable."""
    readme = (ROOT / "README.md").read_text()
    runbook = readme.split("### Failed runs", 1)[1].split("\n### ", 1)[0]
    fixed = {properties["FunctionName"]["Fn::Sub"].replace("${Stage}", "dev")
             for properties in functions(resources).values() if "FunctionName" in properties}
    names = re.findall(r"--function-name\s+(\S+)", runbook)
    assert names
    for name in names:
        assert name.strip("\"'").startswith("$") or name in fixed, name
    assert "requestContext.functionArn" in runbook
