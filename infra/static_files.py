"""Files from one folder as local-API responses (the docs page, a web page and its vendored assets).

    api.add_local_route("GET", "/docs", static_file(Path("infra/docs.html")))
    api.add_local_route("GET", "/ui/{path+}", static_folder(Path("web")))    # /ui/app.js -> web/app.js
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path

from infra.apigateway import HttpRequest, HttpResponse, error_response

LocalHandler = Callable[[HttpRequest, dict[str, str]], HttpResponse]


# A page runs only its own files and is framed by no other site (the forecast button creates predictions).
# Styles inline: the chart library sets its elements' style attributes.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI's page inlines its bundle and configuration: only framing is refused.
INLINE_PAGE_POLICY = "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def security_headers(content_type: str, policy: str = PAGE_POLICY) -> list[tuple[str, str]]:
    """What every local file answer says besides its content: never sniffed; an HTML page also its policy."""
    headers = [("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")]
    if content_type.startswith("text/html"):
        headers.append(("content-security-policy", policy))
    return headers


def file_response(path: Path) -> HttpResponse:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
        content_type += "; charset=utf-8"
    headers = [("content-type", content_type), ("cache-control", "no-cache"), *security_headers(content_type)]
    return HttpResponse(200, headers, path.read_bytes())


def static_file(path: Path) -> LocalHandler:
    """One file, read on each request (edits show without a restart)."""
    return lambda _request, _params: file_response(path)


def static_folder(folder: Path, index: str = "index.html") -> LocalHandler:
    """The file named by the route's greedy `{path+}` parameter, never outside `folder`."""
    root = folder.resolve()

    def serve(_request: HttpRequest, params: dict[str, str]) -> HttpResponse:
        relative = next(iter(params.values()), "") or index
        target = (root / relative).resolve()
        if target.is_dir():
            target = target / index
        if not target.is_relative_to(root) or not target.is_file():
            return error_response(404, "not_found", f"no file {relative}")
        return file_response(target)

    return serve
