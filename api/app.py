"""The Litestar application: ``litestar --app api.app:app run`` or ``create_app(settings)``.

``app`` is built on first access (PEP 562), so importing this module reads no settings.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from api.docs import swagger_plugin
from api.errors import EXCEPTION_HANDLERS, add_request_id
from api.health import HealthChecker
from api.ingest import IngestPlugin
from api.metrics import Metrics, RequestLatency
from api.routes import ROUTES
from pipeline.settings import Settings
from queries.lake import Lake


def create_app(settings: Settings | None = None) -> Litestar:
    """The API over the lake at LAKE_URI and DATA_DIR (default: Settings.from_env())."""
    settings = settings or Settings.from_env()
    lake = Lake.from_settings(settings)
    checker = HealthChecker(settings, lake)
    metrics = Metrics(settings, lake)

    def close() -> None:
        checker.close()
        lake.close()

    return Litestar(
        route_handlers=ROUTES,
        dependencies={
            "lake": Provide(lambda: lake, sync_to_thread=False, use_cache=True),
            "checker": Provide(lambda: checker, sync_to_thread=False, use_cache=True),
            "metrics": Provide(lambda: metrics, sync_to_thread=False, use_cache=True),
        },
        middleware=[RequestLatency(metrics.requests)],
        # Every error body carries the request id and nothing internal (api/errors.py).
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[add_request_id],
        openapi_config=OpenAPIConfig(
            title="adevents",
            version="0.1.0",
            description="Ad events of the exactly-once pipeline: latest events, campaign "
            "performance, leaderboards, alerts, health and metrics. Money is in USD.",
            path="/docs",
            render_plugins=[swagger_plugin(), JsonRenderPlugin(path="/openapi.json")],
        ),
        on_shutdown=[close],
        state=State({"settings": settings}),
        plugins=[IngestPlugin(settings)],
    )


_built: dict[str, Litestar] = {}


def __getattr__(name: str) -> Any:
    if name == "app":
        if "app" not in _built:
            _built["app"] = create_app()
        return _built["app"]
    raise AttributeError(name)
