"""The dashboard's static files: plotly.js from the installed ``plotly`` wheel, and our own.

plotly.js is never copied into this repository: the ``plotly`` distribution (a normal
dependency, locked with its hashes) ships it as ``plotly/package_data/plotly.min.js``. Only that
file is read; the Python package itself is never imported (it would cost the API ~1 s of start
and memory for nothing). Our own files are ``api/static/``. Every URL carries the file's
version (the distribution's, or a hash of our file), so browsers keep them for a year and the
5 s refresh never downloads them again. A client that accepts gzip gets it (plotly.min.js:
4.8 MB, 1.7 MB gzipped), compressed once per process at level 1: 50 ms for the first visitor
where level 6 takes 290 ms to save 0.2 MB.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Annotated, Any, Final

from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import PathParameter

ASSET_PATH: Final = "/dashboard/assets"
PLOTLY: Final = "plotly.min.js"
STATIC: Final = Path(__file__).with_name("static")
#: Every file served, with its media type; nothing else is.
MEDIA_TYPES: Final = {
    PLOTLY: "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
CACHE_CONTROL: Final = "public, max-age=31536000, immutable"


@functools.cache
def plotly_path() -> Path | None:
    """plotly.min.js of the installed plotly distribution, or None when it is not installed."""
    spec = importlib.util.find_spec("plotly")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / PLOTLY
    return path if path.is_file() else None


def _path(name: str) -> Path:
    if name not in MEDIA_TYPES:
        raise NotFoundException(f"no dashboard asset named {name!r}")
    if name != PLOTLY:
        return STATIC / name
    path = plotly_path()
    if path is None:
        raise NotFoundException("plotly.js is not installed: pip install 'plotly>=6,<8'")
    return path


@functools.cache
def read(name: str) -> bytes:
    return _path(name).read_bytes()


@functools.cache
def read_gzip(name: str) -> bytes:
    return gzip.compress(read(name), compresslevel=1, mtime=0)


def text(name: str) -> str:
    """An asset of ours as text (the stylesheet is inlined: one request less before paint)."""
    return read(name).decode()


@functools.cache
def version(name: str) -> str:
    if name == PLOTLY:
        try:
            return importlib.metadata.version("plotly")
        except importlib.metadata.PackageNotFoundError:
            return "missing"
    try:
        return hashlib.sha256(read(name)).hexdigest()[:12]
    except OSError:
        return "missing"


def url(name: str) -> str:
    return f"{ASSET_PATH}/{name}?v={version(name)}"


@get(f"{ASSET_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=True)
def dashboard_asset(
    request: Request[Any, Any, Any], name: Annotated[str, PathParameter(max_length=64)]
) -> Response[bytes]:
    """One of the dashboard's files, gzipped when the client accepts it."""
    media_type = MEDIA_TYPES.get(name)
    if media_type is None:
        raise NotFoundException(f"no dashboard asset named {name!r}")
    headers = {"Cache-Control": CACHE_CONTROL, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(read_gzip(name), media_type=media_type, headers=headers)
    return Response(read(name), media_type=media_type, headers=headers)
