"""How many finished tasks one client keeps in Redis: the newest ``TASK_RESULTS_KEPT``.

Each finished task leaves its result (arq's result key, 344 bytes in Redis) and its owner record
(152) for ``TASK_RESULT_TTL``, and the owner record a day longer (it must outlive an unstarted
job too). A client submitting at its write limit (120 a minute) keeps 172,800 results and
twice as many owner records, about 110 MB, in a Redis that never evicts (compose.yaml says
why): a few keys could fill it. So every task a client submits is noted in that client's
set, by time, and once the set holds more than ``TASK_RESULTS_KEPT`` the oldest finished ones
are forgotten at once, as if their results had expired: ``GET /tasks/{id}`` answers 404, and an
``Idempotency-Key`` of theirs starts a new task. Tasks still queued or running are never
dropped (a client has at most ``TASK_CLIENT_LIMIT`` of them), so a client keeps at most
``TASK_RESULTS_KEPT + TASK_CLIENT_LIMIT`` tasks: with its place in the set (about 150 bytes),
about 650 bytes each, 0.7 MB at the defaults.

arq's keys are named in the script from their prefixes, not passed as KEYS: the service runs on
one Redis (or a Sentinel-watched primary), never a Redis Cluster, which arq does not support.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.backends import queue_contract as queue
from service.config import Settings

# KEYS: the client's set of kept tasks, the queue.
# ARGV: id, now ms, tasks kept, the set's lifetime ms, how many of the oldest to look at,
# the result key prefix, the owner key prefix, the watched key prefix.
_KEEP = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over <= 0 then return 0 end
local dropped = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, over + tonumber(ARGV[5]) - 1)) do
  if dropped >= over then break end
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('DEL', ARGV[6] .. id, ARGV[7] .. id, ARGV[8] .. id)
    redis.call('ZREM', KEYS[1], id)
    dropped = dropped + 1
  end
end
return dropped
"""


class Retention:
    """Keeps each client's newest finished tasks, up to ``TASK_RESULTS_KEPT``."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self._keep = redis.register_script(_KEEP)

    def kept_key(self, client: str) -> str:
        return f"{self.settings.redis_prefix}task:kept:{client}"

    async def keep(
        self,
        client: str,
        job_id: str,
        now_ms: int,
        lifetime_ms: int,
        owner_prefix: str,
        watched_prefix: str,
    ) -> int:
        """Note ``job_id`` as ``client``'s newest task, and drop its oldest finished ones past
        the limit; returns how many were dropped. ``lifetime_ms``: the longest any of a task's
        keys lives, which the set outlives."""
        dropped: int = await self._keep(
            keys=[self.kept_key(client), queue.queue_name(self.settings)],
            args=[
                job_id,
                now_ms,
                self.settings.task_results_kept,
                lifetime_ms,
                # The oldest tasks may be still outstanding; at most this many of them are.
                self.settings.task_client_limit,
                queue.result_key_prefix,
                owner_prefix,
                watched_prefix,
            ],
        )
        return dropped
