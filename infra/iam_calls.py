"""The AWS calls code makes, as IAM sees them, and whether a function's template policy allows them.

moto, like every local stand-in, enforces no IAM: a call the template's policy does not allow passes every test and
is an AccessDenied only in AWS (a 503 to the client). `recording()` records every botocore call made in this process
(any client, any session: Powertools' Secrets Manager client is its own) as the IAM request it is
(`IamRequest`: action and resource ARN); `function_statements` reads a function's `Policies` statements from the
template with the deployment's values substituted; `denied` lists the requests no statement allows.
"""

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from infra.sam_template import LOCAL_ACCOUNT_ID, LOCAL_REGION, parameter_values, resolve


@dataclass(frozen=True)
class AwsCall:
    service: str  # botocore's name: "s3", "secretsmanager", "lambda"
    operation: str  # "GetObject"
    params: Mapping[str, Any]
    status: int | None = None  # the HTTP status S3 (or the stand-in) answered; None: no answer
    arn: str | None = None  # the ARN the answer names (Secrets Manager's: the secret's full ARN)


@dataclass(frozen=True)
class IamRequest:
    action: str
    resource: str
    why: str  # the call it stands for
    context: tuple[tuple[str, str], ...] = ()  # the condition keys the request carries: (("s3:prefix", "models/"),)


def iam_requests(call: AwsCall) -> list[IamRequest]:
    """The IAM requests one API call makes. A call this does not know is an error, so a new kind of call cannot go
    unchecked: add its action and resource here (the Service Authorization Reference lists them)."""
    params, why = call.params, f"{call.service}.{call.operation}"
    if call.service == "s3":
        bucket = f"arn:aws:s3:::{params['Bucket']}"
        if call.operation in ("GetObject", "HeadObject"):  # HeadObject is authorized as s3:GetObject
            requests = [IamRequest("s3:GetObject", f"{bucket}/{params['Key']}", why)]
            if call.status == 404:
                # Without s3:ListBucket S3 answers a missing key with 403 AccessDenied, not 404: the code's
                # "no such file" (None) would be a 503.
                requests.append(IamRequest("s3:ListBucket", bucket, f"{why} answered 404 for a missing key"))
            return requests
        if call.operation == "PutObject":
            return [IamRequest("s3:PutObject", f"{bucket}/{params['Key']}", why)]
        if call.operation == "ListObjectsV2":
            return [IamRequest("s3:ListBucket", bucket, why, (("s3:prefix", params.get("Prefix", "")),))]
    if call.service == "secretsmanager" and call.operation == "GetSecretValue":
        # IAM matches the secret's full ARN (name-XXXXXX), whatever name or partial ARN SecretId gave.
        return [IamRequest("secretsmanager:GetSecretValue", call.arn or params["SecretId"], why)]
    if call.service == "lambda" and call.operation == "Invoke":
        name = params["FunctionName"]
        if not name.startswith("arn:"):
            name = f"arn:aws:lambda:{LOCAL_REGION}:{LOCAL_ACCOUNT_ID}:function:{name}"
        return [IamRequest("lambda:InvokeFunction", name, why)]
    raise NotImplementedError(f"no IAM mapping for {why}: add it to infra/iam_calls.iam_requests")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[AwsCall] = []

    def _before(self, params, model, context, **_):
        context["iam_calls"] = {"service": model.service_model.service_name, "operation": model.name,
                                "params": dict(params)}

    def _short_circuit(self, model, **_):
        """Lambda's Invoke is answered here (202), never sent: moto would run the function in Docker."""
        if model.service_model.service_name == "lambda" and model.name == "Invoke":
            from botocore.awsrequest import AWSResponse

            return AWSResponse("http://lambda.invalid", 202, {}, None), {"StatusCode": 202}
        return None

    def _after(self, http_response, parsed, context, **_):
        if (started := context.pop("iam_calls", None)) is not None:
            self.calls.append(AwsCall(**started, status=getattr(http_response, "status_code", None),
                                      arn=parsed.get("ARN") if isinstance(parsed, dict) else None))

    def attach(self, client) -> None:
        client.meta.events.register("before-parameter-build", self._before)
        client.meta.events.register("before-call", self._short_circuit)
        client.meta.events.register("after-call", self._after)
        client.meta.events.register("after-call-error", self._after_error)

    def _after_error(self, context, **_):  # no answer (a timeout, a refused connection)
        if (started := context.pop("iam_calls", None)) is not None:
            self.calls.append(AwsCall(**started))

    def take(self) -> list[AwsCall]:
        calls, self.calls = self.calls, []
        return calls


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record every API call of every botocore client created meanwhile (clients made before are not seen)."""
    import botocore.session

    recorder = Recorder()
    original = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = original(self, *args, **kwargs)
        recorder.attach(client)
        return client

    botocore.session.Session.create_client = create_client
    try:
        yield recorder
    finally:
        botocore.session.Session.create_client = original


def function_statements(template: Mapping, logical_id: str, parameters: Mapping[str, str],
                        attributes: Mapping[str, str]) -> list[dict]:
    """The Allow/Deny statements of a function's inline `Policies`, resolved: parameters (secret ARNs, Stage) and
    resources' Ref and GetAtt (`attributes`: {"DataBucket": name, "DataBucket.Arn": arn}) substituted."""
    values = {**parameter_values(template, parameters), **attributes, "AWS::Partition": "aws",
              "AWS::Region": LOCAL_REGION, "AWS::AccountId": LOCAL_ACCOUNT_ID, "AWS::URLSuffix": "amazonaws.com"}

    def get_att(node: Any) -> Any:
        if isinstance(node, list):
            return [get_att(item) for item in node]
        if isinstance(node, Mapping):
            if set(node) == {"Fn::GetAtt"}:
                target = node["Fn::GetAtt"]
                return values[target if isinstance(target, str) else ".".join(target)]
            return {key: get_att(item) for key, item in node.items()}
        return node

    policies = template["Resources"][logical_id]["Properties"].get("Policies") or []
    statements = []
    for policy in policies:
        if not isinstance(policy, Mapping) or set(policy) != {"Statement"}:
            raise NotImplementedError(f"{logical_id}: only inline Statement policies are evaluated, not {policy!r} "
                                      "(a SAM policy template or a managed policy: expand it here first)")
        statements.extend(resolve(get_att(policy["Statement"]), values, template.get("Conditions") or {}))
    return statements


def _matches(patterns: Any, value: str, *, ignore_case: bool) -> bool:
    for pattern in patterns if isinstance(patterns, list) else [patterns]:
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        if re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0):
            return True
    return False


def _conditions_hold(statement: dict, request: IamRequest) -> bool:
    """A statement's Condition for the request: StringEquals and StringLike only (any value of a key matches; a key
    the request does not carry matches none, as in IAM); other operators are an error, so none goes unchecked."""
    context = dict(request.context)
    for operator, tests in (statement.get("Condition") or {}).items():
        if operator not in ("StringEquals", "StringLike"):
            raise NotImplementedError(f"statement {statement.get('Sid')}: condition operator {operator} is not "
                                      "evaluated here")
        for key, patterns in tests.items():
            value = context.get(key)
            if value is None:
                return False
            patterns = patterns if isinstance(patterns, list) else [patterns]
            if operator == "StringEquals" and value not in patterns:
                return False
            if operator == "StringLike" and not _matches(patterns, value, ignore_case=False):
                return False
    return True


def allowed(statements: list[dict], request: IamRequest) -> bool:
    """IAM's identity-policy evaluation for one request: an explicit Deny wins, else an Allow must match action
    (case-insensitive), resource (wildcards * and ?) and its conditions (`_conditions_hold`)."""
    verdicts = set()
    for statement in statements:
        if {"NotAction", "NotResource"} & set(statement):
            raise NotImplementedError(f"statement {statement.get('Sid')}: NotAction and NotResource are not "
                                      "evaluated here")
        if (_matches(statement["Action"], request.action, ignore_case=True)
                and _matches(statement["Resource"], request.resource, ignore_case=False)
                and _conditions_hold(statement, request)):
            verdicts.add(statement["Effect"])
    return verdicts == {"Allow"}


def denied(statements: list[dict], calls: list[AwsCall]) -> list[IamRequest]:
    """The IAM requests of `calls` that `statements` do not allow, each once."""
    requests = dict.fromkeys(request for call in calls for request in iam_requests(call))
    return [request for request in requests if not allowed(statements, request)]
