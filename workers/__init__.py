"""The arq worker: settings, async jobs, and the pure CPU functions they run in a process pool."""
