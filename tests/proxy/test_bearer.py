"""The proxy's bearer-token gate: each hostile token of issue 15 refused with its reason,
and the header handling around it (property-tested)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bearer import BearerGate, bearer_token
from tally.spiffe import jwt
from tally.spiffe.authz import Policy
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain.parse("example.org")
OTHER = TrustDomain.parse("other.org")
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
NOW = 1_800_000_000
WEB = SpiffeId.parse("spiffe://example.org/web")


@pytest.fixture
def gate() -> BearerGate:
    g = BearerGate("reports", Policy(ids=frozenset({WEB})))
    g.update(
        {
            "example.org": jwt.JwtBundle(TD, {"k1": KEY.public_key()}).to_jwks(),
            "other.org": jwt.JwtBundle(OTHER, {"o1": OTHER_KEY.public_key()}).to_jwks(),
        }
    )
    return g


def token(key=KEY, kid="k1", sub=WEB, aud=("reports",), iat=NOW, exp=NOW + 300, **extra) -> str:
    claims = jwt.svid_claims(SpiffeId.parse(str(sub)), list(aud), iat, exp)
    claims.update(extra)
    return jwt.encode(claims, key, kid)


def raw(header: dict, claims: dict) -> str:
    part = lambda obj: jwt.b64url(json.dumps(obj).encode())  # noqa: E731
    return f"{part(header)}.{part(claims)}.c2ln"


def verdict(gate: BearerGate, tok: str | None, now: float = NOW):
    headers = [(b"host", b"x")]
    if tok is not None:
        headers.append((b"authorization", f"Bearer {tok}".encode()))
    return gate.check(headers, now)


def test_a_valid_token_passes(gate):
    v = verdict(gate, token())
    assert v.reason is None and v.spiffe_id == WEB


CLAIMS = {"sub": str(WEB), "aud": ["reports"], "exp": NOW + 300, "iat": NOW}


@pytest.mark.parametrize(
    ("name", "make", "reason", "now"),
    [
        ("missing", lambda: None, "missing_token", NOW),
        ("alg none", lambda: raw({"alg": "none", "kid": "k1"}, CLAIMS), "alg_not_allowed", NOW),
        ("hs256", lambda: raw({"alg": "HS256", "kid": "k1"}, CLAIMS), "alg_not_allowed", NOW),
        ("unknown kid", lambda: token(kid="nope"), "unknown_kid", NOW),
        ("kid of another td", lambda: token(OTHER_KEY, "o1"), "foreign_kid", NOW),
        ("expired", lambda: token(), "expired", NOW + 400),
        ("not yet valid", lambda: token(nbf=NOW + 100), "not_yet_valid", NOW),
        ("wrong audience", lambda: token(aud=("billing",)), "wrong_audience", NOW),
        ("several audiences", lambda: token(aud=("reports", "x")), "multiple_audiences", NOW),
        (
            "sub not a spiffe id",
            lambda: raw({"alg": "ES256", "kid": "k1"}, {**CLAIMS, "sub": "web"}),
            "bad_subject",
            NOW,
        ),
        ("64 KiB", lambda: token(pad="x" * 65536), "too_large", NOW),
        ("disallowed id", lambda: token(sub="spiffe://example.org/admin"), "not_allowed", NOW),
    ],
)
def test_hostile_tokens_are_refused_with_a_named_reason(gate, name, make, reason, now):
    v = verdict(gate, make(), now)
    assert v.reason == reason, name


def test_a_jwks_with_duplicate_kids_is_not_trusted(gate):
    doc = json.loads(jwt.JwtBundle(TD, {"k1": KEY.public_key()}).to_jwks())
    doc["keys"].append(doc["keys"][0])
    gate.update({"example.org": json.dumps(doc).encode()})
    assert verdict(gate, token()).reason == "no_bundle"


def test_two_authorization_headers_or_another_scheme_are_no_token(gate):
    tok = token()
    headers = [(b"authorization", f"Bearer {tok}".encode())] * 2
    assert gate.check(headers, NOW).reason == "missing_token"
    assert gate.check([(b"authorization", f"Basic {tok}".encode())], NOW).reason == "missing_token"
    assert gate.check([(b"Authorization", f"bearer  {tok} ".encode())], NOW).reason is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=200)), max_size=5))
def test_any_headers_get_a_verdict_with_a_bounded_reason(headers):
    g = BearerGate("reports", Policy(ids=frozenset({WEB})))
    v = g.check(headers, NOW)
    assert v.reason is None or v.reason in jwt.REASONS | {"missing_token"}
    if v.reason is None:  # pragma: no cover - random bytes never sign
        raise AssertionError("random headers passed")
    token_text = bearer_token(headers)
    assert token_text is None or isinstance(token_text, str)
