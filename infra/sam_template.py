"""Reading template.yaml as `sam local` does: short tags, parameters, conditions, functions and HttpApi routes.

Only what a local run can know is resolved; whatever only AWS knows (a resource's Ref or GetAtt) stays unset.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = ROOT / "template.yaml"
LOCAL_ACCOUNT_ID = "123456789012"
LOCAL_REGION = "us-east-1"
DEFAULT_TIMEOUT_S = 3  # Lambda's default
DEFAULT_MEMORY_MB = 128
PSEUDO_PARAMETERS = {
    "AWS::AccountId": LOCAL_ACCOUNT_ID,
    "AWS::Region": LOCAL_REGION,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "candlecast-local",
    "AWS::NoValue": None,
}

log = logging.getLogger("local_api")


class CfnLoader(yaml.SafeLoader):
    """YAML loader that turns CloudFormation short tags (!Ref, !Sub, !GetAtt, ...) into their long form."""


def _intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    name = tag_suffix if tag_suffix == "Condition" else f"Fn::{tag_suffix}"
    return {name: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path | str = DEFAULT_TEMPLATE) -> dict:
    with open(path, encoding="utf-8") as handle:
        template = yaml.load(handle, Loader=CfnLoader)  # noqa: S506 - CfnLoader is a SafeLoader
    if not isinstance(template, dict) or "Resources" not in template:
        raise ValueError(f"{path} is not a CloudFormation/SAM template")
    return template


def parameter_values(template: Mapping, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parameter defaults and pseudo parameters, as `sam local` resolves them, with overrides on top."""
    values: dict[str, Any] = dict(PSEUDO_PARAMETERS)
    for name, spec in (template.get("Parameters") or {}).items():
        if isinstance(spec, Mapping) and "Default" in spec:
            default = spec["Default"]
            if str(spec.get("Type", "")).startswith("List<") or spec.get("Type") == "CommaDelimitedList":
                default = [item.strip() for item in str(default).split(",")]
            values[name] = default
    values.update(overrides or {})
    return values


class Unresolvable(ValueError):
    pass


def resolve(value: Any, parameters: Mapping[str, Any], conditions: Mapping[str, Any] | None = None) -> Any:
    """Resolve what a local run can know: Ref to parameters, Sub, Join, Select, If/Equals/Not/And/Or.

    Anything that only AWS knows (a resource's Ref or GetAtt, a parameter without a default) raises
    Unresolvable, like `sam local`, which leaves such variables unset.
    """
    conditions = conditions or {}

    def again(item: Any) -> Any:
        return resolve(item, parameters, conditions)

    def condition(name: str) -> bool:
        if name not in conditions:
            raise Unresolvable(f"Condition {name}")
        return bool(again(conditions[name]))

    if isinstance(value, list):
        return [again(item) for item in value]
    if not isinstance(value, Mapping):
        return value
    if len(value) != 1:
        return {key: again(item) for key, item in value.items()}
    (name, argument), = value.items()
    if name == "Ref":
        if argument in parameters:
            return parameters[argument]
        raise Unresolvable(f"Ref {argument}")
    if name == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        scope = {**parameters, **{key: again(item) for key, item in variables.items()}}

        def substitute(match: re.Match) -> str:
            key = match.group(1)
            if key.startswith("!"):
                return "${" + key[1:] + "}"
            if key not in scope:
                raise Unresolvable(f"Sub ${{{key}}}")
            return str(scope[key])

        return re.sub(r"\$\{([^}]+)\}", substitute, text)
    if name == "Fn::Join":
        separator, items = argument
        return separator.join(str(item) for item in again(items))
    if name == "Fn::Select":
        index, items = argument
        return again(items)[int(again(index))]
    if name == "Fn::If":
        name_, if_true, if_false = argument
        return again(if_true if condition(name_) else if_false)
    if name == "Condition":
        return condition(argument)
    if name == "Fn::Equals":
        left, right = again(argument)
        return str(left) == str(right)
    if name == "Fn::Not":
        return not again(argument[0])
    if name == "Fn::And":
        return all(again(item) for item in argument)
    if name == "Fn::Or":
        return any(again(item) for item in argument)
    if name.startswith("Fn::"):
        raise Unresolvable(name)
    return {name: again(argument)}


@dataclass(frozen=True)
class FunctionSpec:
    """What Lambda needs to run one AWS::Serverless::Function."""

    logical_id: str
    code_dir: Path
    handler: str  # "app.lambda_handler"
    layer_dirs: tuple[Path, ...]
    environment: Mapping[str, str]
    memory_mb: int = DEFAULT_MEMORY_MB
    timeout_s: float = DEFAULT_TIMEOUT_S
    reserved_concurrency: int | None = None  # ReservedConcurrentExecutions: at most this many at once

    @property
    def module_file(self) -> Path:
        module, _, _ = self.handler.rpartition(".")
        return self.code_dir.joinpath(*module.split(".")).with_suffix(".py")

    @property
    def handler_name(self) -> str:
        return self.handler.rpartition(".")[2]


@dataclass(frozen=True)
class Throttle:
    """A route's API Gateway throttle: a token bucket of `burst` tokens refilled at `rate` per second."""

    rate: float
    burst: int

    def __str__(self) -> str:
        return f"throttle {self.rate:g}/s, burst {self.burst}"


@dataclass(frozen=True)
class Route:
    """One HttpApi route: `METHOD /path/{param}/{proxy+}`; method ANY and path $default are allowed."""

    method: str
    path: str
    function_id: str
    pattern: re.Pattern = field(compare=False, repr=False)
    throttle: Throttle | None = field(default=None, compare=False)

    @classmethod
    def create(cls, method: str, path: str, function_id: str, throttle: Throttle | None = None) -> Route:
        method = method.upper()
        if path == "$default":
            return cls(method, path, function_id, re.compile(r"^/.*$"), throttle)
        parts = []
        for segment in path.strip("/").split("/"):
            greedy = re.fullmatch(r"\{(\w+)\+\}", segment)
            param = re.fullmatch(r"\{(\w+)\}", segment)
            if greedy:
                parts.append(f"(?P<{greedy.group(1)}>.+)")
            elif param:
                parts.append(f"(?P<{param.group(1)}>[^/]+)")
            else:
                parts.append(re.escape(segment))
        return cls(method, path, function_id, re.compile("^/" + "/".join(parts) + "$"), throttle)

    @property
    def route_key(self) -> str:
        return "$default" if self.path == "$default" else f"{self.method} {self.path}"

    @property
    def priority(self) -> tuple:
        """API Gateway picks the most specific route: literals, params, greedy last; methods before ANY."""
        kinds = tuple(2 if s.endswith("+}") else 1 if s.startswith("{") else 0
                      for s in self.path.strip("/").split("/"))
        return (self.path == "$default", 2 in kinds, kinds, self.method == "ANY")

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.method not in ("ANY", method.upper()):
            return None
        found = self.pattern.match(path)
        if found is None:
            return None
        return {name: unquote(value) for name, value in found.groupdict().items()}


_skipped_layers: set[str] = set()  # warned about once a process: the template is parsed several times a run


def _layer_dir(reference: Any, resources: Mapping, template_dir: Path, parameters: Mapping[str, Any],
               conditions: Mapping[str, Any]) -> Path | None:
    """A layer's local content: layers built by `sam build` (BuildMethod) live under /opt/python in Lambda.
    None for a layer that a condition leaves out (AWS::NoValue), and for one outside the template (an ARN)."""
    if isinstance(reference, Mapping) and "Fn::If" in reference:
        condition, if_true, if_false = reference["Fn::If"]
        with contextlib.suppress(Unresolvable):
            chosen = if_true if resolve({"Condition": condition}, parameters, conditions) else if_false
            return _layer_dir(chosen, resources, template_dir, parameters, conditions)
    if isinstance(reference, Mapping) and reference.get("Ref") in parameters:
        reference = parameters[reference["Ref"]]
        if reference is None:  # AWS::NoValue
            return None
    if not (isinstance(reference, Mapping) and "Ref" in reference):
        if repr(reference) not in _skipped_layers:
            _skipped_layers.add(repr(reference))
            log.warning("layer %r is not a local layer; it is skipped", reference)
        return None
    layer = resources.get(reference["Ref"]) or {}
    content = (layer.get("Properties") or {}).get("ContentUri")
    if not isinstance(content, str):
        return None
    directory = (template_dir / content).resolve()
    return directory / "python" if (directory / "python").is_dir() else directory


def parse_functions(template: Mapping, template_dir: Path = ROOT,
                    parameters: Mapping[str, Any] | None = None) -> dict[str, FunctionSpec]:
    parameters = parameter_values(template) if parameters is None else parameters
    conditions = template.get("Conditions") or {}
    resources = template.get("Resources") or {}
    defaults = (template.get("Globals") or {}).get("Function") or {}
    functions = {}
    for logical_id, resource in resources.items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = {**defaults, **(resource.get("Properties") or {})}
        layers = [*(defaults.get("Layers") or []), *((resource.get("Properties") or {}).get("Layers") or [])]
        variables = {
            **((defaults.get("Environment") or {}).get("Variables") or {}),
            **(((resource.get("Properties") or {}).get("Environment") or {}).get("Variables") or {}),
        }
        environment = {}
        for name, value in variables.items():
            try:
                resolved = resolve(value, parameters, conditions)
            except Unresolvable:
                continue  # like sam local: a value only AWS knows is left unset
            if resolved is not None:
                environment[name] = str(resolved)
        layer_dirs = [_layer_dir(layer, resources, template_dir, parameters, conditions) for layer in layers]
        functions[logical_id] = FunctionSpec(
            logical_id=logical_id,
            code_dir=(template_dir / str(resolve(props.get("CodeUri", "."), parameters))).resolve(),
            handler=str(props.get("Handler", "app.lambda_handler")),
            layer_dirs=tuple(path for path in layer_dirs if path is not None),
            environment=environment,
            memory_mb=int(_resolved_or(props.get("MemorySize"), parameters, DEFAULT_MEMORY_MB)),
            timeout_s=float(_resolved_or(props.get("Timeout"), parameters, DEFAULT_TIMEOUT_S)),
            reserved_concurrency=_reserved(props.get("ReservedConcurrentExecutions"), parameters, conditions),
        )
    return functions


def _reserved(value: Any, parameters: Mapping[str, Any], conditions: Mapping[str, Any]) -> int | None:
    try:
        value = resolve(value, parameters, conditions)
    except Unresolvable:
        return None
    return None if value is None else int(value)


def _resolved_or(value: Any, parameters: Mapping[str, Any], default: Any) -> Any:
    if value is None:
        return default
    try:
        return resolve(value, parameters)
    except Unresolvable:
        return default


def parse_routes(template: Mapping, parameters: Mapping[str, Any] | None = None) -> list[Route]:
    """Every HttpApi event of every function, most specific first (API Gateway's matching order), each with
    the throttle API Gateway applies to it: the event's RouteSettings merged over the API's RouteSettings for
    its route key (as SAM merges them), else the API's DefaultRouteSettings."""
    parameters = parameter_values(template) if parameters is None else parameters
    conditions = template.get("Conditions") or {}
    resources = template.get("Resources") or {}
    routes = []
    for logical_id, resource in resources.items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        for event in ((resource.get("Properties") or {}).get("Events") or {}).values():
            if event.get("Type") != "HttpApi":
                continue
            props = event.get("Properties") or {}
            method, path = str(props.get("Method", "ANY")).upper(), props.get("Path", "$default")
            api = _http_api(resources, props.get("ApiId"))
            route_key = path if method == "ANY" else f"{method} {path}"
            settings = {**(api.get("DefaultRouteSettings") or {}),
                        **((api.get("RouteSettings") or {}).get(route_key) or {}), **(props.get("RouteSettings") or {})}
            routes.append(Route.create(method, path, logical_id, _throttle(settings, parameters, conditions)))
    return sorted(routes, key=lambda route: route.priority)


def _http_api(resources: Mapping, api_id: Any) -> Mapping:
    """The properties of the AWS::Serverless::HttpApi an event names (`ApiId: !Ref HttpApi`), else SAM's implicit
    API, which has no settings."""
    name = api_id.get("Ref") if isinstance(api_id, Mapping) else None
    resource = resources.get(name) or {}
    return (resource.get("Properties") or {}) if resource.get("Type") == "AWS::Serverless::HttpApi" else {}


def _throttle(settings: Mapping, parameters: Mapping[str, Any], conditions: Mapping[str, Any]) -> Throttle | None:
    try:
        rate = resolve(settings.get("ThrottlingRateLimit"), parameters, conditions)
        burst = resolve(settings.get("ThrottlingBurstLimit"), parameters, conditions)
    except Unresolvable:
        return None
    if rate is None or burst is None:  # only the account's (and AWS's) throttles apply
        return None
    return Throttle(float(rate), int(burst))


def find_route(routes: Iterable[Route], method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route API Gateway sends `path` (decoded: `gateway_path`) to; a trailing slash goes to the route without it
    (the function then answers for a path it has no route for)."""
    for candidate in dict.fromkeys((path, path.rstrip("/") or "/")):
        for route in routes:
            params = route.match(method, candidate)
            if params is not None:
                return route, params
    return None

