"""Every AWS call each function makes is allowed by that function's policy in template.yaml.

moto enforces no IAM, so every other test passes whatever the policies say; in AWS a missing permission is an
AccessDenied (a 503, a scoring run that never starts) seen only in production. Here each function runs in-process
with its deployed environment (template.yaml's variables, secrets by ARN in moto's Secrets Manager, a stage that
reads its signing key from a secret), on its tests/events files plus the paths those miss (a symbol with no candle
file, a run handed on to a new invocation). Every botocore call is recorded (`infra.iam_calls`) and checked against
the function's resolved `Policies`: a call its statements do not allow fails, naming the action and the resource.
"""

import json

import psycopg
import pytest

from infra.artifacts import Deployment, function_events, template_functions
from infra.iam_calls import denied, function_statements, iam_requests, recording
from infra.lambda_loader import LambdaContext, forget_functions, load_handler
from infra.sam_template import load_template, resolve
from tests.conftest import ROOT, empty_bucket, reset_clients

pytestmark = [pytest.mark.integration, pytest.mark.s3]

# Not the function's own settings: the machine's (an in-process run keeps this process's).
NOT_SET = {"PATH", "LANG", "TZ", "PYTHONDONTWRITEBYTECODE", "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"}
NO_FILE = "X:C000USD"  # in the fake Polygon's market, and in no candle file of the bucket

# What the runs below must reach, per function: the IAM requests, by action and resource (secrets by parameter,
# objects by prefix). It keeps the runs honest: a scenario that stops reaching a call no longer proves its
# permission. Derived from the recording, never an input to the policy check.
EXERCISED = {
    "MigrateFunction": {"secretsmanager:GetSecretValue DbSecretArn"},
    # Its storage check is an unsigned HEAD of the bucket, then a LIST of the model files' names.
    "HealthFunction": {"secretsmanager:GetSecretValue DbSecretArn", "s3:ListBucket bucket"},
    "SymbolsFunction": {"secretsmanager:GetSecretValue DbSecretArn"},
    "PredictionGetFunction": {"secretsmanager:GetSecretValue DbSecretArn"},
    "PredictionCreateFunction": {
        "secretsmanager:GetSecretValue DbSecretArn", "secretsmanager:GetSecretValue ModelSigningKeySecretArn",
        "secretsmanager:GetSecretValue PolygonApiKeySecretArn", "s3:GetObject data/*", "s3:GetObject models/*",
        "s3:ListBucket bucket",  # a missing candle file must be S3's 404, not its 403
    },
    "RefreshFunction": {
        "secretsmanager:GetSecretValue DbSecretArn", "secretsmanager:GetSecretValue PolygonApiKeySecretArn",
        "s3:GetObject data/*", "s3:PutObject data/*", "s3:ListBucket bucket",
        "lambda:InvokeFunction candlecast-iam-refresh:live", "lambda:InvokeFunction candlecast-iam-score",
    },
    "ScoreFunction": {
        "secretsmanager:GetSecretValue DbSecretArn", "secretsmanager:GetSecretValue ModelSigningKeySecretArn",
        "s3:GetObject data/*", "s3:GetObject models/*", "lambda:InvokeFunction candlecast-iam-score:live",
    },
    "RetentionFunction": {"secretsmanager:GetSecretValue DbSecretArn"},
}
STAGE = "iam"  # in the chained functions' names: candlecast-iam-refresh
RUN_ORDER = ["MigrateFunction", "HealthFunction", "SymbolsFunction", "PredictionGetFunction",
             "PredictionCreateFunction", "RefreshFunction", "ScoreFunction", "RetentionFunction"]


def deployed_name(template: dict, logical_id: str) -> str:
    name = template["Resources"][logical_id]["Properties"].get("FunctionName")
    return resolve(name, {"Stage": STAGE}) if name else f"candlecast-{STAGE}-{logical_id}"


def extra_events(logical_id: str, events: list[dict]) -> list[tuple[dict, float | None]]:
    """(event, timeout) beyond tests/events: a create for a symbol with no candle file (S3's 404, then Polygon),
    and a scheduled run given too little time to finish, which hands the rest on to itself."""
    if logical_id == "PredictionCreateFunction":
        event = json.loads(json.dumps(events[0]))
        event["body"] = json.dumps({"symbol": NO_FILE, "timeframe": "1d"})
        event["headers"].pop("idempotency-key", None)
        return [(event, None)]
    if logical_id in ("RefreshFunction", "ScoreFunction"):
        return [(events[0], 1.0)]  # less than invoke.stop_margin_seconds: it hands the whole run on
    return []


@pytest.fixture(scope="module")
def recorded(stack, migrated_db):
    """{logical id: [AwsCall]} of every function run on its events with its deployed environment."""
    from candlecast import polygon, seed
    from candlecast.services import model_loading

    template = load_template(ROOT / "template.yaml")
    functions = {function.logical_id: function for function in template_functions(template)}
    assert sorted(functions) == sorted(RUN_ORDER), "a new function: add it to RUN_ORDER and EXERCISED"
    deployment = Deployment.create(stack, STAGE)  # SCORE_FUNCTION_NAME: candlecast-iam-score
    calls = {}
    try:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM predictions")
        empty_bucket(stack.bucket)
        model_loading.forget_models()
        seed.seed(progress=False)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO symbols (ticker, name, base_currency, quote_currency, market, volume_24h) "
                         "VALUES (%s, 'Coin 000', 'C000', 'USD', 'crypto', 1) ON CONFLICT DO NOTHING", (NO_FILE,))
        with recording() as recorder:
            for logical_id in RUN_ORDER:
                function = functions[logical_id]
                task_root = ROOT / "functions" / function.folder  # no bundled model: the bucket's is read
                environment = deployment.artifact_environment(
                    template, function, task_root) | {"STAGE": "local"}  # the committed models' key
                if "MIGRATIONS_DIR" in environment:  # the build links migrations/ into the function
                    environment["MIGRATIONS_DIR"] = str(ROOT / "migrations")
                events = deployment.prepared_events(function_events(function))
                runs = [(event, None) for event in events] + extra_events(logical_id, events)
                with pytest.MonkeyPatch.context() as patch:
                    for name, value in environment.items():
                        if name not in NOT_SET:
                            patch.setenv(name, value)
                    patch.delenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", raising=False)
                    # A new container: no clients, settings, secrets or models from the function before.
                    reset_clients()
                    model_loading.forget_models()
                    polygon.reset_client()
                    forget_functions()
                    recorder.take()
                    handler = load_handler(task_root)
                    for event, timeout in runs:
                        context = LambdaContext(deployed_name(template, logical_id),
                                                timeout_seconds=timeout or function.timeout_s)
                        if isinstance(event, dict) and event.get("source") == "aws.events":
                            context.invoked_function_arn += ":live"  # its schedule invokes the alias
                        handler(event, context)
                    calls[logical_id] = recorder.take()
                    reset_clients()
    finally:
        deployment.close()
        forget_functions()
        reset_clients()
    return template, deployment.secret_arns, calls


def summary(request, secret_arns: dict[str, str], bucket: str) -> str:
    """"s3:GetObject data/*", "secretsmanager:GetSecretValue DbSecretArn": a request without this run's names."""
    resource = request.resource
    names = {arn: name for name, arn in secret_arns.items()}
    if resource in names:
        resource = names[resource]
    elif resource == f"arn:aws:s3:::{bucket}":
        resource = "bucket"
    elif resource.startswith(f"arn:aws:s3:::{bucket}/"):
        resource = resource.removeprefix(f"arn:aws:s3:::{bucket}/").split("/")[0] + "/*"
    elif ":function:" in resource:
        resource = resource.rsplit(":function:", 1)[1]
    return f"{request.action} {resource}"


@pytest.mark.parametrize("logical_id", RUN_ORDER)
def test_every_aws_call_of_the_function_is_allowed_by_its_policy(recorded, stack, logical_id):
    template, secret_arns, calls = recorded
    statements = function_statements(template, logical_id, {**secret_arns, "Stage": STAGE},
                                      {"DataBucket": stack.bucket, "DataBucket.Arn": f"arn:aws:s3:::{stack.bucket}"})
    missing = denied(statements, calls[logical_id])
    assert not missing, f"{logical_id}'s policy does not allow:\n" + "\n".join(
        f"  {request.action} on {request.resource} ({request.why})" for request in missing)
    reached = {summary(request, secret_arns, stack.bucket) for call in calls[logical_id]
               for request in iam_requests(call)}
    assert reached == EXERCISED[logical_id]


def test_healths_listing_is_allowed_under_the_models_prefix_only():
    """Health may list key names under models/ (its model files check) and nowhere else: the statement's
    s3:prefix condition is evaluated, not skipped."""
    from infra.iam_calls import AwsCall

    template = load_template(ROOT / "template.yaml")
    statements = function_statements(
        template, "HealthFunction",
        {"Stage": STAGE, "DbSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbC12f"},
        {"DataBucket": "bucket", "DataBucket.Arn": "arn:aws:s3:::bucket"})

    def listing(**params) -> list[AwsCall]:
        return [AwsCall("s3", "ListObjectsV2", {"Bucket": "bucket", **params})]

    assert not denied(statements, listing(Prefix="models/"))
    for params in ({"Prefix": "data/"}, {"Prefix": ""}, {}):
        assert denied(statements, listing(**params)), params


def test_a_statements_string_conditions_are_evaluated():
    """A statement with a Condition was refused as unevaluable; StringEquals and StringLike are evaluated now, and a
    key the request does not carry matches no condition on it, as in IAM."""
    from infra.iam_calls import IamRequest, allowed

    statements = [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::b",
                   "Condition": {"StringLike": {"s3:prefix": ["models/*", "data/x/*"]}}}]

    def listing(*context) -> IamRequest:
        return IamRequest("s3:ListBucket", "arn:aws:s3:::b", "s3.ListObjectsV2", tuple(context))

    assert allowed(statements, listing(("s3:prefix", "models/")))
    assert allowed(statements, listing(("s3:prefix", "data/x/1h.parquet")))
    assert not allowed(statements, listing(("s3:prefix", "data/")))
    assert not allowed(statements, listing())
    exact = [{**statements[0], "Condition": {"StringEquals": {"s3:prefix": "models/"}}}]
    assert allowed(exact, listing(("s3:prefix", "models/")))
    assert not allowed(exact, listing(("s3:prefix", "models/1d/")))
    with pytest.raises(NotImplementedError, match="IpAddress"):
        allowed([{**statements[0], "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}], listing())
