"""Builds the edges (key cache) from settings: the one place that picks implementations."""

from __future__ import annotations

from pipeline.keycache import EmbeddedKeyCache, KeyCache
from pipeline.schema import Layout
from pipeline.settings import Settings


def make_key_cache(settings: Settings) -> KeyCache:
    """Redis when REDIS_URL is set, else the embedded cache under DATA_DIR/state/."""
    window_ms = int(settings.dedupe_window * 1000)
    slice_ms = int(settings.dedupe_slice * 1000)
    if settings.redis_url:
        from pipeline.redis_cache import RedisKeyCache

        cache = RedisKeyCache.from_url(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            window_ms=window_ms,
            slice_ms=slice_ms,
        )
        return cache
    layout = Layout(settings.data_dir)
    layout.ensure()
    return EmbeddedKeyCache(layout.state, window_ms=window_ms, slice_ms=slice_ms)
