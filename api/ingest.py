"""``POST /ad_events``: HTTP ingest for ad servers and SDKs, answered 202 once the rows are durable
(in the spool, or with INGEST_SINK=kafka acknowledged by the Kafka brokers).

Install with ``Litestar(..., plugins=[IngestPlugin(settings)])``: the plugin adds the route, the
API-key guard the read routes honour (``API_KEYS_REQUIRED_FOR_READ``) and the group committer's
start/stop hooks.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
import polars as pl
import pyarrow as pa
from litestar import Request, Response, Router, post
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.plugins import InitPlugin
from litestar.types import Message, Scope
from msgspec import Struct

from api.disk import DiskSpace
from api.errors import EXCEPTION_HANDLERS, add_request_id, error_response, request_id
from api.ingest_encoding import (
    ACCEPT_ENCODING,
    GZIP,
    IDENTITY,
    ZSTD,
    InflatedTooLargeError,
    Limits,
    UnsupportedEncodingError,
    content_encoding,
    decompress,
)
from api.ingest_kafka import KafkaBatchWriter
from api.ingest_metrics import IngestMetrics, metrics_dir
from api.ingest_spool import (
    Backlog,
    CommitterClosedError,
    GroupCommitter,
    SpoolBatchWriter,
    Written,
)
from pipeline.decode import (
    ARROW_FILE,
    ARROW_STREAM,
    JSON,
    NDJSON,
    BodyError,
    Checked,
    TooManyEventsError,
    UnsupportedMediaTypeError,
    check,
    decode,
    media_type,
)
from pipeline.kafka import KafkaUnavailableError
from pipeline.schema import DEVICE_TYPES, EVENT_TYPES, MONEY_COLUMNS, TIME_COLUMN, Layout
from pipeline.settings import IngestSettings, Settings, SettingsError

log = logging.getLogger("adevents.ingest")

#: Bodies at least this large are decoded on a worker thread, so a huge one does not stall the
#: event loop (and the read routes) for long. Smaller ones are decoded inline: measured with
#: bench/ingest_load.py, the hand-off bought no throughput on 2 cores and cost 20-40 % more CPU
#: (JSON bodies of 1k events, ~3 ms each inline; Arrow bodies of 10k, ~3 ms).
THREAD_DECODE_BYTES: Final = 2 * 1024**2
#: How much a compressed body is assumed to expand when choosing where to decode it (events
#: compress about 5-10 times in gzip and zstd).
EXPECTED_EXPANSION: Final = 8
#: Seconds a client is asked to wait after a 429 or 503.
RETRY_AFTER_SECONDS: Final = 1
#: Paths that stay open even with API_KEYS_REQUIRED_FOR_READ (load balancers probe them).
OPEN_PATHS: Final = frozenset({"/health"})
#: ``opt`` key marking handlers that always need an API key.
NEEDS_KEY: Final = "api_key_required"
#: ``opt`` key marking the ingest route, whose answers the ingest metrics count.
INGEST_ROUTE: Final = "adevents_ingest"
API_KEY_SCHEME: Final = "apiKey"


# -- response models -----------------------------------------------------------------------------
class RejectedRow(Struct):
    """A row that failed a rule; it is in the spool on its way to quarantine, with this reason."""

    index: int
    reason: str


class IngestResult(Struct):
    """Rows received, rows accepted for processing (durable), and each rejection."""

    received: int
    accepted: int
    rejected: list[RejectedRow]


class ErrorBody(Struct):
    """Every error's body (see ``api/errors.py``)."""

    status_code: int
    detail: str
    #: Also in the X-Request-ID header; quote it to the operator, who finds it in the log.
    request_id: str


# -- API keys ------------------------------------------------------------------------------------
class ApiKeys:
    """The API-key check: a guard for POST /ad_events and, optionally, the read routes."""

    def __init__(self, keys: Sequence[str], *, required_for_read: bool = False) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self.required_for_read = required_for_read

    @staticmethod
    def presented(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
        """The key a request carries in X-API-Key or ``Authorization: Bearer <key>``."""
        key = connection.headers.get("x-api-key")
        if key is None:
            scheme, _, value = (connection.headers.get("authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        return None if key is None else key.encode("latin-1", "replace")

    def _matches(self, key: bytes) -> bool:
        # Compare with every key, so the time taken does not say which prefix matched.
        matched = False
        for k in self._keys:
            matched |= hmac.compare_digest(key, k)
        return matched

    def valid(self, connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
        """Whether the request carries one of the keys (never raises)."""
        key = self.presented(connection)
        return key is not None and self._matches(key)

    def check(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """Raise 401 unless the request carries one of the keys."""
        key = self.presented(connection)
        challenge = {"WWW-Authenticate": 'Bearer realm="adevents"'}
        if key is None:
            raise NotAuthorizedException(
                "an API key is required: send it as X-API-Key: <key> or "
                "Authorization: Bearer <key>",
                headers=challenge,
            )
        if not self._matches(key):
            raise NotAuthorizedException("the API key is not valid", headers=challenge)

    def ingest_guard(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        self.check(connection)

    def read_guard(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        """Every other route: open unless API_KEYS_REQUIRED_FOR_READ (but /health stays open)."""
        if handler.opt.get(NEEDS_KEY) or not self.required_for_read:
            return
        if connection.scope["path"] in OPEN_PATHS:
            return
        self.check(connection)


class BacklogFullError(RuntimeError):
    """The spool's backlog is at MAX_BACKLOG_EVENTS (429)."""


# -- the service -----------------------------------------------------------------------------------
class Ingestor:
    """Decode, check, and commit one body; knows nothing of HTTP."""

    def __init__(self, settings: Settings, ingest: IngestSettings) -> None:
        self.settings = settings
        self.ingest = ingest
        self.layout = Layout(settings.data_dir)
        # Unique per process (and per start), so two servers on one DATA_DIR never collide.
        self.producer = f"http{os.getpid()}{secrets.token_hex(2)}"
        self.backlog = Backlog(self.layout.incoming)
        self.disk = DiskSpace(self.layout.root, settings.disk_min_free)
        self.limits = Limits(ingest.ingest_max_body_bytes, ingest.ingest_max_compression_ratio)
        self.metrics = IngestMetrics(metrics_dir(self.layout))
        self.committer = GroupCommitter(
            self._write,
            max_rows=ingest.ingest_batch_events,
            interval=settings.batch_interval,
            on_written=self._written,
        )
        #: With INGEST_SINK=kafka the micro-batches go to the topic: no spool, no backlog.
        self.spooling = ingest.ingest_sink == "spool"
        self._writer: SpoolBatchWriter | KafkaBatchWriter | None = None
        if not self.spooling:
            if not settings.kafka.kafka_bootstrap_servers:
                raise SettingsError("INGEST_SINK=kafka needs KAFKA_BOOTSTRAP_SERVERS")
            # Its producer is made on first use, in the worker process serving the requests.
            self._writer = KafkaBatchWriter(settings.kafka)

    def _write(
        self, accepted: list[pa.Table], rejected: list[pl.DataFrame], arrived_ms: int
    ) -> Written:
        # Made on first use, so an API over a read-only DATA_DIR starts (and only ingest fails).
        if self._writer is None:
            self._writer = SpoolBatchWriter(self.layout, self.producer)
        return self._writer.write(accepted, rejected, arrived_ms)

    def _written(self, written: Written) -> None:
        # Rejected rows wait in incoming/ for the consumer too, so they count like accepted ones.
        if written.spool_file is not None:
            self.backlog.add(written.spool_file, written.spooled_rows)
        if written.rejected_file is not None:
            self.backlog.add(written.rejected_file, written.quarantined_rows)

    async def start(self) -> None:
        self.metrics.open()
        self.committer.start()

    async def close(self) -> None:
        await self.committer.close()
        if isinstance(self._writer, KafkaBatchWriter):
            self._writer.close()
        self.metrics.close()

    def backlog_events(self) -> int:
        """Events in incoming/ plus those taken and not yet written (with INGEST_SINK=kafka,
        only the latter: the topic's backlog is the brokers' to hold)."""
        waiting = self.backlog.events() if self.spooling else 0
        return waiting + self.committer.pending_rows

    def over_backlog(self) -> bool:
        return self.spooling and self.backlog_events() >= self.ingest.max_backlog_events

    def disk_low(self) -> bool:
        """DATA_DIR's disk is below DISK_MIN_FREE and the spool would fill it (never in Kafka
        mode: the events do not touch the disk)."""
        return self.spooling and self.disk.low()

    def _decode_and_check(self, body: bytes, media: str, encoding: str) -> Checked:
        table = decode(
            decompress(body, encoding, self.limits),
            media,
            max_depth=self.ingest.ingest_max_json_depth,
            max_events=self.ingest.ingest_max_events_per_request,
        )
        return check(table, now_ms=int(time.time() * 1000))

    async def take(self, body: bytes, media: str, encoding: str = IDENTITY) -> IngestResult:
        """Decompress and validate the body's rows; return once the accepted (and rejected)
        rows are durable, counted in the ingest metrics."""
        arrived_ms = int(time.time() * 1000)
        expected = len(body) * (1 if encoding == IDENTITY else EXPECTED_EXPANSION)
        if expected >= THREAD_DECODE_BYTES:
            checked = await anyio.to_thread.run_sync(self._decode_and_check, body, media, encoding)
        else:
            checked = self._decode_and_check(body, media, encoding)
        # Checked again now that the rows are known: between here and the committer counting
        # them there is no await, so concurrent requests each see the ones before them, and the
        # backlog ends at most one request's events over MAX_BACKLOG_EVENTS (per process).
        if self.over_backlog():
            raise BacklogFullError
        if checked.received:
            await self.committer.commit(checked.accepted, checked.rejected, arrived_ms)
        self.metrics.events(checked.accepted.num_rows, (r for _, r in checked.rejections))
        return IngestResult(
            received=checked.received,
            accepted=checked.accepted.num_rows,
            rejected=[RejectedRow(i, r) for i, r in checked.rejections],
        )


# -- the route -----------------------------------------------------------------------------------
def _request_body_schema() -> RequestBody:
    text = Schema(type=OpenAPIType.STRING)
    props: dict[str, Schema | Reference] = {
        "event_id": Schema(type=OpenAPIType.STRING, description="1..128 bytes of UTF-8"),
        "event_type": Schema(type=OpenAPIType.STRING, enum=list(EVENT_TYPES)),
        TIME_COLUMN: Schema(
            one_of=[
                Schema(type=OpenAPIType.INTEGER, description="epoch milliseconds"),
                Schema(type=OpenAPIType.STRING, description="RFC 3339 date-time"),
            ]
        ),
        "campaign_id": text,
        "ad_id": text,
        "publisher_id": text,
        "user_id": text,
        "device_type": Schema(type=OpenAPIType.STRING, enum=list(DEVICE_TYPES)),
        "country": Schema(type=OpenAPIType.STRING, description="ISO 3166-1 alpha-2, upper case"),
        **{
            m: Schema(type=OpenAPIType.INTEGER, description="USD micros, >= 0")
            for m in MONEY_COLUMNS
        },
    }
    event = Schema(type=OpenAPIType.OBJECT, properties=props)
    binary = Schema(type=OpenAPIType.STRING, description="Arrow IPC stream bytes")
    file = Schema(type=OpenAPIType.STRING, description="Arrow IPC file bytes")
    return RequestBody(
        required=True,
        description="Events in the contract's columns: a JSON array, NDJSON (one object per "
        "line), an Arrow IPC stream or an Arrow IPC file. Money is integer USD micros. JSON may "
        "nest at most INGEST_MAX_JSON_DEPTH levels (an event object is level 1); a request may "
        "carry at most INGEST_MAX_EVENTS_PER_REQUEST events. Any of them may be compressed "
        "with Content-Encoding: gzip or zstd; INGEST_MAX_BODY_BYTES then limits the "
        "decompressed size, and INGEST_MAX_COMPRESSION_RATIO how much it may expand.",
        content={
            JSON: OpenAPIMediaType(schema=Schema(type=OpenAPIType.ARRAY, items=event)),
            NDJSON: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
            ARROW_STREAM: OpenAPIMediaType(schema=binary),
            ARROW_FILE: OpenAPIMediaType(schema=file),
        },
    )


@dataclass
class _IngestOperation(Operation):
    """The operation of POST /ad_events, with the request body and the Content-Encoding header
    Litestar cannot infer (the handler reads both itself)."""

    def __post_init__(self) -> None:
        self.request_body = _request_body_schema()
        encoding = Parameter(
            name="Content-Encoding",
            param_in="header",
            schema=Schema(type=OpenAPIType.STRING, enum=[GZIP, ZSTD, IDENTITY]),
            description="the body's compression, if any (x-gzip is taken as gzip)",
        )
        self.parameters = [*(self.parameters or []), encoding]


def _too_large(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    limit = request.route_handler.resolve_request_max_body_size()
    return error_response(
        request,
        413,
        f"the body is larger than {limit} bytes (INGEST_MAX_BODY_BYTES): send fewer events "
        "per request",
    )


def _backlog_full(ingestor: Ingestor) -> TooManyRequestsException:
    return TooManyRequestsException(
        f"the spool holds more than {ingestor.ingest.max_backlog_events} events "
        "(MAX_BACKLOG_EVENTS) waiting for the consumer: retry later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _not_stored(request: Request[Any, Any, Any], exc: Exception) -> ServiceUnavailableException:
    """503 for a write that failed: the client hears what to do, the log hears why."""
    log.error(
        "request %s: POST /ad_events: the events were not stored: %r",
        request_id(request.scope),
        exc,
    )
    if isinstance(exc, KafkaUnavailableError):
        # Some of its messages may have landed: a retry is deduplicated, so it is safe.
        return ServiceUnavailableException(
            "the events were not confirmed stored (the event stream did not acknowledge them "
            "in time): send the request again later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, CommitterClosedError):
        why = "the server is shutting down"
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "DATA_DIR's disk is full"
    else:
        why = "the spool could not be written"
    return ServiceUnavailableException(
        f"the events were not stored ({why}): nothing of this request was kept, send it again "
        "later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


_ERRORS: Final = {
    400: ResponseSpec(
        ErrorBody,
        description="the body cannot be read as events (not JSON/NDJSON/Arrow, JSON nested "
        "deeper than INGEST_MAX_JSON_DEPTH, or a gzip/zstd body that is damaged or truncated)",
    ),
    401: ResponseSpec(ErrorBody, description="missing or invalid API key"),
    413: ResponseSpec(
        ErrorBody,
        description="the body is larger than INGEST_MAX_BODY_BYTES (decompressed, when it is "
        "gzip or zstd), expands more than INGEST_MAX_COMPRESSION_RATIO times, or holds more "
        "than INGEST_MAX_EVENTS_PER_REQUEST events",
    ),
    415: ResponseSpec(
        ErrorBody,
        description="unsupported Content-Type, or a Content-Encoding other than gzip, zstd or "
        "identity (the Accept-Encoding header lists them)",
    ),
    429: ResponseSpec(ErrorBody, description="the spool's backlog is full; see Retry-After"),
    503: ResponseSpec(
        ErrorBody,
        description="the events cannot be stored right now (disk below DISK_MIN_FREE, disk "
        "full, shutting down; with INGEST_SINK=kafka, the brokers did not acknowledge them in "
        "time); see Retry-After",
    ),
}


@post(
    "/ad_events",
    status_code=202,
    opt={NEEDS_KEY: True, INGEST_ROUTE: True},
    operation_class=_IngestOperation,
    summary="Ingest ad events",
    responses=_ERRORS,
    security=[{API_KEY_SCHEME: []}],
)
async def post_ad_events(
    request: Request[Any, Any, Any], ingestor: NamedDependency[Ingestor]
) -> Response[IngestResult]:
    """Take ad events; 202 once every row is durable in the spool or, with INGEST_SINK=kafka,
    acknowledged by the brokers (every rejected row with its reason, for the consumer to
    quarantine)."""
    started = time.perf_counter()
    try:
        media = media_type(request.headers.get("content-type"))
    except UnsupportedMediaTypeError as exc:
        raise HTTPException(status_code=415, detail=str(exc)) from None
    try:
        encoding = content_encoding(request.headers.get("content-encoding"))
    except UnsupportedEncodingError as exc:
        raise HTTPException(
            status_code=415, detail=str(exc), headers={"Accept-Encoding": ACCEPT_ENCODING}
        ) from None
    if ingestor.disk_low():
        # Refuse before the disk fills: a full disk would fail this write and the consumer's.
        raise ServiceUnavailableException(
            f"DATA_DIR's disk has less free space than DISK_MIN_FREE "
            f"({ingestor.settings.disk_min_free} bytes): retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if ingestor.over_backlog():  # before reading the body: the cheap refusal
        raise _backlog_full(ingestor)
    body = await request.body()
    try:
        result = await ingestor.take(body, media, encoding)
    except BacklogFullError:
        raise _backlog_full(ingestor) from None
    except (TooManyEventsError, InflatedTooLargeError) as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    except BodyError as exc:
        raise ClientException(str(exc)) from None
    except (CommitterClosedError, OSError) as exc:
        raise _not_stored(request, exc) from None
    ingestor.metrics.acknowledged(time.perf_counter() - started)
    return Response(result, status_code=202)


class IngestPlugin(InitPlugin):
    """Adds POST /ad_events, the API-key guards, the committer's lifecycle and the count of
    the route's answers to an app."""

    def __init__(self, settings: Settings, ingest: IngestSettings | None = None) -> None:
        self.settings = settings
        self.ingest = ingest or settings.ingest
        self.keys = ApiKeys(
            self.ingest.ingest_api_keys, required_for_read=self.ingest.api_keys_required_for_read
        )
        self.ingestor = Ingestor(settings, self.ingest)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        ingestor = self.ingestor
        router = Router(
            "/",
            route_handlers=[post_ad_events],
            dependencies={"ingestor": Provide(lambda: ingestor, sync_to_thread=False)},
            guards=[self.keys.ingest_guard],
            request_max_body_size=self.ingest.ingest_max_body_bytes,
            exception_handlers={RequestEntityTooLarge: _too_large},
        )
        app_config.route_handlers.append(router)
        # The ingest's errors carry request ids however the app was built.
        app_config.exception_handlers = {**EXCEPTION_HANDLERS, **app_config.exception_handlers}
        if add_request_id not in app_config.before_send:
            app_config.before_send.append(add_request_id)
        app_config.before_send.append(self._count_answer)
        keys = self.keys
        app_config.dependencies["api_keys"] = Provide(lambda: keys, sync_to_thread=False)
        app_config.guards.append(self.keys.read_guard)
        app_config.on_startup.append(ingestor.start)
        app_config.on_shutdown.append(ingestor.close)
        openapi = app_config.openapi_config
        if openapi is not None and isinstance(openapi.components, Components):
            schemes = dict(openapi.components.security_schemes or {})
            schemes[API_KEY_SCHEME] = SecurityScheme(
                type="apiKey", name="X-API-Key", security_scheme_in="header"
            )
            openapi.components.security_schemes = schemes
        return app_config

    async def _count_answer(self, message: Message, scope: Scope) -> None:
        """``before_send`` hook: every answer of POST /ad_events by status, whoever made it (the
        handler, a guard's 401, the body limit's 413, an exception handler's 500)."""
        if message["type"] != "http.response.start":
            return
        handler = scope.get("route_handler")
        if handler is not None and handler.opt.get(INGEST_ROUTE):
            self.ingestor.metrics.request(message["status"])


__all__ = ["IngestPlugin", "IngestResult", "IngestSettings", "Ingestor", "RejectedRow"]
