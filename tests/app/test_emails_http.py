"""One address, one user, through the routes (in-process, real PostgreSQL): for each case of
the rule (tests/support/addresses.py), POST and PATCH conflict exactly when the lookup finds
the user; and a Hypothesis property over generated addresses, 409 if and only if found."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from tests.support.addresses import ADDRESSES, PAIRS


async def lookup(client: Client, address: str) -> tuple[int, list[dict[str, Any]]]:
    response = await client.get("/users", query_string={"email": address})
    body = await response.get_json()
    return response.status_code, body.get("users", [])


async def create(client: Client, address: str, name: str = "N") -> tuple[int, dict[str, Any]]:
    response = await client.post("/users", json={"email": address, "name": name})
    return response.status_code, await response.get_json()


@pytest.mark.parametrize(
    ("first", "second", "same", "kind"), PAIRS, ids=[pair[3] for pair in PAIRS]
)
async def test_post_and_patch_conflict_exactly_when_the_lookup_finds_the_user(
    client: Client, first: str, second: str, same: bool, kind: str
) -> None:
    status, user = await create(client, first)
    assert status == 201, user
    assert await lookup(client, first) == (200, [user])

    assert await lookup(client, second) == (200, [user] if same else [])
    status, other = await create(client, second)
    assert status == (409 if same else 201), other
    if not same:
        assert await lookup(client, second) == (200, [other])
        assert await lookup(client, first) == (200, [user])

    # Changing another user's e-mail to it conflicts too; the owner may respell its own.
    _, third = await create(client, "third.user@example.org")
    clash = await client.patch(f"/users/{third['id']}", json={"email": second})
    assert clash.status_code == 409
    if same:
        respelled = await client.patch(f"/users/{user['id']}", json={"email": second})
        assert respelled.status_code == 200
        assert (await lookup(client, first))[1][0]["id"] == user["id"]


@pytest.mark.parametrize("address", ["not-an-address", "a@example.test", "a@b"])
async def test_a_lookup_of_what_is_not_an_address_is_the_same_422_as_a_post(
    client: Client, address: str
) -> None:
    looked = await client.get("/users", query_string={"email": address})
    posted = await client.post("/users", json={"email": address, "name": "N"})
    assert looked.status_code == posted.status_code == 422
    assert (await looked.get_json())["errors"][0]["loc"] == ["email"]
    assert "not a valid email address" in (await looked.get_json())["errors"][0]["msg"]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(addresses=st.lists(ADDRESSES, min_size=1, max_size=8))
async def test_409_if_and_only_if_the_lookup_finds_a_user(
    client: Client, db: asyncpg.Connection, addresses: list[str]
) -> None:
    await db.execute("TRUNCATE users")  # each example from an empty table
    for address in addresses:
        looked, found = await lookup(client, address)
        status, body = await create(client, address)
        # The same rules on both paths: refused by both, or judged by the same key.
        assert (looked == 422) == (status == 422), (address, looked, status)
        if status == 422:
            continue
        assert len(found) <= 1
        assert (status == 409) == bool(found), (address, found, body)
        if status == 201:
            assert await lookup(client, address) == (200, [body])
