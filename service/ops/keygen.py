"""``python -m service keygen``: a new API key, and its ``API_KEYS`` entry.

A key is 32 random bytes (``secrets.token_urlsafe``); the configuration holds only its SHA-256
(service/config.py reads the entries), so the key itself is shown once, here, and kept by the
client. Needs no settings: it must work before the service can start (production needs a key).
"""

from __future__ import annotations

import hashlib
import secrets
import sys

from service.config import parse_api_keys

KEY_PREFIX = "qsk_"


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as written in ``API_KEYS``."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key; the prefix lets secret scanners recognise a leaked one."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, scopes: tuple[str, ...]) -> str:
    """The ``API_KEYS`` entry for ``key``: ``name:sha256hex:scope+scope``."""
    return f"{name}:{hash_key(key)}:{'+'.join(scopes)}"


def main(name: str, scopes_text: str) -> int:
    """Print a new key and its entry; 2 (and why) when the name or the scopes are refused."""
    scopes = tuple(scope.strip() for scope in scopes_text.split(",") if scope.strip())
    key = generate_key()
    entry = key_entry(name, key, scopes)
    try:
        parse_api_keys(entry)
    except ValueError as error:
        print(f"keygen: {error}", file=sys.stderr)
        return 2
    print(f"API key (give it to the client; it is shown only once):\n  {key}")
    print("Add this entry to API_KEYS (comma-separated with any others):")
    print(f"  API_KEYS={entry}")
    return 0
