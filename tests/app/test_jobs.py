"""Each job is declared once (``queue_contract.JOBS``): the worker's registration, the queue's
enqueueing and its reading back derive from that declaration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.backends import queue_contract as queue
from workers.jobs import arq_function, pure_function


@pytest.mark.parametrize("job", queue.JOBS, ids=lambda job: job.name)
def test_every_declared_job_registers_under_its_name(job: queue.Job[queue.SumOfSquares]) -> None:
    registered = arq_function(job, max_tries=3)
    assert (registered.name, registered.max_tries) == (job.name, 3)
    assert callable(pure_function(job))


def test_the_heavy_tasks_arguments_go_to_arqs_format_and_back() -> None:
    job = queue.HEAVY_TASK
    args = job.args(queue.SumOfSquares(n=10))
    assert args == (10,)  # arq's positional arguments, as the job and result records hold them
    assert job.parse(list(args)) == queue.SumOfSquares(n=10)
    assert pure_function(job)(*args) == sum(i * i for i in range(10))


@pytest.mark.parametrize("args", [[], [1, 2], [-1], ["ten"]])
def test_arguments_that_do_not_fit_the_declaration_are_refused(args: list[object]) -> None:
    with pytest.raises((ValueError, ValidationError)):
        queue.HEAVY_TASK.parse(args)


def test_a_job_naming_a_missing_function_fails_the_registration() -> None:
    missing = queue.Job("missing", queue.SumOfSquares, compute="workers.compute:no_such_function")
    with pytest.raises(LookupError, match="no_such_function"):
        arq_function(missing, max_tries=1)
