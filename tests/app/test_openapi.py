"""The OpenAPI description: every problem response documented (service/routes/openapi.py)."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings, load_settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry


async def description(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = await response.get_json()
    return body


async def test_every_operation_documents_its_problem_responses(client: Client) -> None:
    paths = (await description(client))["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path in ("/healthz", "/readyz"):
                continue
            for status in ("401", "403", "429", "503"):
                assert PROBLEM_JSON in responses[status]["content"], (method, path, status)
            if "{" in path:
                assert "404" in responses, (method, path)
            if method in ("post", "patch"):
                assert {"400", "413", "415", "422"} <= responses.keys(), (method, path)
                assert operation["requestBody"]["required"] is True


async def test_retry_after_is_a_required_header_of_503_and_429(client: Client) -> None:
    paths = (await description(client))["paths"]
    responses = paths["/tasks"]["post"]["responses"]
    for status in ("429", "503"):
        assert responses[status]["headers"]["Retry-After"]["required"] is True


async def test_response_headers_are_documented_as_headers_not_as_a_media_type(
    client: Client,
) -> None:
    # quart-schema writes them under `content`, as if "headers" were a media type.
    created = (await description(client))["paths"]["/users"]["post"]["responses"]["201"]
    assert "headers" not in created["content"]
    assert created["headers"]["Location"]["required"] is True


async def test_delete_documents_its_204(client: Client) -> None:
    responses = (await description(client))["paths"]["/users/{user_id}"]["delete"]["responses"]
    assert "204" in responses


async def test_the_problem_schema_describes_the_bodies(client: Client) -> None:
    document = await description(client)
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    body = await (await client.get("/users/0")).get_json()
    assert set(problem["required"]) <= body.keys() <= set(problem["properties"])


async def test_the_bearer_scheme_is_declared_only_when_keys_are_configured(
    client: Client, settings: Settings
) -> None:
    open_document = await description(client)
    assert "security" not in open_document
    assert "securitySchemes" not in open_document["components"]

    key = generate_key()
    closed = create_app(
        load_settings(**{**settings.model_dump(), "api_keys": key_entry("ops", key, ("admin",))})
    )
    async with closed.test_app() as test_app:
        response = await test_app.test_client().get(
            "/openapi.json", headers={"Authorization": f"Bearer {key}"}
        )
        document = await response.get_json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["security"] == [{"apiKey": []}]
    # The probes need no key.
    assert document["paths"]["/healthz"]["get"]["security"] == []
    assert document["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in document["paths"]["/users"]["get"]


async def test_the_description_is_valid_openapi(client: Client) -> None:
    validate(await description(client))  # raises OpenAPIValidationError naming what is wrong


async def test_operation_ids_are_the_handlers_names_and_each_operation_has_its_tag(
    client: Client,
) -> None:
    document = await description(client)
    operations = {
        (method, path): operation
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    ids = [operation["operationId"] for operation in operations.values()]
    assert len(ids) == len(set(ids))
    assert operations[("get", "/users/{user_id}")]["operationId"] == "get_user"
    assert operations[("post", "/tasks")]["operationId"] == "create_task"
    # No method repeated in front of a name that already starts with it (get_get_user).
    assert not [
        name for name in ids if len(name.split("_")) > 1 and len(set(name.split("_")[:2])) == 1
    ]
    assert operations[("get", "/users/{user_id}")]["tags"] == ["users"]
    assert operations[("get", "/heavy-task")]["tags"] == ["tasks"]
    assert operations[("get", "/expensive-operation")]["tags"] == ["reports"]
    assert operations[("get", "/readyz")]["tags"] == ["health"]
    assert {tag["name"] for tag in document["tags"]} == {"users", "tasks", "reports", "health"}


async def test_the_description_names_its_servers_and_license(client: Client) -> None:
    document = await description(client)
    assert document["servers"][0]["url"] == "/"
    assert document["info"]["license"]["name"]
