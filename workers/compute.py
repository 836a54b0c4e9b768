"""Pure, synchronous, picklable CPU functions. They run in the worker's process pool, never on
an event loop; each is named by a job of ``queue_contract.JOBS`` (its ``compute``). This module
imports nothing, so a fresh compute process starts quickly."""

from __future__ import annotations


def sum_of_squares(n: int) -> int:
    """The Flask app's heavy task: the sum of i**2 for 0 <= i < n, computed the long way.

    The closed form would make it instant; the point is a real CPU-bound job of a size the
    client chooses. Python ints are arbitrary precision, so the result is exact.
    """
    return sum(i * i for i in range(n))
