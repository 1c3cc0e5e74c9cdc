"""Builds the edges (key cache, consumer) from settings: the one place that picks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.keycache import EmbeddedKeyCache, KeyCache
from pipeline.schema import Layout
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.consumer import Consumer
    from pipeline.kafka_consumer import KafkaLander


def make_key_cache(settings: Settings) -> KeyCache:
    """Redis when REDIS_URL is set, else the embedded cache under DATA_DIR/state/."""
    window_ms = settings.dedupe_window_ms
    slice_ms = settings.dedupe_generation_ms
    if settings.redis_url:
        from pipeline.redis_cache import RedisKeyCache

        cache = RedisKeyCache.from_url(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            window_ms=window_ms,
            slice_ms=slice_ms,
            rebuild_grace_s=settings.rebuild_grace,
            lock_timeout_s=settings.lease_timeout,
        )
        return cache
    layout = Layout(settings.data_dir)
    layout.ensure()
    return EmbeddedKeyCache(layout.state, window_ms=window_ms, slice_ms=slice_ms)


def make_consumer(settings: Settings) -> Consumer | KafkaLander:
    """A consumer for ``adevents consume``: on its slot of this machine's spool, or (with
    CONSUMER_SOURCE=kafka) a member of the Kafka consumer group."""
    if settings.consumer_source == "kafka":
        from pipeline.kafka_consumer import KafkaLander

        return KafkaLander(settings, make_key_cache(settings))
    from pipeline.consumer import Consumer

    return Consumer(settings, make_key_cache(settings))
