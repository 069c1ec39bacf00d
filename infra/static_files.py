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


def file_response(path: Path) -> HttpResponse:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
        content_type += "; charset=utf-8"
    return HttpResponse(200, [("content-type", content_type), ("cache-control", "no-cache")], path.read_bytes())


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
