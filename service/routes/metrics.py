"""``/metrics``: Prometheus metrics of every API process, and the queue, the workers' health and
Redis read from Redis at each scrape.

The metrics themselves are defined in service/obs/metrics.py, and recorded where they happen
(the request's in service/pipeline/timing.py).
"""

from __future__ import annotations

import asyncio
import logging

from quart import Blueprint, Response
from quart_schema import hide

from service.framework.resources import resources
from service.obs import metrics
from service.obs.watchers import update_pool_gauges

log = logging.getLogger(__name__)

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
@hide
async def metrics_endpoint() -> Response:
    """Prometheus metrics of every API process, and the queue, the workers' health and Redis
    read from Redis now."""
    held = resources()
    update_pool_gauges(held)
    live: dict[str, tuple[str, float]] = {}
    if held.serving:
        try:
            async with asyncio.timeout(0.5):
                depth = await held.task_queue.depth()
                oldest = await held.task_queue.oldest_age()
                alive = await held.task_queue.worker_alive()
        except Exception as error:  # the scrape still answers without Redis
            metrics.REDIS_ERRORS.inc()
            log.warning("queue depth unavailable: %s", type(error).__name__)
            live["quart_service_redis_up"] = ("1 if Redis answered this scrape, else 0.", 0)
        else:
            live.update(
                {
                    "quart_service_redis_up": ("1 if Redis answered this scrape, else 0.", 1),
                    "quart_service_task_queue_depth": (
                        "Tasks queued or running, read from Redis.",
                        depth,
                    ),
                    "quart_service_task_queue_limit": (
                        "Outstanding tasks the queue accepts (TASK_QUEUE_LIMIT).",
                        held.settings.task_queue_limit,
                    ),
                    "quart_service_task_queue_oldest_age_seconds": (
                        "Age of the oldest task queued or running, read from Redis (0: none).",
                        oldest,
                    ),
                    "quart_service_worker_up": (
                        "1 if a worker on this queue renewed its health-check key lately.",
                        int(alive),
                    ),
                }
            )
    return Response(metrics.render(live), content_type=metrics.CONTENT_TYPE_LATEST)
