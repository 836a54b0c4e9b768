"""Waiting for a condition under a deadline, never for a fixed time.

A fixed sleep is either too short on a busy machine (the thing has not happened yet) or wasted
on a quiet one. These poll instead, and fail naming what never came.

Own code rather than a library's: tenacity or polling2 would do it, but their retry-on-result
form is longer to read than the loop, and the suite needs one sync and one async form.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.02  # seconds between looks: short against every wait here, cheap for one check


def wait_until(condition: Callable[[], T], what: str, within: float = 30.0) -> T:
    """The first truthy value of ``condition()``, tried until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g} s")
        time.sleep(POLL)


async def until(condition: Callable[[], Awaitable[T]], what: str, within: float = 30.0) -> T:
    """The first truthy value of ``await condition()``, tried until ``within`` seconds have
    passed. The event loop runs between tries."""
    deadline = time.monotonic() + within
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g} s")
        await asyncio.sleep(POLL)
