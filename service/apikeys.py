"""API keys: how they are made, written in configuration (as hashes), and parsed.

A key is 32 random bytes (``secrets.token_urlsafe``), so an unsalted SHA-256 of it cannot be
reversed or guessed; the configuration holds only that hash, never the key. This module imports
nothing from the service so the settings can use it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "qsk_"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: a name (for logs and rate limits), its SHA-256 digest, its scopes."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as written in ``API_KEYS``."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key; the prefix lets secret scanners recognise a leaked one."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, scopes: tuple[str, ...]) -> str:
    """The ``API_KEYS`` entry for ``key``: ``name:sha256hex:scope+scope``."""
    return f"{name}:{hash_key(key)}:{'+'.join(scopes)}"


def format_api_keys(keys: tuple[ApiKey, ...]) -> str:
    """The ``API_KEYS`` text of parsed keys: the inverse of :func:`parse_api_keys`."""
    return ",".join(
        f"{key.name}:{key.digest.hex()}:{'+'.join(s for s in SCOPES if s in key.scopes)}"
        for key in keys
    )


def parse_api_keys(value: str) -> tuple[ApiKey, ...]:
    """Parse ``API_KEYS``: comma-separated ``name:sha256hex:scope+scope`` entries.

    Raises ValueError saying which entry is wrong (by position and name, never echoing a hash).
    """
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for position, raw in enumerate(value.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"entry {position} is not name:sha256hex:scope+scope")
        name, digest, scope_text = (part.strip() for part in parts)
        if not _NAME.fullmatch(name):
            raise ValueError(f"entry {position}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        if name in seen:
            raise ValueError(f"entry {position}: the name {name!r} is used twice")
        if not _HEX.fullmatch(digest.lower()):
            raise ValueError(
                f"entry {position} ({name}): the hash must be 64 hex digits (SHA-256 of the key)"
            )
        scopes = frozenset(scope.strip() for scope in scope_text.split("+") if scope.strip())
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise ValueError(
                f"entry {position} ({name}): scopes must be some of {'+'.join(SCOPES)}"
            )
        seen.add(name)
        keys.append(ApiKey(name=name, digest=bytes.fromhex(digest), scopes=scopes))
    return tuple(keys)
