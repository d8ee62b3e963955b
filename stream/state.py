"""Where state that outlives a request lives: url results and job records.

`local` keeps url results on this machine's disk (`data_dir`; replicas on one machine that
share the folder share the files) and jobs in this process. `redis` keeps both in Redis, so
that replicas on several machines serve each other's urls and jobs.
"""

from __future__ import annotations

from stream.jobs import JobStore, MemoryJobStore
from stream.settings import Settings
from stream.store import DiskResultStore, ResultStore


def build_stores(settings: Settings) -> tuple[ResultStore, JobStore]:
    if settings.state_store == "redis":
        import redis.asyncio as redis

        from stream.redis_state import RedisJobStore, RedisResultStore

        client = redis.Redis.from_url(settings.redis_url)
        prefix = settings.redis_prefix
        return (
            RedisResultStore(client, ttl_s=settings.url_ttl_s, prefix=prefix),
            RedisJobStore(
                client,
                buffer_size=settings.job_event_buffer,
                retention_s=settings.job_ttl_s,
                lease_s=settings.job_lease_s,
                prefix=prefix,
            ),
        )
    return (
        DiskResultStore(settings.data_dir, settings.url_ttl_s),
        MemoryJobStore(buffer_size=settings.job_event_buffer, retention_s=settings.job_ttl_s),
    )
