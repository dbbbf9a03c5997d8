"""The pure JWT-SVID core: our tokens against PyJWT, and every hostile token of issue 15
refused with its named reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.spiffe import jwt
from tally.spiffe.authz import Policy
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain.parse("example.org")
OTHER = TrustDomain.parse("other.org")
NOW = 1_800_000_000
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
SUB = SpiffeId.parse("spiffe://example.org/web")
BUNDLES = {
    TD: jwt.JwtBundle(TD, {"k1": EC_KEY.public_key(), "r1": RSA_KEY.public_key()}),
    OTHER: jwt.JwtBundle(OTHER, {"o1": OTHER_KEY.public_key()}),
}


def claims(**over):
    base = jwt.svid_claims(SUB, ["reports"], NOW, NOW + 300)
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def token(key=EC_KEY, kid="k1", alg=None, **over) -> str:
    return jwt.encode(claims(**over), key, kid, alg)


def raw_token(header: dict, body: dict, signature: bytes = b"sig") -> str:
    def part(obj) -> str:
        return jwt.b64url(json.dumps(obj).encode())

    return f"{part(header)}.{part(body)}.{jwt.b64url(signature)}"


def refused(tok: str, audience: str = "reports", now: float = NOW, **kw) -> str:
    with pytest.raises(jwt.JwtError) as info:
        jwt.validate(tok, audience, BUNDLES, now, **kw)
    assert tok not in info.value.message
    return info.value.reason


# -- interop -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "kid", "alg"),
    [(EC_KEY, "k1", None), (RSA_KEY, "r1", None), (RSA_KEY, "r1", "PS256")],
)
def test_our_tokens_validate_with_pyjwt_and_ours(key, kid, alg):
    tok = token(key, kid, alg)
    doc = json.loads(BUNDLES[TD].to_jwks())
    jwk = next(k for k in doc["keys"] if k["kid"] == kid)
    public = pyjwt.PyJWK(jwk).key
    got = pyjwt.decode(
        tok,
        public,
        algorithms=[alg or jwt.alg_for_key(key)],
        audience="reports",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert got["sub"] == str(SUB)
    assert pyjwt.get_unverified_header(tok)["kid"] == kid
    svid = jwt.validate(tok, "reports", BUNDLES, NOW + 1)
    assert svid.spiffe_id == SUB and svid.audience == ("reports",)


def test_pyjwt_tokens_validate_with_ours():
    for key, kid, alg in ((EC_KEY, "k1", "ES256"), (RSA_KEY, "r1", "RS256")):
        tok = pyjwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
        assert jwt.validate(tok, "reports", BUNDLES, NOW).spiffe_id == SUB


def test_jwks_round_trip_and_pyjwt_reads_it():
    data = BUNDLES[TD].to_jwks(sequence=3)
    again = jwt.JwtBundle.from_jwks(TD, data)
    assert set(again.keys) == {"k1", "r1"}
    for kid, key in again.keys.items():
        assert key.public_numbers() == BUNDLES[TD].keys[kid].public_numbers()
    pyset = pyjwt.PyJWKSet.from_json(data.decode())
    assert {k.key_id for k in pyset.keys} == {"k1", "r1"}
    assert all(k["use"] == "jwt-svid" and "d" not in k for k in json.loads(data)["keys"])


# -- hostile tokens (issue 15, item 7) -----------------------------------------------


def test_refuses_alg_none():
    tok = raw_token({"alg": "none", "kid": "k1"}, claims(), b"")
    assert refused(tok) == "alg_not_allowed"
    # and PyJWT would too, so the two agree
    with pytest.raises(pyjwt.InvalidTokenError):
        pyjwt.decode(tok, EC_KEY.public_key(), algorithms=["ES256"], audience="reports")


def test_refuses_hs256_signed_with_the_public_key():
    secret = EC_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = jwt.b64url(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = jwt.b64url(json.dumps(claims()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert refused(f"{head}.{body}.{jwt.b64url(mac)}") == "alg_not_allowed"


def test_refuses_unknown_kid():
    assert refused(token(kid="nope")) == "unknown_kid"


def test_refuses_kid_of_another_trust_domain():
    assert refused(token(OTHER_KEY, kid="o1")) == "foreign_kid"


def test_refuses_expired():
    assert refused(token(), now=NOW + 300 + jwt.LEEWAY + 1) == "expired"
    # within the leeway it still passes
    jwt.validate(token(), "reports", BUNDLES, NOW + 300 + jwt.LEEWAY)


def test_refuses_not_yet_valid():
    assert refused(token(nbf=NOW + 60)) == "not_yet_valid"
    assert refused(token(iat=NOW + jwt.IAT_LEEWAY + 1)) == "not_yet_valid"
    # a validator whose clock is 30 s behind the CA's still takes a fresh token
    jwt.validate(token(iat=NOW + 30), "reports", BUNDLES, NOW)


def test_refuses_wrong_audience():
    assert refused(token(), audience="billing") == "wrong_audience"


def test_refuses_several_audiences_where_one_is_required():
    tok = token(aud=["reports", "billing"])
    assert refused(tok) == "multiple_audiences"
    assert jwt.validate(tok, "reports", BUNDLES, NOW, single_audience=False).audience == (
        "reports",
        "billing",
    )


def test_refuses_missing_audience_and_exp():
    assert refused(token(aud=None)) == "missing_audience"
    assert refused(token(aud=[])) == "missing_audience"
    assert refused(token(exp=None)) == "missing_exp"


@pytest.mark.parametrize("sub", ["web", "https://example.org/web", "spiffe://EX AMPLE/x", 7])
def test_refuses_a_sub_that_is_not_a_spiffe_id(sub):
    assert refused(token(sub=sub)) == "bad_subject"


def test_refuses_a_64_kib_token():
    tok = token(pad="x" * 64 * 1024)
    assert len(tok) > 64 * 1024
    assert refused(tok) == "too_large"


def test_refuses_a_jwks_with_duplicate_kids():
    doc = json.loads(BUNDLES[TD].to_jwks())
    doc["keys"].append(dict(doc["keys"][0]))
    with pytest.raises(jwt.JwtError) as info:
        jwt.JwtBundle.from_jwks(TD, json.dumps(doc).encode())
    assert info.value.reason == "duplicate_kid"


def test_refuses_a_token_for_a_disallowed_id():
    # Validation passes; the allow rules (the same as for certificates) refuse it.
    svid = jwt.validate(token(), "reports", BUNDLES, NOW)
    policy = Policy(ids=frozenset({SpiffeId.parse("spiffe://example.org/admin")}))
    assert not policy.allows(svid.spiffe_id)


def test_refuses_a_bad_signature_and_alg_key_mismatch():
    head, _body, sig = token().split(".")
    forged = jwt.b64url(json.dumps(claims(sub="spiffe://example.org/admin")).encode())
    assert refused(f"{head}.{forged}.{sig}") == "bad_signature"
    # an RS256 header over the EC key's kid
    assert refused(token(RSA_KEY, kid="k1")) == "alg_key_mismatch"


def test_refuses_extra_header_members_and_bad_typ():
    good = token()
    tok = raw_token({"alg": "ES256", "kid": "k1", "jku": "https://evil"}, claims())
    assert refused(tok) == "bad_header"
    tok = raw_token({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}, claims())
    assert refused(tok) == "bad_header"
    assert refused(raw_token({"alg": "ES256"}, claims())) == "missing_kid"
    assert refused(good + ".x") == "malformed"


def test_refuses_duplicate_json_members():
    head = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"k1","kid":"r1"}').rstrip(b"=")
    body = jwt.b64url(json.dumps(claims()).encode())
    assert refused(f"{head.decode()}.{body}.AAAA") == "malformed"


def test_no_bundle_for_the_subjects_trust_domain():
    assert refused(token(sub="spiffe://third.org/x")) == "no_bundle"


# -- properties ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_refused_with_a_named_reason(text):
    with pytest.raises(jwt.JwtError) as info:
        jwt.validate(text, "reports", BUNDLES, NOW)
    assert info.value.reason in jwt.REASONS


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20).filter(lambda a: a not in jwt.ALLOWED_ALGS), st.binary(max_size=64))
def test_any_alg_outside_the_allow_list_is_refused_first(alg, sig):
    # Even with a kid that does not exist and claims that are garbage: the alg is judged first.
    tok = raw_token({"alg": alg, "kid": "zz"}, {"sub": 1}, sig)
    assert refused(tok) == "alg_not_allowed"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3),
    st.integers(min_value=1, max_value=10**6),
)
def test_sign_then_validate_round_trips(audiences, ttl):
    tok = jwt.encode(jwt.svid_claims(SUB, audiences, NOW, NOW + ttl), EC_KEY, "k1")
    svid = jwt.validate(tok, audiences[0], BUNDLES, NOW, single_audience=False)
    assert svid.spiffe_id == SUB and svid.audience == tuple(audiences)
    assert svid.expires_at == NOW + ttl


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_jwks_bytes_parse_or_raise_jwt_error(data):
    try:
        jwt.JwtBundle.from_jwks(TD, data)
    except jwt.JwtError as exc:
        assert exc.reason in jwt.REASONS


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4))
def test_jwks_with_any_repeated_kid_is_refused(kids):
    doc = {"keys": [jwt.public_jwk(EC_KEY.public_key(), kid) for kid in kids]}
    data = json.dumps(doc).encode()
    if len(set(kids)) < len(kids):
        with pytest.raises(jwt.JwtError) as info:
            jwt.JwtBundle.from_jwks(TD, data)
        assert info.value.reason == "duplicate_kid"
    else:
        assert set(jwt.JwtBundle.from_jwks(TD, data).keys) == set(kids)


def test_a_jwt_never_reaches_a_log_line():
    import io

    from tally.ops.logs import get_logger, setup_logging

    out = io.StringIO()
    setup_logging("debug", stream=out)
    tok = token()
    get_logger("tally.test").warning("x.y", detail=f"got {tok}", nested={"a": [tok]})
    get_logger("tally.test").warning("x.z", error=ValueError(f"bad {tok}"))
    assert tok not in out.getvalue() and tok.split(".")[0] not in out.getvalue()
    assert out.getvalue().count("<redacted>") >= 3
