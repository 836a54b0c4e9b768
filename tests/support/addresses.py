"""E-mail addresses that test the rule of sameness (service/emails.py): the cases by kind, and a
Hypothesis strategy that mixes their characters."""

from __future__ import annotations

from hypothesis import strategies as st

# (one address, another, whether they are one address, the kind of case)
PAIRS: list[tuple[str, str, bool, str]] = [
    ("λογος@example.com", "ΛΟΓΟΣ@example.com", True, "Greek final sigma"),
    ("λογος@example.com", "λογοσ@example.com", True, "final and medial sigma"),
    ("µ@example.com", "μ@example.com", True, "micro sign and mu"),
    ("µ@example.com", "Μ@example.com", True, "micro sign and capital mu"),
    ("ſam@example.com", "SAM@example.com", True, "long s"),
    ("İlker@example.com", "ilker@example.com", False, "dotted capital I is not i"),
    ("İlker@example.com", "i\u0307lker@example.com", True, "dotted capital I is i + dot"),
    ("ILKER@example.com", "ilker@example.com", True, "capital I is i"),
    ("ılker@example.com", "ilker@example.com", False, "dotless i is not i"),
    ("ǅemal@example.com", "ǆemal@example.com", True, "titlecase ǅ"),
    ("Ǆemal@example.com", "ǅemal@example.com", True, "capital Ǆ"),
    ("x@ǅemal.example", "x@džemal.example", True, "ǅ in a domain (IDNA maps it)"),
    ("bob@xn--mnchen-3ya.de", "bob@münchen.de", True, "punycode and Unicode domain"),
    ("bob@MÜNCHEN.DE", "bob@xn--mnchen-3ya.de", True, "capital Unicode domain"),
    ("ann@İzmir.example", "ann@i\u0307zmir.example", True, "dotted I in a domain"),
    ("ann@İzmir.example", "ann@izmir.example", False, "dotted I in a domain is not i"),
    ("ada@ｅｘａｍｐｌｅ.com", "ada@example.com", True, "full-width letters in a domain"),
    ("ＡＤＡ@example.com", "ａｄａ@example.com", True, "full-width capital and small letters"),
    ("ａｄａ@example.com", "ada@example.com", False, "full-width letters are not ASCII"),
    ("ada@example。com", "ada@example.com", True, "ideographic full stop as a dot"),
    ("ada@example．com", "ada@example.com", True, "full-width full stop as a dot"),
    ("ame\u0301lie@example.com", "amélie@example.com", True, "decomposed accent"),
    ("AME\u0301LIE@example.com", "amélie@example.com", True, "decomposed capital accent"),
    ("ada@cafe\u0301.fr", "ada@café.fr", True, "decomposed accent in a domain"),
    ("straße@example.com", "STRASSE@example.com", True, "ß folds to ss"),
    ("straße@example.com", "STRAẞE@example.com", True, "capital ẞ folds to ss"),
    ("a@fuß.de", "a@fuss.de", False, "ß in a domain is IDNA 2008's own letter"),
    ("\u212aarl@example.com", "karl@example.com", True, "Kelvin sign is k"),
    ("\ufb01le@example.com", "FILE@example.com", True, "fi ligature folds to fi"),
    ("\u1fb3@example.com", "\u03b1\u0345@example.com", True, "ypogegrammeni, composed or not"),
    ("Grace.Hopper@Example.com", "grace.hopper@EXAMPLE.COM", True, "ASCII case"),
]

# Pieces of the part before the @ whose case, composition or width differ: each of the cases
# above, spelled several ways, plus the separators an address may hold.
LOCAL_PIECES = [
    "a", "A", "s", "S", "ſ", "ß", "ẞ", "ss", "SS", "σ", "ς", "Σ", "µ", "μ", "Μ",
    "i", "I", "İ", "ı", "i\u0307", "ǅ", "ǆ", "Ǆ", "dž", "é", "e\u0301", "É", "E\u0301",
    "Ａ", "ａ", "k", "K", "\u212a", "ﬁ", "fi", "FI", "ᾳ", "α\u0345", "ΑΙ", ".", "+", "-",
]  # fmt: skip
# Domains written several ways, one refused (special-use) so that a 422 meets a 422.
DOMAINS = [
    "example.com", "EXAMPLE.COM", "ｅｘａｍｐｌｅ.com", "example。com", "münchen.de",
    "MÜNCHEN.DE", "xn--mnchen-3ya.de", "mu\u0308nchen.de", "fuß.de", "fuss.de", "FUSS.DE",
    "İzmir.example", "i\u0307zmir.example", "izmir.example", "ǅemal.example", "džemal.example",
    "example.test",
]  # fmt: skip

ADDRESSES = st.builds(
    lambda pieces, domain: "".join(pieces) + "@" + domain,
    st.lists(st.sampled_from(LOCAL_PIECES), min_size=1, max_size=4),
    st.sampled_from(DOMAINS),
)
