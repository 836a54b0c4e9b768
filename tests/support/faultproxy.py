"""A fault-injecting TCP proxy for the tests: put it between the service and PostgreSQL or
Redis, then add latency, stall, cut or refuse, and heal.

Modelled on asyncpg's own adversity tests (``asyncpg/_testbase/fuzzer.py``, used by
``tests/test_adversity.py``): a proxy on its own event loop in a thread, so the faults it
makes do not depend on the test's loop, and the test can hold its own loop or block without
delaying the bytes. Written here rather than taken from a package: Toxiproxy is a Go server,
in neither PyPI nor Debian (``toxiproxy-python`` is only its client, last released in 2019),
and no maintained PyPI package that stalls and cuts connections turned up.

Faults, each applied to the connections already open and to those opened after:

* ``delay(upstream=, downstream=)``: each chunk is delivered that many seconds after it
  arrived, in order, per direction (toward the server, toward the client): a delay line, so
  latency does not also cut throughput;
* ``stall()``: nothing is forwarded either way and the sockets stay open; new connections are
  still accepted (the kernel does that) and get nothing either: a network that black-holes;
* ``cut()``: every open connection is reset on both sides (RST, via ``SO_LINGER`` 0);
* ``refuse()``: the listening socket is closed, so new connections are refused;
* ``heal()``: all of the above undone; what a stall held back is delivered then.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")
Direction = Literal["upstream", "downstream"]

_CHUNK = 64 * 1024
# SO_LINGER on, 0 s: close() sends RST and drops what is unsent, as a cut link would.
_RESET = struct.pack("ii", 1, 0)


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:port`` to ``upstream``; a context manager that starts and
    stops it. Its methods are called from any thread and return once the fault is in place."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.reset = 0  # connections cut so far
        self._delays: dict[Direction, float] = {"upstream": 0.0, "downstream": 0.0}
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # -- the test's side ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *_exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def open(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    def delay(self, *, upstream: float = 0.0, downstream: float = 0.0) -> None:
        """Deliver each chunk this many seconds late: toward the server, toward the client."""

        async def set_delays() -> None:
            self._delays = {"upstream": upstream, "downstream": downstream}

        self._call(set_delays())

    def stall(self) -> None:
        """Forward nothing, either way, keeping every socket open."""

        async def stop_flowing() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(stop_flowing())

    def cut(self) -> int:
        """Reset every open connection on both sides; returns how many were cut."""
        return self._call(self._cut())

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused (open ones carry on)."""
        self._call(self._close_listener())

    def heal(self) -> None:
        """No delay, no stall, listening again."""
        self._call(self._heal())

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    # -- the proxy's loop ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # reuse_address: the same port again after refuse(), with connections in TIME_WAIT.
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _heal(self) -> None:
        self._delays = {"upstream": 0.0, "downstream": 0.0}
        assert self._flowing is not None
        self._flowing.set()
        await self._listen()

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self.reset += len(links)
        return len(links)

    async def _stop(self) -> None:
        await self._close_listener()
        for link in list(self._links):
            link.reset()
        async with asyncio.timeout(2):
            while self._links:  # noqa: ASYNC110 -- each link's task removes itself
                await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        link = _Link(self, (reader, writer), (server_reader, server_writer))
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One client connection and its connection to the server, forwarded both ways."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        toward_server: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        toward_client: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        readers = [
            asyncio.create_task(self._read(self.client[0], toward_server, "upstream")),
            asyncio.create_task(self._read(self.server[0], toward_client, "downstream")),
        ]
        deliveries = [
            asyncio.create_task(self._deliver(toward_server, self.server[1])),
            asyncio.create_task(self._deliver(toward_client, self.client[1])),
        ]
        self._tasks = readers + deliveries
        try:
            # Either side closing ends the link, once what it sent before has been delivered;
            # so does a write that fails.
            await asyncio.wait(deliveries, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for _reader, writer in (self.client, self.server):
                writer.close()

    def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        for _reader, writer in (self.client, self.server):
            _abort(writer)

    async def _read(
        self,
        reader: asyncio.StreamReader,
        line: asyncio.Queue[tuple[float, bytes]],
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                data = b""
            # Stamped on arrival, with the delay in force then: b"" is the end, in order.
            line.put_nowait((loop.time() + self.proxy._delays[direction], data))
            if not data:
                return

    async def _deliver(
        self, line: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        flowing = self.proxy._flowing
        assert flowing is not None
        while True:
            due, data = await line.get()
            await flowing.wait()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            await flowing.wait()  # a stall that began during the delay holds this chunk too
            if not data:
                return
            writer.write(data)
            await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()
