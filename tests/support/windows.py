"""Rate-limit windows in the tests.

The limiter's windows are fixed and aligned on the clock (service/pipeline/limiter.py). A test
that counts requests against a limit must have them all fall in one window: at a window's end
the count starts over, and a request the test expects refused is served (runs that crossed a
minute's end failed so, more often the busier the machine). The tests therefore use the longest
window the setting admits, and start counting only when the current one has a margin left.
"""

from __future__ import annotations

import time

from tests.support.waiting import wait_until

WINDOW = 86_400  # a day: RATE_LIMIT_WINDOW's upper bound
MARGIN = 120.0  # seconds the current window must still have: longer than any counting test


def seconds_left(window: int = WINDOW) -> float:
    return window - time.time() % window


def fresh_window(window: int = WINDOW, margin: float = MARGIN) -> int:
    """``window``, once the current window has ``margin`` seconds left (when it has fewer,
    after the next one has begun: a wait of at most ``margin``, once a day)."""
    if seconds_left(window) < margin:
        wait_until(lambda: seconds_left(window) > margin, "the next window", within=margin + 10)
    return window
