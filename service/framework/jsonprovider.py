"""The app's JSON provider: quart-schema's, with the response body encoded by one encoder."""

from __future__ import annotations

import json
from typing import Any

from quart import Quart


def compact_json(app: Quart) -> Any:
    """quart-schema's JSON provider (its ``default`` knows pydantic models) with the response
    body encoded by one encoder object: ``jsonify`` and every returned dict go through
    ``dumps(obj, separators=(",", ":"))``, for which ``json.dumps`` makes a new ``JSONEncoder``
    per call (18k of the 2.4M instructions of a users lookup, bench/instructions.py). The
    output is the same, keys sorted as Quart sorts them."""
    base: Any = type(app.json)
    encoder = json.JSONEncoder(default=base.default, separators=(",", ":"), sort_keys=True)

    class CompactJSONProvider(base):  # type: ignore[misc]
        _compact = staticmethod(encoder.encode)

        def dumps(self, obj: Any, **kwargs: Any) -> str:
            if kwargs == _COMPACT and self.ensure_ascii and self.sort_keys:
                return self._compact(obj)
            return str(super().dumps(obj, **kwargs))

    return CompactJSONProvider(app)


_COMPACT = {"separators": (",", ":")}
