"""The users resource against a real PostgreSQL, with the app's serving hooks running."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from quart.typing import TestClientProtocol as Client

from service.errors import PROBLEM_JSON
from service.routes.users import encode_cursor


async def make_user(client: Client, email: str, name: str = "Ada") -> dict[str, Any]:
    response = await client.post("/users", json={"email": email, "name": name})
    assert response.status_code == 201, await response.get_data()
    body: dict[str, Any] = await response.get_json()
    return body


async def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, await response.get_data()
    assert response.content_type == PROBLEM_JSON
    body: dict[str, Any] = await response.get_json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert "Traceback" not in await response.get_data(as_text=True)
    return body


async def test_create_returns_201_with_location_and_the_user(client: Client) -> None:
    response = await client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
    assert response.status_code == 201
    body = await response.get_json()
    assert response.headers["Location"] == f"/users/{body['id']}"
    assert body["email"] == "ada@example.com"
    assert body["name"] == "Ada"
    fetched = await client.get(response.headers["Location"])
    assert await fetched.get_json() == body


async def test_lookup_by_email_ignores_case_and_keeps_the_flask_shape(
    client: Client,
) -> None:
    user = await make_user(client, "Grace.Hopper@Example.com", "Grace")
    await make_user(client, "other@example.com")
    response = await client.get("/users", query_string={"email": "grace.hopper@EXAMPLE.com"})
    assert response.status_code == 200
    body = await response.get_json()
    assert body["users"] == [user]
    missing = await client.get("/users", query_string={"email": "nobody@example.com"})
    assert (await missing.get_json())["users"] == []


async def test_patch_changes_only_given_fields(client: Client) -> None:
    user = await make_user(client, "linus@example.com", "Linus")
    response = await client.patch(f"/users/{user['id']}", json={"name": "Linus T"})
    assert response.status_code == 200
    body = await response.get_json()
    assert body["name"] == "Linus T"
    assert body["email"] == "linus@example.com"
    assert body["updated_at"] >= user["updated_at"]


async def test_delete_then_gone(client: Client) -> None:
    user = await make_user(client, "gone@example.com")
    response = await client.delete(f"/users/{user['id']}")
    assert response.status_code == 204
    assert await response.get_data() == b""
    await assert_problem(await client.get(f"/users/{user['id']}"), 404)
    await assert_problem(await client.delete(f"/users/{user['id']}"), 404)


async def test_keyset_pagination_walks_every_user_once(client: Client) -> None:
    created = [await make_user(client, f"u{i}@example.com", f"U{i}") for i in range(7)]
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        query: dict[str, Any] = {"limit": 3}
        if cursor:
            query["after"] = cursor
        body = await (await client.get("/users", query_string=query)).get_json()
        seen += [user["id"] for user in body["users"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == [user["id"] for user in created]
    assert pages == 3


async def test_duplicate_email_in_any_case_is_409(client: Client) -> None:
    await make_user(client, "dup@example.com")
    response = await client.post("/users", json={"email": "DUP@example.com", "name": "B"})
    await assert_problem(response, 409)
    other = await make_user(client, "other@example.com")
    clash = await client.patch(f"/users/{other['id']}", json={"email": "Dup@Example.com"})
    await assert_problem(clash, 409)


async def test_concurrent_creates_of_one_email_give_one_201_and_409s(
    client: Client, db: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(
        *(
            client.post("/users", json={"email": "race@example.com", "name": f"R{i}"})
            for i in range(20)
        )
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] + [409] * 19
    assert await db.fetchval("SELECT count(*) FROM users") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "name": "A"}, "email"),
        ({"email": "a" * 245 + "@example.com", "name": "A"}, "email"),
        ({"email": "a@example.com", "name": "n" * 201}, "name"),
        ({"email": "a@example.com", "name": ""}, "name"),
        ({"email": "a@example.com"}, "name"),
        ({"name": "A"}, "email"),
        ({"email": "a@example.com", "name": "A", "admin": True}, "admin"),
        ({"email": 42, "name": "A"}, "email"),
        ({"email": "a@example.com", "name": ["A"]}, "name"),
    ],
)
async def test_invalid_new_user_is_422_naming_the_field(
    client: Client, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    problem = await assert_problem(await client.post("/users", json=body), 422)
    assert any(field in error["loc"] for error in problem["errors"]), problem
    assert await db.fetchval("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize(
    "body", [{}, {"email": None}, {"name": None}, {"name": "x", "role": "admin"}, []]
)
async def test_invalid_patch_is_422_and_changes_nothing(client: Client, body: Any) -> None:
    user = await make_user(client, "keep@example.com", "Keep")
    await assert_problem(await client.patch(f"/users/{user['id']}", json=body), 422)
    assert await (await client.get(f"/users/{user['id']}")).get_json() == user


async def test_malformed_json_is_400(client: Client) -> None:
    response = await client.post(
        "/users", data=b'{"email": "a@example.com", ', headers={"Content-Type": "application/json"}
    )
    await assert_problem(response, 400)


async def test_body_over_the_limit_is_413(client: Client) -> None:
    big = {"email": "a@example.com", "name": "x" * (70 * 1024)}
    await assert_problem(await client.post("/users", json=big), 413)


@pytest.mark.parametrize("path", ["/users/abc", "/users/-1", "/users/1.5", "/users/0", "/users/99"])
async def test_ids_that_name_no_user_are_404(client: Client, path: str) -> None:
    await assert_problem(await client.get(path), 404)


async def test_id_beyond_bigint_is_404_not_500(client: Client) -> None:
    await assert_problem(await client.get(f"/users/{2**64}"), 404)
    await assert_problem(await client.patch(f"/users/{2**64}", json={"name": "x"}), 404)


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"after": "not-a-cursor"},
        {"after": encode_cursor(5)[:-2] + "!!"},
        {"email": "x" * 300},
        {"colour": "blue"},
    ],
)
async def test_bad_list_query_is_422(client: Client, query: dict[str, str]) -> None:
    await assert_problem(await client.get("/users", query_string=query), 422)


async def test_unknown_route_is_404_and_wrong_method_405(client: Client) -> None:
    await assert_problem(await client.get("/nowhere"), 404)
    response = await client.put("/users")
    await assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_request_id_is_echoed_or_made(client: Client) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id <script>"})
    assert made.headers["X-Request-ID"] not in ("", "bad id <script>")
    assert len(made.headers["X-Request-ID"]) == 32


# Found by the fuzzer (tests/e2e/test_fuzz.py), kept as regular tests:


async def test_a_body_that_is_not_utf8_is_a_400_not_a_500(client: Client) -> None:
    for raw in (b"\xa3I\xff", b'{"email": "ada@example.com", "name": "\xff"}'):
        response = await client.post(
            "/users", data=raw, headers={"Content-Type": "application/json"}
        )
        await assert_problem(response, 400)


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/users", {"query_string": {"email": "ada\x00@example.com"}}),
        ("POST", "/users", {"json": {"email": "ada@example.com", "name": "A\x00da"}}),
    ],
)
async def test_a_nul_character_is_a_422_not_a_database_error(
    client: Client, method: str, path: str, payload: dict[str, Any]
) -> None:
    # PostgreSQL text cannot hold NUL: it must be refused before it reaches the database.
    await assert_problem(await client.open(path, method=method, **payload), 422)


async def test_patch_without_a_body_or_with_nulls_is_422_as_the_description_says(
    client: Client,
) -> None:
    user = await make_user(client, "ada@example.com")
    await assert_problem(await client.patch(f"/users/{user['id']}"), 422)
    await assert_problem(await client.patch(f"/users/{user['id']}", json={"email": None}), 422)
    description = await (await client.get("/openapi.json")).get_json()
    body = description["paths"]["/users/{user_id}"]["patch"]["requestBody"]
    assert body["required"] is True
    changes = body["content"]["application/json"]["schema"]
    assert changes["minProperties"] == 1
    assert "null" not in str(changes["properties"])


@pytest.mark.parametrize("name", ["\u00a0", " \t", "\u3000\u2003"])
async def test_a_name_of_whitespace_only_is_422_as_the_description_says(
    client: Client, name: str
) -> None:
    # A non-breaking space counts for the description's minLength but is stripped: refuse it.
    await assert_problem(await client.post("/users", json={"email": "a@b.com", "name": name}), 422)


async def test_a_name_is_stored_without_surrounding_whitespace(client: Client) -> None:
    assert (await make_user(client, "ada@example.com", "\u00a0 Ada \n"))["name"] == "Ada"
