import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.spiffe.spiffeid import MAX_ID_BYTES, SpiffeId, SpiffeIdError, TrustDomain

# Digest section 1.1, rows 1-9: valid, with the expected trust domain and path.
VALID = [
    ("spiffe://trustdomain", "trustdomain", ""),
    ("spiffe://trustdomain/path", "trustdomain", "/path"),
    ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
    ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
    ("spiffe://trustdomain/...", "trustdomain", "/..."),
    ("spiffe://trustdomain_/path", "trustdomain_", "/path"),
    ("spiffe://trustdomain-/path", "trustdomain-", "/path"),
    ("spiffe://trustdomain./path", "trustdomain.", "/path"),
    ("spiffe://trustdomain/pathA", "trustdomain", "/pathA"),
    ("spiffe://1.2.3.4/service", "1.2.3.4", "/service"),
    ("spiffe://example..org/path", "example..org", "/path"),
]

# Rows 10-29: invalid, with a fragment of the expected message.
INVALID = [
    ("", "cannot be empty"),
    ("s", "scheme is missing or invalid"),
    ("spiffe:/", "scheme is missing or invalid"),
    ("Spiffe://", "scheme is missing or invalid"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe://trustdomain/", "path cannot have a trailing slash"),
    ("spiffe://trustdomain//path", "path cannot contain empty segments"),
    ("spiffe://trustdomain/.", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/../other", "path cannot contain dot segments"),
    ("spiffe://trustdomainA/path", "trust domain characters are limited"),
    ("spiffe://%F0%9F%A4%AF/path", "trust domain characters are limited"),
    ("spiffe://trustdomain/%62%61%64", "path segment characters are limited"),
    ("spiffe://trust$domain", "trust domain characters are limited"),
    ("spiffe://example.org?query=123", "trust domain characters are limited"),
    ("spiffe://user@example.org/service", "trust domain characters are limited"),
    ("spiffe://example.org:8080/service", "trust domain characters are limited"),
    ("spiffe://[::1]/service", "trust domain characters are limited"),
    ("spiffe://example.org/service#frag", "path segment characters are limited"),
    # Row 29: py-spiffe normalizes this, go-spiffe (and Tally) refuse it.
    ("SPIFFE://EXAMPLE.ORG/service", "scheme is missing or invalid"),
    # Beyond the digest: the trailing newline py-spiffe's `$` lets through.
    ("spiffe://example.org/foo\n", "path segment characters are limited"),
    ("spiffe://example.org\n", "trust domain characters are limited"),
]


@pytest.mark.parametrize(("text", "domain", "path"), VALID)
def test_valid_vectors(text, domain, path):
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain == TrustDomain(domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text
    assert spiffe_id.is_root == (path == "")


@pytest.mark.parametrize(("text", "problem"), INVALID)
def test_invalid_vectors(text, problem):
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)  # the message names the input


def test_error_message_names_input_and_problem():
    with pytest.raises(SpiffeIdError, match=r"^invalid SPIFFE ID 'spiffe://x/': path cannot have"):
        SpiffeId.parse("spiffe://x/")


def test_length_limit_counts_the_whole_uri():
    prefix = "spiffe://example.org/"
    longest = prefix + "a" * (MAX_ID_BYTES - len(prefix))
    assert str(SpiffeId.parse(longest)) == longest
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes") as info:
        SpiffeId.parse(longest + "a")
    assert len(str(info.value)) < 200  # a huge input does not become a huge message


def test_trust_domain_length_limit():
    TrustDomain("a" * 255)
    with pytest.raises(SpiffeIdError, match="longer than 255"):
        TrustDomain("a" * 256)


def test_trust_domain_parse_accepts_both_spellings():
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    assert str(TrustDomain.parse("example.org")) == "example.org"
    assert str(TrustDomain("example.org").id()) == "spiffe://example.org"
    assert TrustDomain("example.org").id().is_root


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Example.org",
        "spiffe://example.org/path",
        "spiffe://",
        "example.org/",
        "https://x",
        "a b",
    ],
)
def test_trust_domain_parse_rejects(text):
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(text)


def test_constructors_validate():
    with pytest.raises(SpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "/a/")
    with pytest.raises(SpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "a")
    with pytest.raises(SpiffeIdError):
        TrustDomain("EXAMPLE.org")
    with pytest.raises(TypeError):
        SpiffeId("example.org", "/a")  # type: ignore[arg-type]


def test_member_of():
    spiffe_id = SpiffeId.parse("spiffe://example.org/web")
    assert spiffe_id.member_of(TrustDomain("example.org"))
    assert not spiffe_id.member_of(TrustDomain("example.com"))


def test_from_parts():
    assert str(SpiffeId.from_parts("example.org", "ns", "prod")) == "spiffe://example.org/ns/prod"
    assert SpiffeId.from_parts(TrustDomain("example.org")).is_root
    for bad in ["a/b", "", ".", "..", "a b", "é"]:
        with pytest.raises(SpiffeIdError, match="segment"):
            SpiffeId.from_parts("example.org", "ok", bad)
    with pytest.raises(SpiffeIdError):
        SpiffeId.from_parts("Example.org", "a")


def test_ids_are_values():
    a = SpiffeId.parse("spiffe://example.org/a")
    assert a == SpiffeId.from_parts("example.org", "a")
    assert len({a, SpiffeId.parse("spiffe://example.org/a")}) == 1
    assert sorted([SpiffeId.parse("spiffe://z/a"), a])[0] == a


TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEGMENT_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(SEGMENT_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@given(trust_domains, st.lists(segments, max_size=6))
def test_generated_ids_round_trip(domain, parts):
    built = SpiffeId.from_parts(domain, *parts)
    text = str(built)
    assert SpiffeId.parse(text) == built
    assert str(SpiffeId.parse(text)) == text
    assert built.is_root == (not parts)


@given(st.one_of(st.text(), st.text(SEGMENT_CHARS + "/:%?#@ \n").map(lambda s: "spiffe://" + s)))
def test_random_text_parses_exactly_or_raises_our_error(text):
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    # Accepted implies valid: printed back byte for byte, and within the spec's rules.
    assert str(spiffe_id) == text
    assert text.startswith("spiffe://")
    assert len(text.encode()) <= MAX_ID_BYTES
    assert not text.endswith("/")
    assert "//" not in text[len("spiffe://") :]
    assert all(seg not in (".", "..") for seg in spiffe_id.path.split("/")[1:])
    assert spiffe_id.trust_domain.name == spiffe_id.trust_domain.name.lower()


@given(st.text())
def test_random_trust_domain_text_parses_or_raises_our_error(text):
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError:
        return
    assert text in (td.name, f"spiffe://{td.name}")


@given(st.one_of(st.text(), st.text(SEGMENT_CHARS + "/:%?#@ \n").map(lambda s: "spiffe://" + s)))
def test_a_remembered_parse_answers_as_a_fresh_one(text):
    """Rule 6: the second parse of any text gives what the first gave, refusals included."""
    answers: list[SpiffeId | str] = []
    for _ in range(2):
        try:
            answers.append(SpiffeId.parse(text))
        except SpiffeIdError as exc:
            answers.append(str(exc))
    assert answers[0] == answers[1]


def test_remembered_ids_are_bounded(monkeypatch):
    import tally.spiffe.spiffeid as module

    monkeypatch.setattr(module, "_PARSED_MAX", 8)
    monkeypatch.setattr(module, "_parsed", {})
    first = SpiffeId.parse("spiffe://example.org/w/0")
    assert SpiffeId.parse("spiffe://example.org/w/0") is first
    for i in range(20):
        SpiffeId.parse(f"spiffe://example.org/w/{i}")
    assert len(module._parsed) <= 8
    with pytest.raises(SpiffeIdError, match="trailing slash"):
        SpiffeId.parse("spiffe://example.org/w/")
    assert "spiffe://example.org/w/" not in module._parsed
