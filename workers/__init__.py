"""The arq worker: the worker class (worker.py), its options and hooks (settings.py), the async
side of each job (jobs.py), and the pure CPU functions the jobs run in a process pool
(compute.py). The jobs themselves are declared in service/backends/queue_contract.py."""
