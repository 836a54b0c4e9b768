"""The rule of sameness (service/emails.py) on its own: the issue's examples and their kind, and
the lookup's fast path held equal to email-validator's full path."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from service.emails import email_key, fold, key_of, normalize
from tests.support.addresses import PAIRS


@pytest.mark.parametrize(
    ("first", "second", "same", "kind"), PAIRS, ids=[pair[3] for pair in PAIRS]
)
def test_two_addresses_are_one_exactly_when_their_keys_are_equal(
    first: str, second: str, same: bool, kind: str
) -> None:
    assert (key_of(first) == key_of(second)) is same, (key_of(first), key_of(second))


def test_the_key_is_canonical_caseless_matching_d145() -> None:
    # The Unicode Standard's canonical caseless match: NFD(casefold(NFD(x))); the key is its
    # NFC, which is equal exactly when the NFD forms are.
    for local in ("ᾳ", "ΣΑΣ", "Straße", "İ", "ǅ", "Ω", "Å", "e\u0301", "\u212b"):
        expected = unicodedata.normalize("NFD", unicodedata.normalize("NFD", local).casefold())
        assert unicodedata.normalize("NFD", fold(local)) == expected
        assert fold(local) == unicodedata.normalize("NFC", fold(local))


def test_the_stored_form_keeps_the_case_and_the_key_folds_it() -> None:
    stored = normalize("ΛΟΓΟΣ@EXAMPLE.COM")
    assert stored == "ΛΟΓΟΣ@example.com"  # what the user gets back: their own spelling
    assert email_key(stored) == "λογοσ@example.com"
    assert normalize("bob@xn--mnchen-3ya.de") == "bob@münchen.de"


@pytest.mark.parametrize(
    "address", ["not-an-address", "a@b", "a@example.test", "a@[127.0.0.1]", '"a b"@example.com']
)
def test_an_address_the_service_refuses_has_no_key(address: str) -> None:
    with pytest.raises(PydanticCustomError):
        key_of(address)


# ASCII addresses that the fast path takes (or leaves to the full path): dots, case, digits,
# hyphens, every atext symbol, special-use and numeric top-level domains, punycode labels, and
# lengths around the limits.
_ATOM = st.text("aZ09_-+!#$%&'*/=?^`{|}~", min_size=1, max_size=12)
_LOCAL = (
    st.lists(_ATOM, min_size=1, max_size=4).map(".".join)  # a dot-atom
    | st.text("aZ09._-+", min_size=0, max_size=70)  # dots anywhere, empty, over 64
    | st.sampled_from(["postmaster", "Abuse", "a" * 200])
)
_LABEL = st.text("aZ09", min_size=1, max_size=8) | st.sampled_from(
    ["a-b", "xn--mnchen-3ya", "XN--MNCHEN-3YA", "ab--cd", "a" * 63, "a" * 64, "-a", "a-", "9"]
)
_TLD = st.sampled_from(["com", "COM", "de", "io", "test", "local", "invalid", "arpa", "123", "x"])
_DOMAIN = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(_LABEL, min_size=0, max_size=4), _TLD
)
ASCII_ADDRESSES = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)


def _full_path(address: str) -> str | None:
    try:
        return email_key(normalize(address))
    except PydanticCustomError:
        return None


def _fast_or_full(address: str) -> str | None:
    try:
        return key_of(address)
    except PydanticCustomError:
        return None


# No deadline and no too_slow health check: how long generating and checking take depends on
# the machine (a busy one is slower), not on the code.
@settings(
    max_examples=1000,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(address=ASCII_ADDRESSES)
def test_the_fast_path_gives_the_full_paths_key_and_verdict(address: str) -> None:
    assert _fast_or_full(address) == _full_path(address)


def test_the_fast_path_is_taken_for_the_common_shape() -> None:
    from service import emails

    emails._domain_accepted.cache_clear()
    assert key_of("User49999@Example.com") == "user49999@example.com"
    assert key_of("user1@example.com") == "user1@example.com"
    assert emails._domain_accepted.cache_info().hits == 1  # one domain, asked once
