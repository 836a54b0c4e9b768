"""A minimal HTTP/1.1 GET over asyncio streams, for probes and the stampede.

Hand-written rather than httpx so that the stampede's 200 requests leave at the same instant
(every connection is opened first, then all requests are written together) and the client adds
as little of its own time as possible to what is measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _request(host: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


def _parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Reply(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def get(
    host: str, port: int, path: str, limit: float = 10, headers: dict[str, str] | None = None
) -> Reply:
    """One GET on a fresh connection, with ``headers`` besides Host and Connection."""

    async def _go() -> Reply:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request(host, path, headers))
            await writer.drain()
            return _parse(await reader.read(-1))
        finally:
            writer.close()

    return await asyncio.wait_for(_go(), limit)


async def stampede(
    host: str,
    port: int,
    path: str,
    count: int,
    limit: float = 120,
    headers: dict[str, str] | None = None,
) -> tuple[list[float], list[int], int, float]:
    """``count`` GETs sent at the same instant on ``count`` open connections.

    Returns each answered request's latency (ms) and status, the number of requests that failed
    at the socket level, and the wall time (s) from sending to the last answer.
    """
    opened = await asyncio.gather(
        *(asyncio.wait_for(asyncio.open_connection(host, port), limit) for _ in range(count)),
        return_exceptions=True,
    )
    connections = [c for c in opened if not isinstance(c, BaseException)]
    failures = count - len(connections)
    latencies: list[float] = []
    statuses: list[int] = []
    request = _request(host, path, headers)

    async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            writer.write(request)
            await writer.drain()
            reply = _parse(await asyncio.wait_for(reader.read(-1), limit))
        except (TimeoutError, OSError, ValueError, IndexError):
            failures += 1
            return
        finally:
            writer.close()
        latencies.append((time.perf_counter() - started) * 1000)
        statuses.append(reply.status)

    started = time.perf_counter()
    await asyncio.gather(*(_one(reader, writer) for reader, writer in connections))
    return latencies, statuses, failures, time.perf_counter() - started
