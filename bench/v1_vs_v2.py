"""The consumer's events/s, lake v1 against lake v2, side by side in one run (issue 10).

    git worktree add /tmp/v1 01d0fd1          # v1: the home-made lake layout
    .venv/bin/python bench/v1_vs_v2.py --v1 /tmp/v1 --events 2000000 --rounds 3 \
        --redis-url redis://127.0.0.1:6379/5 --s3 --json /tmp/v1_vs_v2.json

Each round runs the same ``adevents bench --events N --key-cache K`` (the spool generated
first, not timed; ``--rate 0`` is implied; events/s from the ledger, first read to last
commit, every event reconciled) for each key cache, alternating the trees: v1 on local disk,
then v2 on local disk, then (``--s3``) v2 on a moto S3 server on loopback, started here. Both
trees run with this interpreter (the same packages); each from its own directory with
``PYTHONPATH`` set to it, and the script checks that each imports its own modules rather than
the editable install's. The machine's other work drifts over minutes, so the runs interleave
and the summary gives medians and the ratio of medians. The naive baseline is cut to
``--naive-events`` (it is not part of the comparison).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Settings that would point a run at someone else's data or lake.
_CLEARED = ("DATA_DIR", "LAKE_URI", "REDIS_URL", "REDIS_KEY_PREFIX", "PYTHONPATH")


@dataclass(frozen=True)
class Case:
    """One configuration: which tree, which key cache, which lake."""

    tree: str  # "v1" or "v2"
    key_cache: str  # "embedded" or "redis"
    lake: str  # "local" or "s3"

    @property
    def label(self) -> str:
        return f"{self.tree} {self.lake} {self.key_cache}"


@dataclass(frozen=True)
class Run:
    """What one ``adevents bench`` run measured."""

    case: Case
    round: int
    events_per_second: float
    consumer_seconds: float
    peak_rss_mb: float
    files: int
    groups: int
    stage_seconds: dict[str, float]
    #: The machine's 1-minute load average as the run started (others share the cores).
    load_before: float


def tree_env(tree: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    return {**env, "PYTHONPATH": str(tree), **extra}


def check_imports(tree: Path) -> None:
    """Fail unless ``python -m cli`` run from ``tree`` imports ``tree``'s packages."""
    probe = "import cli, pipeline; print(cli.__file__); print(pipeline.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tree,
        env=tree_env(tree, {}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    strays = [f for f in out if not Path(f).resolve().is_relative_to(tree.resolve())]
    if strays:
        raise SystemExit(f"{tree}: imports {strays} from outside the tree")


def bench_once(
    tree: Path, case: Case, *, events: int, naive_events: int, extra: dict[str, str]
) -> dict[str, Any]:
    """One ``adevents bench`` in ``tree``; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="v1v2-") as scratch:
        out = Path(scratch) / "bench.json"
        cmd = [sys.executable, "-m", "cli", "bench", "--events", str(events)]
        cmd += ["--key-cache", case.key_cache, "--naive-events", str(naive_events)]
        cmd += ["--no-progress", "--json", str(out), "--data-dir", str(Path(scratch) / "data")]
        proc = subprocess.run(
            cmd, cwd=tree, env=tree_env(tree, extra), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"{case.label} failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    if not result["reconciled"]:
        raise SystemExit(f"{case.label}: the lake did not reconcile")
    return result


@contextmanager
def s3_server(enabled: bool) -> Iterator[Any]:
    """tests/s3_server.py's moto server on loopback, or None."""
    if not enabled:
        yield None
        return
    sys.path.insert(0, str(REPO / "tests"))
    # Imported by name: tests/ is not a package, so mypy does not follow it from here.
    server = importlib.import_module("s3_server").S3Server().start()
    try:
        yield server
    finally:
        server.stop()


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Medians per case, the ratios of medians the issue asks for, and the median of the
    same-round ratios (a round's runs are minutes apart, so they share the machine's load)."""
    by_case: dict[str, list[Run]] = {}
    for run in runs:
        by_case.setdefault(run.case.label, []).append(run)
    medians: dict[str, dict[str, Any]] = {
        label: {
            "runs": len(rs),
            "events_per_second": [round(r.events_per_second) for r in rs],
            "median_events_per_second": statistics.median(r.events_per_second for r in rs),
            "median_consumer_seconds": statistics.median(r.consumer_seconds for r in rs),
            "median_peak_rss_mb": statistics.median(r.peak_rss_mb for r in rs),
            "files": rs[0].files,
            "groups": rs[0].groups,
        }
        for label, rs in by_case.items()
    }
    ratios: dict[str, float] = {}
    paired: dict[str, float] = {}
    for cache in ("embedded", "redis"):
        base = f"v1 local {cache}"
        for other in (f"v2 local {cache}", f"v2 s3 {cache}"):
            if base not in medians or other not in medians:
                continue
            name = f"{other} / {base}"
            ratios[name] = (
                medians[other]["median_events_per_second"]
                / medians[base]["median_events_per_second"]
            )
            per_round = [
                b.events_per_second / a.events_per_second
                for a, b in zip(by_case[base], by_case[other], strict=True)
            ]
            paired[name] = statistics.median(per_round)
    return {"medians": medians, "ratios": ratios, "paired_ratios": paired}


def print_summary(summary: dict[str, Any]) -> None:
    print("| case | runs | events/s per run | median events/s | median s | median RSS MB |")
    print("|---|---|---|---|---|---|")
    for label, m in sorted(summary["medians"].items()):
        per_run = ", ".join(f"{v:,}" for v in m["events_per_second"])
        print(
            f"| {label} | {m['runs']} | {per_run} | {m['median_events_per_second']:,.0f} "
            f"| {m['median_consumer_seconds']:.2f} | {m['median_peak_rss_mb']:,.0f} |"
        )
    for name, ratio in summary["ratios"].items():
        paired = summary["paired_ratios"][name]
        print(f"{name}: {ratio:.3f} (ratio of medians); {paired:.3f} (median same-round ratio)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v1", type=Path, required=True, help="a worktree of the v1 commit")
    parser.add_argument("--v2", type=Path, default=REPO, help="the v2 tree (default: this one)")
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--key-caches", nargs="+", default=["embedded", "redis"])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--naive-events", type=int, default=1_000)
    parser.add_argument("--s3", action="store_true", help="also run v2 on a moto S3 server")
    parser.add_argument("--json", dest="json_path", type=Path, help="write every run here")
    args = parser.parse_args()
    trees = {"v1": args.v1, "v2": args.v2}
    for tree in trees.values():
        check_imports(tree)
    runs: list[Run] = []
    with s3_server(args.s3) as s3:
        for rnd in range(1, args.rounds + 1):
            for cache in args.key_caches:
                cases = [Case("v1", cache, "local"), Case("v2", cache, "local")]
                cases += [Case("v2", cache, "s3")] if s3 is not None else []
                for case in cases:
                    load_before = os.getloadavg()[0]
                    extra = {"REDIS_URL": args.redis_url} if cache == "redis" else {}
                    if case.lake == "s3":
                        extra |= s3.env(prefix=f"v1v2-{rnd}-{cache}")
                    result = bench_once(
                        trees[case.tree],
                        case,
                        events=args.events,
                        naive_events=args.naive_events,
                        extra=extra,
                    )
                    run = Run(
                        case=case,
                        round=rnd,
                        events_per_second=result["events_per_second"],
                        consumer_seconds=result["consumer_seconds"],
                        peak_rss_mb=result["peak_rss_mb"],
                        files=result["files"],
                        groups=result.get("groups", result["files"]),  # v1: a commit per file
                        stage_seconds=result["stage_seconds"],
                        load_before=load_before,
                    )
                    runs.append(run)
                    print(
                        f"round {rnd} {case.label}: {run.events_per_second:,.0f} events/s "
                        f"({run.consumer_seconds:.2f} s, load {load_before:.1f})",
                        flush=True,
                    )
    summary = summarise(runs)
    print_summary(summary)
    if args.json_path:
        body = {"args": {k: str(v) for k, v in vars(args).items()}, **summary}
        body["runs"] = [asdict(r) for r in runs]
        args.json_path.write_text(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
