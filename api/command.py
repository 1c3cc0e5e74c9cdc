"""``adevents serve``: the API and dashboard on uvicorn (``cli.demo`` runs the same server)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Final

from pipeline.settings import Settings
from pipeline.signals import stop_on_signals

#: Arrow's allocator in the API processes, unless ARROW_DEFAULT_MEMORY_POOL names another.
#: With mimalloc (pyarrow's default on Linux), about one decode in ten of a clustered hour's
#: 16,384-row group took 30-58 ms instead of 3-4 once the row-group cache had filled; the same
#: reads took at most 3.6 ms with jemalloc (6.5 with the system's). by_campaign p99 inside a
#: clustered hour: 60-79 ms against 160-186 (README, "Arrow's allocator").
ARROW_POOL: Final = "jemalloc"


def prefer_arrow_pool() -> None:
    """Arrow reads ARROW_DEFAULT_MEMORY_POOL once, when pyarrow is first imported: set it
    (unless the operator did) before the API imports pyarrow, here and, through the
    environment, in uvicorn's worker processes. Too late in a process that already imported
    pyarrow (the demo, tests): it keeps the pool it has."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)


def configure_server(parser: argparse.ArgumentParser) -> None:
    """The flags of any command that runs the API server: where it binds, access logging."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def configure_serve(parser: argparse.ArgumentParser) -> None:
    configure_server(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (1); each has its own DuckDB database and caches",
    )


def build_server(args: argparse.Namespace, settings: Settings) -> Any:
    """A uvicorn server (not started) for the API over ``settings``, as ``args`` say."""
    import uvicorn

    prefer_arrow_pool()
    from api.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        lifespan="on",
    )
    return uvicorn.Server(config)


def _serve_workers(args: argparse.Namespace, settings: Settings) -> None:
    """uvicorn's own worker processes, each building ``api.app:app`` from the environment."""
    import uvicorn

    # Flags the CLI read reach the workers through the environment they inherit.
    prefer_arrow_pool()
    os.environ["DATA_DIR"] = settings.data_dir
    if settings.lake_uri:
        os.environ["LAKE_URI"] = settings.lake_uri
    os.environ["LOG_LEVEL"] = settings.log_level
    uvicorn.run(
        "api.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        lifespan="on",
    )


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the API until SIGINT/SIGTERM."""
    # uvicorn shuts down gracefully on the signal, then re-raises it into the handlers it found:
    # ours, so a stop is a clean exit rather than a KeyboardInterrupt or a death by SIGTERM.
    with stop_on_signals(what="stopping the server"):
        try:
            if getattr(args, "workers", 1) > 1:
                _serve_workers(args, settings)
            else:
                build_server(args, settings).run()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            return int(exc.code or 1)
    return 0
