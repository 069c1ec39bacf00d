"""/docs: Powertools' own Swagger UI over the whole API's OpenAPI document, offline.

The page is what `enable_swagger()` serves, built by the same Powertools function with the Swagger UI
bundle and stylesheet that ship inside the aws-lambda-powertools package (inlined, so no CDN is needed).
`enable_swagger()` itself is per resolver: each function would document only its own routes, and the
deployed API would carry a 1.4 MB page in every function. The local API documents all of them at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from infra.apigateway import HttpResponse
from infra.static_files import INLINE_PAGE_POLICY, LocalHandler, security_headers


def swagger_ui(document: Callable[[], dict]) -> LocalHandler:
    """A handler answering the Swagger UI page for `document()` (the merged OpenAPI document)."""
    from aws_lambda_powertools.event_handler.openapi import swagger_ui as package
    from aws_lambda_powertools.event_handler.openapi.swagger_ui import generate_swagger_html

    assets = Path(package.__file__).parent
    page: dict[str, bytes] = {}

    def serve(_request, _params) -> HttpResponse:
        if "html" not in page:
            spec = json.dumps(document()).replace("</", "<\\/")  # as enable_swagger escapes it
            page["html"] = generate_swagger_html(
                spec,
                (assets / "swagger-ui-bundle.min.js").read_text(encoding="utf-8"),
                (assets / "swagger-ui.min.css").read_text(encoding="utf-8"),
                swagger_base_url="",
                oauth2_config=None,
            ).encode()
        content_type = "text/html; charset=utf-8"
        return HttpResponse(200, [("content-type", content_type), *security_headers(content_type, INLINE_PAGE_POLICY)],
                            page["html"])

    return serve
