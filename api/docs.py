"""The API docs page (``/docs``): Swagger UI served by this server, so it works with no internet.

Litestar's Swagger plugin loads Swagger UI from a CDN by default. Here its files come from the
``swagger-ui-py`` distribution (Swagger UI 5, which renders the OpenAPI 3.1 that Litestar writes;
``swagger-ui-bundle`` ships Swagger UI 4, which cannot). Only its ``swagger_ui/static`` files are
read: the package itself, which needs Jinja, is never imported. The few files the page needs are
served under ``/docs/assets/``, their URLs carrying the distribution's version so browsers may
cache them for a long time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Annotated, Final

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import PathParameter

DISTRIBUTION: Final = "swagger-ui-py"
ASSET_PATH: Final = "/docs/assets"
#: The files the docs page loads, with their media types; nothing else is served.
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
CACHE_CONTROL: Final = "public, max-age=31536000, immutable"


@functools.cache
def assets_dir() -> Path | None:
    """Where the installed Swagger UI files are, or None when swagger-ui-py is not installed."""
    spec = importlib.util.find_spec("swagger_ui")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "static"
    return directory if (directory / "swagger-ui-bundle.js").is_file() else None


@functools.cache
def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def asset_url(name: str) -> str:
    return f"{ASSET_PATH}/{name}?v={version()}"


def swagger_plugin(path: str = "/") -> SwaggerRenderPlugin:
    """Litestar's Swagger UI page, with every URL it loads pointing at this server."""
    return SwaggerRenderPlugin(
        path=path,
        js_url=asset_url("swagger-ui-bundle.js"),
        css_url=asset_url("swagger-ui.css"),
        standalone_preset_js_url=asset_url("swagger-ui-standalone-preset.js"),
        favicon=f'<link rel="icon" type="image/png" href="{asset_url("favicon-32x32.png")}">',
    )


@functools.cache
def _read(name: str) -> bytes:
    directory = assets_dir()
    if directory is None:
        raise NotFoundException(
            f"Swagger UI's files are not installed: pip install '{DISTRIBUTION}>=25.7,<26'"
        )
    return (directory / name).read_bytes()


@get(f"{ASSET_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def docs_asset(name: Annotated[str, PathParameter(max_length=64)]) -> Response[bytes]:
    """One of Swagger UI's files."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundException(f"no docs asset named {name!r}")
    return Response(_read(name), media_type=media_type, headers={"Cache-Control": CACHE_CONTROL})
