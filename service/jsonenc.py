"""JSON encoding with the encoder built once, for what is encoded on every request: the
request's log line and its JSON response body."""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any


def compact_encoder(
    default: Callable[[Any], Any], separators: tuple[str, str], sort_keys: bool = False
) -> Callable[[Any], str]:
    """A JSON encoding function, ``obj -> str``, with the output of ``json.dumps(obj,
    default=default, separators=separators, sort_keys=sort_keys)`` (ASCII), built once.

    ``json.dumps`` and ``JSONEncoder.encode`` build a new C encoder for every call; this one is
    built here and reused. It does not check for circular references (``check_circular``):
    what it encodes is log fields and response bodies, which are trees; a cycle ends in a
    RecursionError rather than a ValueError.
    """
    item_separator, key_separator = separators
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator in this Python: the library's own path
        encoder = json.JSONEncoder(default=default, separators=separators, sort_keys=sort_keys)
        return encoder.encode
    encode = make(
        None, default, json.encoder.encode_basestring_ascii, None, key_separator,
        item_separator, sort_keys, False, True,
    )  # fmt: skip

    def dumps(obj: Any) -> str:
        return "".join(encode(obj, 0))

    return dumps
