"""Query-string validation for the routes: quart-schema's ``validate_querystring``, without a
pydantic ``TypeAdapter`` built for every request.

quart-schema (0.21/0.22) validates with ``TypeAdapter(model).validate_python(...)`` on each
call; for a ``BaseModel`` that builds the adapter afresh every time, one of the larger costs of
a ``GET /users?email=`` (bench/README.md). Here the model's own validator, built once with the
class, does the same validation. The OpenAPI description comes from quart-schema's
``document_querystring``, and a failure raises quart-schema's ``QuerystringValidationError``,
so the 422 problem+json and the docs are exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from quart import request
from quart_schema import document_querystring
from quart_schema.validation import QuerystringValidationError

from service.errors import APIError

Model = TypeVar("Model", bound=BaseModel)
View = TypeVar("View", bound=Callable[..., Any])


def query_arguments() -> dict[str, Any]:
    """The query string as quart-schema reads it: a key given more than once (or ending in
    ``[]``) becomes a list, any other a string. A 400 when it is not UTF-8."""
    # Werkzeug decodes percent-escapes that are not UTF-8 as U+FFFD, so `?email=%ff` would
    # be searched for as "\ufffd": refused instead, as a body that is not UTF-8 is.
    query = request.query_string
    try:
        if b"%" in query or not query.isascii():  # plain ASCII decodes as it is
            unquote_to_bytes(query).decode()
    except UnicodeDecodeError:
        raise APIError(400, "The query string is not valid UTF-8 once percent-decoded.") from None
    found: dict[str, Any] = {}
    for key, values in request.args.lists():
        if key.endswith("[]"):
            found[key.removesuffix("[]")] = values
        else:
            found[key] = values if len(values) > 1 else values[0]
    return found


def validate_query(model: type[Model]) -> Callable[[View], View]:
    """Validate the query string against ``model`` and pass it as ``query_args``."""

    def decorator(func: View) -> View:
        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                query = model.model_validate(query_arguments())
            except (TypeError, ValueError, PydanticValidationError) as error:
                raise QuerystringValidationError(error) from None
            return await func(*args, query_args=query, **kwargs)

        return cast(View, document_querystring(model)(wrapper))

    return decorator
