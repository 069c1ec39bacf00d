"""The committed OpenAPI document is generated from the resolvers and covers exactly the template's routes."""

import json
import os

import pytest

from infra import openapi
from infra.sam_template import load_template, parse_routes

pytestmark = pytest.mark.template

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def importable(monkeypatch):
    from candlecast.config import get_settings

    for name, value in openapi.STAND_IN_ENVIRONMENT.items():
        if not os.environ.get(name):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_committed_document_is_current(importable):
    committed = openapi.DOCUMENT.read_text()
    assert committed == openapi.render(openapi.build_openapi()), "run `make openapi`"


def test_document_operations_are_the_template_routes():
    document = json.loads(openapi.DOCUMENT.read_text())
    operations = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    routes = {(route.method, route.path) for route in parse_routes(load_template())}
    assert operations == routes
    assert document["openapi"].startswith("3.")
    assert "1m" in document["info"]["description"]  # the calendar-month timeframe is documented


def test_conflicting_definitions_are_refused():
    target = {"Candle": {"type": "object"}}
    with pytest.raises(openapi.OpenApiConflict):
        openapi._merge_into(target, {"Candle": {"type": "array"}}, "schema")
    openapi._merge_into(target, {"Candle": {"type": "object"}}, "schema")  # the same definition is fine
