"""The original's Celery task: the CPU work that used to run inside the request handler."""

import os

from celery import Celery

celery = Celery(
    "baseline",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_BROKER_URL"],
)
celery.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


@celery.task
def heavy_task(n: int) -> int:
    return sum(i**2 for i in range(n))
