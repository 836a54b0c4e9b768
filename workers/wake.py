"""arq's worker, woken the moment there is work for it instead of polling every few ms.

arq finds new jobs by polling the queue every ``poll_delay``. A small task waits half of that on
average before it starts: with the 20 ms poll this service used, 10 of a small task's 20 ms; a
shorter poll would cost an idle worker a core's tenth and more. Here the API's enqueue script
publishes the job's id on the queue's wake channel (``queue_contract.wake_channel``) in the
same call that queues it, and an abort of a running job publishes there too; the worker
listens, and polls at once. A finished job, which frees a slot, wakes it as well. Without a
wake-up it polls every ``WORKER_POLL_DELAY`` (0.5 s): for what no message announces (a job
whose worker died and whose lease ran out, a job retried after a shutdown) and for messages
lost while Redis was away. A running job's lease is renewed on time however long that is.

Written against arq 0.28's ``arq/worker.py``; each override names the arq method it wraps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from service.backends import queue_contract as queue
from workers.lease import LeasedWorker, reraise_cancellation

log = logging.getLogger("workers")

# The abort message as bytes and as text, whatever the client's decode_responses.
_ABORT = (queue.WAKE_ABORT, queue.WAKE_ABORT.decode())


class WakingWorker(LeasedWorker):
    """arq's ``Worker`` that polls when the API announces a job, a slot frees or an abort
    comes, and at least every ``poll_delay`` seconds."""

    def __init__(self, *args: Any, poll_delay: float, wake_channel: str, **kwargs: Any) -> None:
        # arq's own loop then only yields between polls; the waiting is done here.
        super().__init__(*args, poll_delay=0, **kwargs)
        self.idle_poll_s = poll_delay
        self.wake_channel = wake_channel
        self._wake = asyncio.Event()
        # A job announced while every slot looked taken: looked for again once one is free.
        self._queued_while_full = False
        self._listener: asyncio.Task[None] | None = None

    # -- waiting between polls (arq's poll loop in ``Worker.main``) -------------------------

    async def _poll_iteration(self) -> None:
        # Cleared before the queue is read: a job queued while this poll runs wakes the next.
        self._wake.clear()
        await super()._poll_iteration()
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        if self._queued_while_full and self.job_counter < self.max_jobs:
            # The slot was taken only by a claim that failed (arq counts a job before it
            # claims it, and frees the count without a callback when another worker won).
            self._queued_while_full = False
            self._wake.set()
        # Running jobs' leases are renewed from the poll loop (LeasedWorker.heart_beat), and a
        # job claimed in this poll has a mark of one lease from now: arq's ``tasks`` holds it
        # from the claim on (``job_tasks`` only once its run has begun).
        wait = min(self.idle_poll_s, self._renew_every / 2) if self.tasks else self.idle_poll_s
        await self.wait_for_wake(wait)

    async def wait_for_wake(self, seconds: float) -> None:
        """Until a wake-up comes, or ``seconds`` have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _release_sem_dec_counter_on_complete(self) -> None:
        # A job ended: its slot is free for the next job in the queue.
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()

    async def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def close(self) -> None:
        await self.stop_listening()
        await super().close()

    # -- the wake channel -----------------------------------------------------------------

    def _on_message(self, data: bytes | str) -> None:
        # A new job matters only with a slot free; an abort always does (the poll cancels it).
        if data in _ABORT or self.job_counter < self.max_jobs:
            self._wake.set()
        else:
            self._queued_while_full = True

    async def _listen(self) -> None:
        """Relay wake-ups from the channel; after a Redis error, subscribe again with backoff
        (the polls go on meanwhile, every ``poll_delay``)."""
        backoff = 0.1
        while True:
            pubsub = self.pool.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.wake_channel)
                # What was announced while this worker was not subscribed is read now.
                self._wake.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=self.idle_poll_s)
                    if message is not None and message["type"] == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the polls carry on; log and subscribe again
                reraise_cancellation(error)  # the worker is stopping
                log.debug("wake channel interrupted (%s); subscribing again", error)
                await asyncio.sleep(backoff)
                # Capped low: after an outage the wake-ups come back within a second of Redis.
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
