"""JWT-SVIDs and JWT bundles: signing, parsing, validating, and the JWK Set codec.

Rules (digest §3, JWT-SVID.md):

1. **The algorithm is judged before anything else.**  A token's header is
   decoded, its ``alg`` compared against `ALLOWED_ALGS` (RS/ES/PS 256-512),
   and only then is anything else about the token read.  ``none`` and every
   HMAC algorithm are refused by name, so a public key can never be used as
   an HMAC secret.  The algorithm must also fit the key the ``kid`` names
   (an ES256 token needs a P-256 key), so a token cannot pick how its own
   signature is checked.
2. **Compact serialization only**, three base64url parts, no padding, no
   whitespace; the header holds ``alg``, ``kid`` and optionally ``typ``
   (``JWT`` or ``JOSE``) and nothing else.  ``kid`` is required, as go-spiffe
   and py-spiffe require it.  JSON with duplicate members is refused, so two
   readers can never see two different tokens in the same bytes.
3. **The key comes from the bundle of the trust domain in ``sub``**, never
   from another one; a ``kid`` known only to another trust domain is refused
   with its own reason (``foreign_kid``), and bundles are never pooled.
4. **Claims**: ``sub`` a SPIFFE ID, ``aud`` present and holding the
   validator's audience, ``exp`` present and not past; ``nbf`` and ``iat``, if
   present, not in the future.  `LEEWAY` seconds of clock skew are allowed
   (`IAT_LEEWAY` for ``iat``, which only says when the CA signed).
   Where one audience is required (the default) a token naming several is
   refused: it could be replayed between its audiences (digest §3).
5. **Bounded**: a token over `MAX_TOKEN_BYTES` is refused on its length
   before any decoding, and a JWK Set over `MAX_JWKS_BYTES`.
6. **Every refusal is a `JwtError` with a fixed ``reason`` word** (`REASONS`)
   safe for logs and metric labels; its message never quotes the token.
7. A JWK Set for JWT-SVIDs holds only ``use: jwt-svid`` keys with a ``kid``;
   two keys with one ``kid`` fail the whole set (which one would be meant?).
   Keys of an unknown ``kty`` or curve, or of another ``use``, are skipped
   as the spec says.

Pure: no clock (callers pass ``now``), no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from tally.spiffe import strict_json
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

MAX_TOKEN_BYTES = 8 * 1024
MAX_JWKS_BYTES = 1024 * 1024
LEEWAY = 5
IAT_LEEWAY = 60
JWT_USE = "jwt-svid"

_EC = {"ES256": ("P-256", hashes.SHA256), "ES384": ("P-384", hashes.SHA384)}
_EC["ES512"] = ("P-521", hashes.SHA512)
_RSA_HASH: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
ALLOWED_ALGS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Every reason a token or a JWK Set is refused for; bounded, for metric labels.
REASONS = frozenset(
    {
        "too_large",
        "malformed",
        "alg_not_allowed",
        "bad_header",
        "missing_kid",
        "bad_subject",
        "no_bundle",
        "unknown_kid",
        "foreign_kid",
        "alg_key_mismatch",
        "bad_signature",
        "missing_exp",
        "expired",
        "not_yet_valid",
        "missing_audience",
        "wrong_audience",
        "multiple_audiences",
        "not_allowed",
        "bad_jwks",
        "duplicate_kid",
    }
)


class JwtError(ValueError):
    """A token or JWK Set refused; ``reason`` is one of `REASONS`, the message says more
    (never the token itself)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- base64url and JSON ----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def unb64url(text: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2); ValueError otherwise."""
    if not set(text) <= _B64URL_CHARS or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = strict_json.loads(unb64url(part))
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwtError("malformed", f"token {what} is not base64url JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JwtError("malformed", f"token {what} is not a JSON object")
    return value


# -- keys --------------------------------------------------------------------------------


def alg_for_key(key: PublicKey | PrivateKey) -> str:
    """The algorithm a CA key signs with: ES256/384/512 by curve, RS256 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        for alg, (name, _) in _EC.items():
            if name == crv:
                return alg
        raise ValueError(f"unsupported curve {key.curve.name}")
    return "RS256"


def key_fits(alg: str, key: PublicKey) -> bool:
    """Whether a token of ``alg`` may be checked with ``key`` (rule 1)."""
    if alg in _EC:
        return (
            isinstance(key, ec.EllipticCurvePublicKey)
            and _CURVE_NAMES.get(key.curve.name) == _EC[alg][0]
        )
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


def public_jwk(key: PublicKey, kid: str) -> dict[str, str]:
    """A ``jwt-svid`` JWK: public parameters only, with ``use`` and ``kid``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES[key.curve.name]
        size = (key.curve.key_size + 7) // 8
        n = key.public_numbers()
        return {
            "kty": "EC",
            "kid": kid,
            "use": JWT_USE,
            "crv": crv,
            "x": b64url(n.x.to_bytes(size, "big")),
            "y": b64url(n.y.to_bytes(size, "big")),
        }
    rn = key.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": JWT_USE,
        "n": b64url(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
        "e": b64url(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
    }


def _int_param(jwk: Mapping[str, Any], name: str) -> int:
    raw = jwk.get(name)
    if not isinstance(raw, str):
        raise ValueError(f"'{name}' must be a base64url string")
    return int.from_bytes(unb64url(raw), "big")


def _key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey | None:
    """The public key of a JWK, or None for a kty/curve this module does not use."""
    kty = jwk.get("kty")
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            return None
        return ec.EllipticCurvePublicNumbers(
            _int_param(jwk, "x"), _int_param(jwk, "y"), curve
        ).public_key()
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_int_param(jwk, "e"), _int_param(jwk, "n")).public_key()
    return None


@dataclass(frozen=True)
class JwtBundle:
    """The JWT signing keys of one trust domain, by ``kid``."""

    trust_domain: TrustDomain
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def to_jwks(self, sequence: int | None = None, refresh_hint: int | None = None) -> bytes:
        doc: dict[str, Any] = {"keys": self.jwks_keys()}
        if sequence is not None:
            doc["spiffe_sequence"] = sequence
        if refresh_hint is not None:
            doc["spiffe_refresh_hint"] = refresh_hint
        return json.dumps(doc, indent=2).encode() + b"\n"

    def jwks_keys(self) -> list[dict[str, str]]:
        return [public_jwk(key, kid) for kid, key in self.keys.items()]

    @classmethod
    def from_jwks(cls, td: TrustDomain, data: bytes) -> JwtBundle:
        """Read the ``jwt-svid`` keys of a JWK Set (rule 7); `JwtError` if it is unusable."""
        where = f"JWT bundle for {td}"
        if len(data) > MAX_JWKS_BYTES:
            raise JwtError("bad_jwks", f"{where}: {len(data)} bytes, at most {MAX_JWKS_BYTES}")
        try:
            doc = strict_json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JwtError("bad_jwks", f"{where}: not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JwtError("bad_jwks", f"{where}: expected a JWK Set with a 'keys' array")
        keys: dict[str, PublicKey] = {}
        for number, jwk in enumerate(doc["keys"], 1):
            if not isinstance(jwk, dict):
                raise JwtError("bad_jwks", f"{where}, key {number}: expected a JSON object")
            if jwk.get("use") != JWT_USE:
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise JwtError("bad_jwks", f"{where}, key {number}: a jwt-svid key needs a kid")
            if kid in keys:
                raise JwtError("duplicate_kid", f"{where}: kid {kid!r} appears more than once")
            try:
                key = _key_from_jwk(jwk)
            except ValueError as exc:
                raise JwtError("bad_jwks", f"{where}, key {kid!r}: {exc}") from None
            if key is not None:
                keys[kid] = key
        return cls(td, keys)


# -- signing -------------------------------------------------------------------------------


def _sign(alg: str, key: PrivateKey, data: bytes) -> bytes:
    if alg in _EC:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        size = (key.curve.key_size + 7) // 8
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_EC[alg][1]())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert isinstance(key, rsa.RSAPrivateKey)
    algorithm = _RSA_HASH[alg[2:]]()
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        return key.sign(data, pss, algorithm)
    return key.sign(data, padding.PKCS1v15(), algorithm)


def _verify(alg: str, key: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if alg in _EC:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            size = (key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_EC[alg][1]()))
            return True
        assert isinstance(key, rsa.RSAPublicKey)
        algorithm = _RSA_HASH[alg[2:]]()
        if alg.startswith("PS"):
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            key.verify(signature, data, pss, algorithm)
        else:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        return True
    except (InvalidSignature, ValueError):
        return False


def encode(claims: Mapping[str, Any], key: PrivateKey, kid: str, alg: str | None = None) -> str:
    """A compact JWS over ``claims``, with header ``alg``, ``kid`` and ``typ: JWT``."""
    alg = alg or alg_for_key(key)
    if alg not in ALLOWED_ALGS:
        raise ValueError(f"alg {alg} is not allowed for JWT-SVIDs")
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    )
    return signing_input + "." + b64url(_sign(alg, key, signing_input.encode()))


def svid_claims(
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    issued_at: int,
    expires_at: int,
    issuer: str | None = None,
) -> dict[str, Any]:
    """The claims of a JWT-SVID the CA signs: sub, aud (a list), exp, iat, a random jti,
    and iss when the CA has an OIDC issuer (cloud token exchanges insist on it)."""
    if not audience:
        raise ValueError("a JWT-SVID needs at least one audience")
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": list(audience),
        "exp": expires_at,
        "iat": issued_at,
        "jti": secrets.token_hex(16),
    }
    if issuer:
        claims["iss"] = issuer
    return claims


# -- reading and validating ------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A token taken apart, its signature not yet checked."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    @property
    def kid(self) -> str:
        return str(self.header["kid"])


def parse_insecure(token: str) -> Token:
    """Take a token apart, judging the header first (rules 1, 2, 5); no signature check."""
    if not isinstance(token, str):
        raise JwtError("malformed", "token must be a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtError("too_large", f"token of {len(token)} bytes, at most {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("malformed", "token is not a compact JWS (three dot-separated parts)")
    header = _json_part(parts[0], "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
        raise JwtError("alg_not_allowed", f"alg {shown!r} is not allowed for JWT-SVIDs")
    extra = set(header) - _HEADER_MEMBERS
    if extra:
        raise JwtError("bad_header", f"header members not allowed: {sorted(extra)[:4]}")
    if "typ" in header and header["typ"] not in ("JWT", "JOSE"):
        raise JwtError("bad_header", "header typ must be JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtError("missing_kid", "token header has no kid")
    claims = _json_part(parts[1], "claims")
    try:
        signature = unb64url(parts[2])
    except ValueError:
        raise JwtError("malformed", "token signature is not base64url") from None
    return Token(header, claims, f"{parts[0]}.{parts[1]}".encode(), signature)


def subject(token: Token) -> SpiffeId:
    sub = token.claims.get("sub")
    if not isinstance(sub, str):
        raise JwtError("bad_subject", "sub must be a SPIFFE ID string")
    try:
        return SpiffeId.parse(sub)
    except SpiffeIdError:
        raise JwtError("bad_subject", "sub is not a SPIFFE ID") from None


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        return list(aud)
    raise JwtError("missing_audience", "aud must be a string or a non-empty list of strings")


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtError("malformed", f"{name} must be a number")
    return float(value)


@dataclass(frozen=True)
class JwtSvid:
    """A validated JWT-SVID."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: int
    claims: Mapping[str, Any]


def validate(
    token: str,
    audience: str,
    bundles: Mapping[TrustDomain, JwtBundle] | Iterable[JwtBundle],
    now: float,
    *,
    single_audience: bool = True,
    leeway: int = LEEWAY,
) -> JwtSvid:
    """Validate a JWT-SVID for ``audience`` at ``now`` against the bundles we trust.

    The order is the spec's: size, shape and ``alg`` first (`parse_insecure`),
    then the key named by ``kid`` in the bundle of ``sub``'s trust domain,
    the signature, and only then the claims.
    """
    if not isinstance(bundles, Mapping):
        bundles = {b.trust_domain: b for b in bundles}
    tok = parse_insecure(token)
    sid = subject(tok)
    bundle = bundles.get(sid.trust_domain)
    if bundle is None:
        raise JwtError("no_bundle", f"no JWT bundle for trust domain {sid.trust_domain}")
    key = bundle.keys.get(tok.kid)
    if key is None:
        if any(tok.kid in b.keys for td, b in bundles.items() if td != sid.trust_domain):
            raise JwtError(
                "foreign_kid",
                f"kid names a key of another trust domain than {sid.trust_domain}",
            )
        raise JwtError("unknown_kid", f"kid is not a JWT key of {sid.trust_domain}")
    if not key_fits(tok.alg, key):
        raise JwtError("alg_key_mismatch", f"alg {tok.alg} does not fit the key its kid names")
    if not _verify(tok.alg, key, tok.signing_input, tok.signature):
        raise JwtError("bad_signature", "signature does not verify")
    exp = _number(tok.claims, "exp")
    if exp is None:
        raise JwtError("missing_exp", "token has no exp")
    if now > exp + leeway:
        raise JwtError("expired", "token has expired")
    nbf = _number(tok.claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise JwtError("not_yet_valid", "token nbf is in the future")
    # ``iat`` is informational (RFC 7519 §4.1.6), so a validator a few seconds behind the
    # CA must not refuse a fresh token; one "issued" well in the future is not honest.
    iat = _number(tok.claims, "iat")
    if iat is not None and iat > now + max(leeway, IAT_LEEWAY):
        raise JwtError("not_yet_valid", "token iat is in the future")
    auds = _audiences(tok.claims)
    if single_audience and len(auds) > 1:
        raise JwtError("multiple_audiences", "token names several audiences; one is required")
    if audience not in auds:
        raise JwtError("wrong_audience", "token is not for this audience")
    return JwtSvid(sid, tuple(auds), int(exp), dict(tok.claims))


def with_jwt_keys(x509_jwks: bytes, bundle: JwtBundle) -> bytes:
    """A SPIFFE bundle (JWK Set) holding both the X.509 authorities already in
    ``x509_jwks`` and the ``jwt-svid`` keys of ``bundle``: what federation and
    ``tally ca bundle show --format spiffe`` publish."""
    doc = strict_json.loads(x509_jwks)
    assert isinstance(doc, dict) and isinstance(doc.get("keys"), list)
    doc["keys"] = [*doc["keys"], *bundle.jwks_keys()]
    return json.dumps(doc, indent=2).encode() + b"\n"
