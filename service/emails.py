"""When two e-mail addresses are the same address: the one rule every users path applies.

An address is stored as email-validator normalizes it (what pydantic's ``EmailStr`` returns, and
what clients get back): the part before the @ in Unicode NFC, the domain mapped by IDNA (UTS #46,
nontransitional: lower case, full-width letters and ideographic full stops made ASCII letters
and dots, punycode labels decoded to Unicode). Two addresses are the same when their *keys* are
equal. The key is the stored form with the part before the @ under Unicode canonical caseless
matching (the Unicode Standard, definition D145: full case folding between canonical
decompositions), written in NFC; the domain stays as IDNA mapped it. So ``ΛΟΓΟΣ``, ``λογος`` and
``λογοσ`` are one mailbox name, as are ``µ`` (micro sign) and ``μ``, ``ſ`` and ``s``, ``ǅ`` and
``ǆ``, ``ß``, ``ẞ`` and ``ss`` (full folding, as ``STRASSE`` is the capital of ``straße``); ``İ``
folds to ``i`` with a combining dot, so ``İlker`` and ``ilker`` are two. In a domain IDNA
decides, and IDNA 2008 keeps ``ß`` and ``ς`` as letters of their own: ``fuß.de`` and
``fuss.de`` are two domains.

The ``users.email_key`` column holds the key, with the unique index: POST, PATCH and the
lookup (``GET /users?email=``) all compute it here, and the migration that added the column
(sql/migrations/0003_users_email_key.py) computed it here for the rows that existed.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

__all__ = ["email_key", "fold", "key_of", "normalize"]


def fold(text: str) -> str:
    """``text`` under canonical caseless matching, in NFC.

    D145 compares ``NFD(casefold(NFD(x)))``; the inner NFD matters for characters whose folding
    is not closed under composition (U+0345 in ``ᾳ``). NFC of that is equal exactly when the
    NFD forms are, and is shorter.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def normalize(address: str) -> str:
    """The address as the service stores it; a ``PydanticCustomError`` (as ``EmailStr`` raises)
    when the service would not accept it."""
    return validate_email(address)[1]


def email_key(stored: str) -> str:
    """The key of an address in its stored (normalized) form: see the module's docstring."""
    local, _, domain = stored.rpartition("@")
    return f"{fold(local)}@{domain}"


# A dot-atom of ASCII (RFC 5322 atext, email-validator's own class) at a domain of ASCII
# letters, digits, hyphens and dots: the common shape, for which email-validator's result is
# known without running it (see _plain_key).
_ATEXT = r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]"
_PLAIN = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@([a-zA-Z0-9\-]+(?:\.[a-zA-Z0-9\-]+)+)")
# More than any real mix of domains looked up at once; a flood of new ones only costs misses.
_DOMAINS_REMEMBERED = 4096


@lru_cache(maxsize=_DOMAINS_REMEMBERED)
def _domain_accepted(domain: str) -> bool:
    try:
        validate_email(f"a@{domain}")
    except PydanticCustomError:
        return False
    return True


def _plain_key(address: str) -> str | None:
    """The key of an address of the common shape, or None to leave it to :func:`normalize`.

    For such an address email-validator keeps the part before the @ as it is (lower-casing
    ``postmaster`` and the like, which the key does anyway), lower-cases the domain, and its
    verdict on the domain depends on the domain alone (special-use names, top-level domain,
    label rules and lengths). So the key is the address in lower case once the domain has been
    accepted, which is remembered per domain: the full validation costs about 70 µs, a tenth
    of a lookup, and a lookup's domains repeat. Punycode labels (``xn--``) are decoded by the
    full path. tests/app/test_emails.py holds this equal to the full path, key and verdict.
    """
    match = _PLAIN.fullmatch(address)
    if match is None or len(address) > 254:
        return None
    domain = match.group(1).lower()
    if "xn--" in domain or not _domain_accepted(domain):
        return None
    return address.lower()


def key_of(address: str) -> str:
    """The key of an address as a client sends it; a ``PydanticCustomError`` (as ``EmailStr``
    raises) when the service would not accept the address."""
    key = _plain_key(address)
    if key is not None:
        return key
    return email_key(normalize(address))
