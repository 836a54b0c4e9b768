"""The users resource: the Flask app's e-mail lookup, plus create, read, change, delete, list."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Self

import asyncpg
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)
from quart import Blueprint, Response
from quart_schema import document_response, validate_request

from service.backends.db import load_queries
from service.emails import email_key, key_of
from service.errors import APIError, invalid
from service.framework.resources import connection
from service.routes.openapi import LocationHeader
from service.routes.querystring import validate_query

blueprint = Blueprint("users", __name__)
queries = load_queries("users")

# Ids are bigint; anything larger cannot exist, so it is a 404 rather than a database error.
MAX_ID = 2**63 - 1

Email = Annotated[
    EmailStr,
    Field(
        max_length=254,
        description="An address that can receive mail: special-use domains (.test, .local, "
        ".invalid, .localhost, .onion, .arpa) and IP-address domains are refused. One user "
        "per address in any case: the part before the @ under Unicode case folding, the "
        "domain as IDNA maps it (docs/api.md, 'Any case').",
    ),
]
# PostgreSQL text cannot hold a NUL character: refused here, as a 422, not by the database.
NO_NUL = r"^[^\x00]*$"
# The lookup's address, validated as Email is and turned into its key (service/emails.py): the
# field then holds the key, which is what the query needs.
EmailKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=254,
        pattern=NO_NUL,
        json_schema_extra={"format": "email"},
        description="An e-mail address, found in any case: the same address as the one "
        "stored under Unicode case folding of the part before the @, the domain as IDNA maps "
        "it (docs/api.md, 'Any case').",
    ),
    AfterValidator(key_of),
]
# Whitespace (every character Python's str.strip removes, and a few invisible ones) and NUL.
_BLANK = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
# A name holds at least one visible character and no NUL. The limits apply to the name as sent
# (so they are exactly what the OpenAPI description says); surrounding whitespace is then
# removed before it is stored.
Name = Annotated[
    str,
    StringConstraints(max_length=200, pattern=rf"^[^\x00]*[^{_BLANK}][^\x00]*$"),
    AfterValidator(str.strip),
]


class User(BaseModel):
    id: int
    email: str
    name: str
    created_at: datetime
    updated_at: datetime


class UserList(BaseModel):
    users: list[User]
    next: str | None = Field(
        default=None, description="Cursor for the next page (pass as `after`); null at the end."
    )


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    name: Name


def _changes_schema(schema: dict[str, Any]) -> None:
    # Either field may be left out but neither may be null, and at least one must be given:
    # the description says so, rather than promising that `{}` or a null is accepted.
    schema["minProperties"] = 1
    for field in schema.get("properties", {}).values():
        choices = field.pop("anyOf", None)
        if choices:
            field.update(next(choice for choice in choices if choice.get("type") != "null"))


class UserChanges(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_changes_schema)

    email: Email | None = None
    name: Name | None = None

    @model_validator(mode="after")
    def _some_change(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("give at least one of email, name")
        for field in self.model_fields_set:
            if getattr(self, field) is None:
                raise ValueError(f"{field} may not be null")
        return self


class UsersQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailKey | None = None
    limit: int = Field(default=20, ge=1, le=100, description="Page size (keyset pagination).")
    after: str | None = Field(
        default=None, max_length=64, description="The `next` cursor of the previous page."
    )


def _user_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "email": row["email"],
        "name": row["name"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def encode_cursor(last_id: int) -> str:
    """An opaque cursor: clients pass it back, they do not build it."""
    return base64.urlsafe_b64encode(f"u1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        last_id = int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        last_id = -1
        prefix = ""
    if prefix != "u1" or not 0 <= last_id <= MAX_ID:
        raise invalid(
            "The cursor is not one this service issued.", ["query", "after"], "invalid cursor"
        )
    return last_id


def _not_found(user_id: int) -> APIError:
    return APIError(404, f"No user with id {user_id}.")


def _duplicate(email: str) -> APIError:
    return APIError(409, f"A user with the e-mail {email!r} already exists.", title="Conflict")


@blueprint.get("/users")
@validate_query(UsersQuery)
@document_response(UserList)
async def list_users(query_args: UsersQuery) -> dict[str, Any]:
    """Find users by e-mail (`?email=`, in any case, zero or one user), or page through all
    users in id order (`?limit=&after=`)."""
    async with connection() as conn:
        if query_args.email is not None:
            rows = [
                row async for row in queries.find_users_by_email(conn, email_key=query_args.email)
            ]
            return {"users": [_user_json(row) for row in rows], "next": None}
        after_id = decode_cursor(query_args.after) if query_args.after else 0
        rows = [
            row
            async for row in queries.list_users_after(
                conn, after_id=after_id, limit=query_args.limit
            )
        ]
    next_cursor = encode_cursor(rows[-1]["id"]) if len(rows) == query_args.limit else None
    return {"users": [_user_json(row) for row in rows], "next": next_cursor}


@blueprint.post("/users")
@validate_request(NewUser)
@document_response(User, 201, LocationHeader)
async def create_user(data: NewUser) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Create a user. An e-mail already taken (in any case) is a 409."""
    async with connection() as conn:
        try:
            row = await queries.create_user(
                conn, email=data.email, email_key=email_key(data.email), name=data.name
            )
        except asyncpg.UniqueViolationError:
            raise _duplicate(data.email) from None
    return _user_json(row), 201, {"Location": f"/users/{row['id']}"}


@blueprint.get("/users/<int:user_id>")
@document_response(User)
async def get_user(user_id: int) -> dict[str, Any]:
    """One user by id."""
    if user_id > MAX_ID:
        raise _not_found(user_id)
    async with connection() as conn:
        row = await queries.get_user_by_id(conn, id=user_id)
    if row is None:
        raise _not_found(user_id)
    return _user_json(row)


@blueprint.patch("/users/<int:user_id>")
@validate_request(UserChanges)
@document_response(User)
async def update_user(user_id: int, data: UserChanges) -> dict[str, Any]:
    """Change a user's e-mail or name. An e-mail taken by another user (in any case) is a
    409."""
    if user_id > MAX_ID:
        raise _not_found(user_id)
    key = email_key(data.email) if data.email is not None else None
    async with connection() as conn:
        try:
            row = await queries.update_user(
                conn, id=user_id, email=data.email, email_key=key, name=data.name
            )
        except asyncpg.UniqueViolationError:
            raise _duplicate(str(data.email)) from None
    if row is None:
        raise _not_found(user_id)
    return _user_json(row)


@blueprint.delete("/users/<int:user_id>")
async def delete_user(user_id: int) -> Response:
    """Delete a user."""
    if user_id > MAX_ID:
        raise _not_found(user_id)
    async with connection() as conn:
        deleted = await queries.delete_user(conn, id=user_id)
    if deleted is None:
        raise _not_found(user_id)
    response = Response(status=204)
    # A 204 has no content, so no content type (Quart would send text/html).
    del response.headers["Content-Type"]
    return response
