"""Request ids and error bodies: what a client is told when something fails, and what is logged.

Every response carries ``X-Request-ID``: the client's own when it is a sane token (so a caller's
trace id follows the request), else a fresh one. Every error body is ``{status_code, detail,
request_id}``. ``detail`` is a message the client can act on and never holds paths, SQL, hosts
or exception text: those go to the log, on a line with the same request id, so an operator can
find what a client reports.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Final

import duckdb
from deltalake.exceptions import DeltaError
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap, Message, Scope

log = logging.getLogger("adevents.api")

HEADER: Final = "X-Request-ID"
_HEADER_KEY: Final = HEADER.lower().encode()
_STATE_KEY: Final = "adevents_request_id"
#: A client's id is echoed only if it is a plain token (a UUID, a W3C trace id, ...): anything
#: else could smuggle text into logs or headers.
_SANE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: Seconds a client is asked to wait after a 503 from a read.
RETRY_AFTER_SECONDS: Final = 1


def request_id(scope: Scope) -> str:
    """This request's id: the client's X-Request-ID if sane, else a new one; fixed once read."""
    state: dict[str, Any] = scope.setdefault("state", {})
    known = state.get(_STATE_KEY)
    if isinstance(known, str):
        return known
    rid = None
    for name, value in scope.get("headers", ()):
        if name == _HEADER_KEY:
            text = value.decode("latin-1")
            rid = text if _SANE.fullmatch(text) else None
            break
    rid = rid or uuid.uuid4().hex
    state[_STATE_KEY] = rid
    return rid


async def add_request_id(message: Message, scope: Scope) -> None:
    """``before_send`` hook: the id goes on every HTTP response, errors and 404s included."""
    if message["type"] != "http.response.start":
        return
    headers = list(message.get("headers", ()))
    if not any(name.lower() == _HEADER_KEY for name, _ in headers):
        headers.append((_HEADER_KEY, request_id(scope).encode()))
        message["headers"] = headers


def error_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: Any = None,
) -> Response[dict[str, Any]]:
    """The one error body: status, an actionable message, the request id (and ``extra`` for
    a parameter's validation errors)."""
    body: dict[str, Any] = {
        "status_code": status,
        "detail": detail,
        "request_id": request_id(request.scope),
    }
    if extra:
        body["extra"] = extra
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Errors the API raises on purpose (400, 401, 404, 413, 429, ...): their message is ours,
    written for the client. A 5xx among them is logged."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 500:  # the framework's own internal errors: their text is internal
        return _internal_error(request, exc)
    if exc.status_code >= 500:
        log.warning(
            "request %s: %s %s answered %d: %s",
            request_id(request.scope),
            request.method,
            request.url.path,
            exc.status_code,
            exc.detail,
        )
    return error_response(
        request, exc.status_code, exc.detail, headers=exc.headers, extra=exc.extra
    )


def _lake_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """The lake could not be read (storage unreachable, a file damaged or gone): 503, not 500.
    The exception (paths, SQL, the lake's URI) is logged, not returned."""
    rid = request_id(request.scope)
    log.warning(
        "request %s: %s %s: the lake could not be read: %r",
        rid,
        request.method,
        request.url.path,
        exc,
    )
    return error_response(
        request,
        503,
        "the lake could not be read right now (its storage did not answer, or a file is damaged): "
        f"retry shortly; if it persists, give the operator request id {rid}",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Anything unexpected: the traceback goes to the log with the request id; the client gets
    the id alone."""
    rid = request_id(request.scope)
    log.error("request %s: %s %s failed", rid, request.method, request.url.path, exc_info=exc)
    return error_response(
        request,
        500,
        f"internal error: the request was not completed; give the operator request id {rid}",
    )


EXCEPTION_HANDLERS: Final[ExceptionHandlersMap] = {
    HTTPException: _http_error,
    DeltaError: _lake_unavailable,
    duckdb.Error: _lake_unavailable,
    Exception: _internal_error,
}

__all__ = ["EXCEPTION_HANDLERS", "HEADER", "add_request_id", "error_response", "request_id"]
