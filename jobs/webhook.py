"""Alert notifications to ALERT_WEBHOOK_URL: the outbox, delivered in order with retries.

The alerts job only queues notifications in the outbox (:mod:`jobs.outbox`), so a dead or
hanging webhook never holds up alert evaluation; :func:`deliver` sends them, each POST bounded
by a timeout and retried a few times with a short backoff. Delivery is at least once. A
notification the receiver rejects (4xx other than 408/429) or that stays undeliverable longer
than the maximum age is dropped with an error in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx
import tenacity

from jobs import outbox
from jobs.storage import job_lock
from pipeline.schema import Layout

log = logging.getLogger("adevents.jobs.webhook")

_RETRYABLE_4XX = (408, 429)


@dataclass
class DeliveryReport:
    sent: int = 0
    dropped: int = 0
    failed: bool = False
    pending: int = 0

    def line(self) -> str:
        return (
            f"webhook sent={self.sent} dropped={self.dropped} pending={self.pending}"
            f"{' failing=true' if self.failed else ''}"
        )


def _retryable(status: int) -> bool:
    """A 5xx, a timeout (408) or throttling (429): the receiver may take it later."""
    return status >= 500 or status in _RETRYABLE_4XX


def _post(
    client: httpx.Client,
    url: str,
    payload: dict[str, object],
    *,
    retries: int,
    sleep: Callable[[float], None],
) -> int | None:
    """POST once plus up to ``retries`` more; the final status code, or None when unreachable."""

    def failed(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        assert outcome is not None
        what = (
            f"failed: {outcome.exception()}" if outcome.failed else f"answered {outcome.result()}"
        )
        log.warning("webhook POST to %s %s (attempt %d)", url, what, state.attempt_number)

    def last_status(state: tenacity.RetryCallState) -> int | None:
        outcome = state.outcome
        assert outcome is not None
        return None if outcome.failed else int(outcome.result())

    policy = tenacity.Retrying(
        sleep=sleep,
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential(multiplier=0.25, max=2.0),
        retry=tenacity.retry_if_exception_type(httpx.HTTPError)
        | tenacity.retry_if_result(_retryable),
        after=failed,
        retry_error_callback=last_status,
    )
    status: int | None = policy(lambda: client.post(url, json=payload).status_code)
    return status


def deliver(
    layout: Layout,
    url: str,
    *,
    timeout: float,
    retries: int,
    max_age_s: float,
    now: datetime,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send what the outbox holds, oldest first; stop at the first failure (order matters)."""
    report = DeliveryReport()
    with job_lock(layout, "webhook"), httpx.Client(timeout=timeout) as client:
        files = outbox.pending(layout)
        for i, path in enumerate(files):
            entry = outbox.read(path)
            if entry is None:
                continue
            status = _post(client, url, entry.payload, retries=retries, sleep=sleep)
            if status is not None and status < 300:
                outbox.ack(path)
                report.sent += 1
                continue
            too_old = (now - entry.queued_at).total_seconds() > max_age_s
            rejected = status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX
            if rejected or too_old:
                log.error(
                    "dropping alert notification %s after %s: %s",
                    path.name,
                    f"HTTP {status}" if rejected else f"{max_age_s:.0f}s undelivered",
                    entry.payload,
                )
                outbox.ack(path)
                report.dropped += 1
                continue
            report.failed = True
            report.pending = len(files) - i
            return report
    return report
