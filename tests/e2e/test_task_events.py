"""End to end: a task's event stream (GET /tasks/{id}/events) from Hypercorn (hypercorn.toml)
with a worker, both as processes, read by an SSE client over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from service.config import Settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from tests.app.test_tasks import exact
from tests.support.worker_procs import settings_env, worker
from tools import ROOT
from tools.hypercorn_process import hypercorn, output

KEYS = {name: generate_key() for name in ("alice", "bob", "writer")}
SCOPES = {"alice": ("read", "write"), "bob": ("read", "write"), "writer": ("write",)}
API_KEYS = ",".join(key_entry(name, KEYS[name], SCOPES[name]) for name in KEYS)
GRACEFUL_TIMEOUT = tomllib.loads((ROOT / "hypercorn.toml").read_text())["graceful_timeout"]
N = 10**7


def as_(name: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}", **headers}


async def sse_items(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Each event ({"id", "event", "data"}) and comment ({"comment"}) of a stream, as the
    text/event-stream format delimits them (a blank line ends one)."""
    fields: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def read_events(
    http: httpx.AsyncClient, task_id: str, last_id: str | None = None, stop_after: int = 0
) -> list[dict[str, Any]]:
    """The events of one connection, until the server closes it or, with ``stop_after``, until
    that many have come (then the client drops the connection)."""
    headers = as_("alice", **({"Last-Event-ID": last_id} if last_id else {}))
    events: list[dict[str, Any]] = []
    async with http.stream("GET", f"/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for item in sse_items(response):
            if "event" in item:
                events.append(item)
                if len(events) == stop_after:
                    break
    return events


async def test_a_stream_resumed_with_last_event_id_misses_nothing_and_repeats_nothing(
    settings: Settings, port: int
) -> None:
    env = settings_env(settings, api_keys=API_KEYS)
    with hypercorn(port, env) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            # No worker yet: the task stays queued while the client reads its first event.
            created = await http.post("/tasks", json={"n": N}, headers=as_("alice"))
            task_id = created.json()["id"]
            first = await read_events(http, task_id, stop_after=1)
            assert [(e["id"], e["event"]) for e in first] == [("1", "queued")]
            assert first[0]["data"]["id"] == task_id

            # The access rules of GET /tasks/{id}: another key sees no such task, and a key
            # without the read scope is refused.
            other = await http.get(f"/tasks/{task_id}/events", headers=as_("bob"))
            assert other.status_code == 404
            assert other.headers["content-type"] == PROBLEM_JSON
            unscoped = await http.get(f"/tasks/{task_id}/events", headers=as_("writer"))
            assert unscoped.status_code == 403
            bad_id = await http.get(
                f"/tasks/{task_id}/events", headers=as_("alice", **{"Last-Event-ID": "x"})
            )
            assert bad_id.status_code == 422

            with worker(settings, api_keys=API_KEYS):
                # Resumed after `queued`: the run, then the result, and the stream closes.
                rest = await read_events(http, task_id, last_id=first[-1]["id"])
            assert [(e["id"], e["event"]) for e in rest] == [("2", "running"), ("3", "complete")]
            assert rest[0]["data"]["result"] is None
            assert rest[-1]["data"]["result"] == exact(N)
            assert (
                rest[-1]["data"]
                == (await http.get(f"/tasks/{task_id}", headers=as_("alice"))).json()
            )

            # Resumed after the final event: nothing more, closed at once.
            assert await read_events(http, task_id, last_id="3") == []
            # A new client gets the current status only.
            fresh = await read_events(http, task_id)
            assert [(e["id"], e["event"]) for e in fresh] == [("3", "complete")]
        assert "Error in ASGI Framework" not in output(process)


async def test_streams_are_bounded_per_client_send_heartbeats_and_end_on_sigterm(
    settings: Settings, port: int
) -> None:
    env = settings_env(
        settings,
        api_keys=API_KEYS,
        task_events_client_limit=1,
        task_events_heartbeat=0.2,
        task_events_max_age=600,
    )
    # One Hypercorn worker, so that both streams meet the same process's count.
    with hypercorn(port, env, "--workers", "1", new_session=True) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            created = await http.post("/tasks", json={"n": N}, headers=as_("alice"))
            task_id = created.json()["id"]
            seen: list[dict[str, Any]] = []
            async with http.stream(
                "GET", f"/tasks/{task_id}/events", headers=as_("alice")
            ) as stream:
                items = sse_items(stream)
                async for item in items:
                    seen.append(item)
                    if item.get("comment") == "heartbeat":
                        break
                second = await http.get(f"/tasks/{task_id}/events", headers=as_("alice"))
                assert second.status_code == 429
                assert second.headers["content-type"] == PROBLEM_JSON
                assert "TASK_EVENTS_CLIENT_LIMIT" in second.json()["detail"]

                process.send_signal(signal.SIGTERM)
                # The stream ends, cleanly (a complete chunked body: httpx raises otherwise),
                # before the drain's deadline, though the task is still queued.
                async with asyncio.timeout(GRACEFUL_TIMEOUT):
                    seen.extend([item async for item in items])
            exit_code = await asyncio.to_thread(process.wait, GRACEFUL_TIMEOUT)
        assert [e["event"] for e in seen if "event" in e] == ["queued"]
        assert exit_code == 0
        assert "Error in ASGI Framework" not in output(process)
