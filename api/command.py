"""``adevents serve``: the API; ``adevents demo``: generator, consumer, jobs and API together."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Final

from pipeline.settings import Settings

#: Subcommands ``demo`` starts as children, when the CLI has them. Another issue adds
#: ``jobs`` (the scheduled rollups/alerts); the demo picks it up with no change here.
CHILDREN: Final = ("generate", "consume")
OPTIONAL_CHILDREN: Final = ("scheduler",)
STOP_TIMEOUT: Final = 15.0


def _configure_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def configure_serve(parser: argparse.ArgumentParser) -> None:
    _configure_server(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (1); each has its own DuckDB database and caches",
    )


def configure_demo(parser: argparse.ArgumentParser) -> None:
    _configure_server(parser)
    parser.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds"
    )


def _server(args: argparse.Namespace, settings: Settings) -> Any:
    import uvicorn

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
    import os

    import uvicorn

    # Flags the CLI read reach the workers through the environment they inherit.
    os.environ["DATA_DIR"] = settings.data_dir
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
    try:
        if getattr(args, "workers", 1) > 1:
            _serve_workers(args, settings)
        else:
            _server(args, settings).run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        return int(exc.code or 1)
    return 0


def _available_commands() -> set[str]:
    from pipeline.cli import COMMANDS

    return set(COMMANDS)


def _spawn(command: str, settings: Settings) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pipeline.cli", command, "--data-dir", settings.data_dir]
    return subprocess.Popen(argv)


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> int:
    """SIGTERM every child, wait for each (SIGKILL after STOP_TIMEOUT); worst exit code."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    worst = 0
    deadline = time.monotonic() + STOP_TIMEOUT
    for name, proc in children.items():
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"adevents demo: {name} did not stop in time; killing it", file=sys.stderr)
            proc.kill()
            code = proc.wait()
        # Stopped by our SIGTERM (or the terminal's SIGINT) counts as a clean stop.
        if code not in (0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT):
            worst = worst or code
    return worst


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Generator, consumer (and jobs) as subprocesses plus the API in this process."""
    stop = threading.Event()
    failed: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    # uvicorn restores these after its own shutdown and re-raises the signal into them.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    from pipeline.schema import Layout

    Layout(settings.data_dir).ensure()
    server = _server(args, settings)
    wanted = list(CHILDREN) + [c for c in OPTIONAL_CHILDREN if c in _available_commands()]
    children = {name: _spawn(name, settings) for name in wanted}
    started = time.monotonic()

    def watch() -> None:
        announced = False
        while not stop.is_set():
            if server.started and not announced:
                announced = True
                print(
                    f"adevents demo: dashboard at http://{args.host}:{args.port}/ "
                    f"(API docs at /docs, metrics at /metrics); data in {settings.data_dir}. "
                    "Ctrl-C stops everything.",
                    flush=True,
                )
            for name, proc in list(children.items()):
                if proc.poll() is None:
                    continue
                # Ctrl-C reaches the children too (uvicorn owns the signal here): a child that
                # stops cleanly, or a generator that wrote all its events, is not a failure.
                if proc.returncode not in (0, -signal.SIGINT, -signal.SIGTERM):
                    failed.append(f"{name} exited with code {proc.returncode}")
                    stop.set()
            if args.duration is not None and time.monotonic() - started >= args.duration:
                stop.set()
            stop.wait(0.2)
        server.should_exit = True

    watcher = threading.Thread(target=watch, name="demo-watch", daemon=True)
    watcher.start()
    code = 0
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind the port
        code = int(exc.code or 1)
    finally:
        stop.set()
        watcher.join(timeout=5)
        child_code = _stop_children(children)
    for reason in failed:
        print(f"adevents demo: {reason}", file=sys.stderr)
    print("adevents demo: stopped", flush=True)
    return code or (1 if failed else 0) or child_code


def configure(parser: argparse.ArgumentParser) -> None:
    """Configure ``adevents serve`` or ``adevents demo``, whichever ``parser`` is for."""
    if parser.prog.split()[-1] == "demo":
        configure_demo(parser)
    else:
        configure_serve(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``adevents serve`` or ``adevents demo`` (by ``args.command``)."""
    if getattr(args, "command", None) == "demo":
        return run_demo(args, settings)
    return run_serve(args, settings)
