"""What can go wrong in a backend, in the backends' own words: no HTTP here.

service/errors.py alone turns these into statuses (a 503 with Retry-After, a 429, a 422), for
every route alike; the backends raise them and know nothing of the request. Each carries what
its answer needs to say (a limit, how long to wait).
"""

from __future__ import annotations


class StartupFailed(RuntimeError):
    """A serving hook could not open a resource. The message names the environment variable
    and says why, without the variable's value (a URL may hold a password)."""


class NotServing(RuntimeError):
    """A resource was asked for while the app is not serving (its serving hooks have not run)."""


class BackendError(Exception):
    """A backend could not do what a request asked; service/errors.py says how it is answered."""


class DatabaseUnavailable(BackendError):
    """PostgreSQL is not there right now (down, restarting, the connection cut, a statement past
    its timeout, the pool exhausted), as opposed to the request being wrong: retry shortly."""


class UnstorableValue(BackendError):
    """A value PostgreSQL cannot store (a NUL in a text, a number out of range) that the
    request's validation let through: the client's to fix."""


class TaskRefused(BackendError):
    """The task queue took no task; ``retry_after`` is TASK_RETRY_AFTER, in seconds. ``reason``
    labels the refusal in the metrics (``quart_service_tasks_refused_total``)."""

    reason = "refused"

    def __init__(self, retry_after: int, detail: str = "") -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QueueFull(TaskRefused):
    """The queue holds as many outstanding tasks as it may (``limit``, TASK_QUEUE_LIMIT)."""

    reason = "full"

    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(retry_after)
        self.limit = limit


class ClientLimit(TaskRefused):
    """This client already has as many outstanding tasks as one client may (``limit``,
    TASK_CLIENT_LIMIT)."""

    reason = "client_limit"

    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(retry_after)
        self.limit = limit


class QueueUnavailable(TaskRefused):
    """Redis did not answer; nothing was enqueued."""

    reason = "unavailable"


class IdempotencyConflict(BackendError):
    """The Idempotency-Key was used before for a different request."""
