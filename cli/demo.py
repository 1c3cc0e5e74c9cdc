"""``adevents demo``: generator, consumer and scheduled jobs as children, the API in-process."""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Final

from api.command import build_server, configure_server
from generator.budgets import BUDGET_HEADROOM, OVERPACED_BUDGET_S
from generator.dimension import ensure_campaigns
from generator.runner import DEFAULT_CAMPAIGNS, budget_rate
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.signals import stop_on_signals

#: Subcommands the demo starts as child processes (``python -m cli <name>``).
CHILDREN: Final = ("generate", "consume", "scheduler")
STOP_TIMEOUT: Final = 15.0


def configure(parser: argparse.ArgumentParser) -> None:
    configure_server(parser)
    parser.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds"
    )


def _spawn(command: str, settings: Settings) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cli", command, "--data-dir", settings.data_dir]
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


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Generator, consumer and jobs as subprocesses plus the API in this process."""
    # uvicorn restores these handlers after its own shutdown and re-raises the signal into them.
    with stop_on_signals(what="stopping the demo") as stop:
        return _demo(args, settings, stop)


def what_to_watch(settings: Settings, url: str) -> str:
    """Create the campaign dimension if none exists (budgets fitted to the generator's rate)
    and say which campaigns over-pace on purpose, and where their alerts show."""
    path = Layout(settings.data_dir).campaigns
    rate = budget_rate(settings)
    dimension = ensure_campaigns(path, DEFAULT_CAMPAIGNS, secrets.randbits(64), rate)
    if not dimension.overpaced:
        return f"budgets are those of {path} (not generated here): budget alerts follow them."
    note = ""
    if dimension.budget_rate != rate:
        note = (
            f" Budgets fit {dimension.budget_rate:,.0f} events/s, not {rate:,.0f}: "
            f"delete {path} to fit them again."
        )
    return (
        f"campaigns {', '.join(dimension.overpaced)} over-pace on purpose (a daily budget of "
        f"{OVERPACED_BUDGET_S:.0f} s of their spend): their budget alerts open within the first "
        f"minutes in the dashboard's alerts table ({url}) and at {url}alerts?open=true; every "
        f"other budget is {BUDGET_HEADROOM:g}x its expected daily spend and stays quiet.{note}"
    )


def _demo(args: argparse.Namespace, settings: Settings, stop: threading.Event) -> int:
    failed: list[str] = []
    Layout(settings.data_dir).ensure()
    url = f"http://{args.host}:{args.port}/"
    watch_for = what_to_watch(settings, url)
    server = build_server(args, settings)
    children = {name: _spawn(name, settings) for name in CHILDREN}
    started = time.monotonic()

    def watch() -> None:
        announced = False
        while not stop.is_set():
            if server.started and not announced:
                announced = True
                print(
                    f"adevents demo: dashboard at {url} "
                    f"(API docs at /docs, metrics at /metrics); data in {settings.data_dir}. "
                    "Ctrl-C stops everything.",
                    flush=True,
                )
                print(f"adevents demo: {watch_for}", flush=True)
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
