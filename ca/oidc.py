"""OIDC discovery for JWT-SVIDs: what cloud token exchanges and Vault's JWT auth read.

``tally ca run --oidc-listen HOST:PORT --oidc-issuer https://NAME`` serves:

- ``GET /.well-known/openid-configuration``: the discovery document, naming
  the issuer (equal to the ``iss`` of every JWT-SVID this CA signs) and the
  JWKS at ``<issuer>/keys``;
- ``GET /keys``: the JWT signing keys, public parameters only, as OIDC
  relying parties expect them (``use: sig`` and ``alg``, where the SPIFFE
  bundle says ``use: jwt-svid``).

Rules:

1. **Public keys only**: the document is built from `tally.spiffe.jwt.JwtBundle`,
   which holds public keys and nothing else; a private parameter cannot reach it.
2. **The same keys as the bundle**, at the same moment: a key is served here
   from the moment it is published (before it signs) until every token it
   signed has expired, so a relying party that refreshes on an unknown
   ``kid`` always finds the key.
3. **Cache-Control**: the keys may be cached for `KEYS_MAX_AGE` seconds, far
   less than ``jwt_propagation`` (the least time a key is published before it
   signs), so caches pick a new key up before any token needs it; discovery
   for `DISCOVERY_MAX_AGE`.
4. **TLS** from ``--oidc-cert``/``--oidc-key`` (files an operator's Web PKI
   issued; the key must be 0600), or **plain HTTP on loopback only**, for a
   TLS terminator in front (enforced by `ca.settings`).  No client
   authentication: relying parties are anonymous.
5. GET and HEAD only; anything else is 405, any other path 404.  Every wait
   has a deadline (`tally.wire.http.serve_http`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ca.keys import CAKeyError, load_private_key
from tally.ops.config import Address
from tally.ops.logs import get_logger
from tally.ops.net import bound_address, open_listener
from tally.spiffe import jwt, pem
from tally.tls.contexts import TLSContext, server_context
from tally.tls.stream import TLSStream
from tally.tls.verify import TLSError
from tally.wire import http

log = get_logger("tally.ca")

KEYS_MAX_AGE = 60
DISCOVERY_MAX_AGE = 300
HANDSHAKE_TIMEOUT = 10.0
ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


def discovery_document(issuer: str) -> dict[str, Any]:
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "jwks_uri": f"{base}/keys",
        # Required members of OpenID Connect Discovery 1.0 §3; there is no login here.
        "authorization_endpoint": f"{base}/connect/authorize",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ALGS,
    }


def keys_document(bundle: jwt.JwtBundle) -> dict[str, list[dict[str, str]]]:
    """The JWKS relying parties read: public parameters, ``use: sig``, ``alg`` (rule 1)."""
    keys = []
    for kid, key in bundle.keys.items():
        jwk: dict[str, str] = dict(jwt.public_jwk(key, kid))
        jwk["use"] = "sig"
        jwk["alg"] = jwt.alg_for_key(key)
        keys.append(jwk)
    return {"keys": keys}


def handler(issuer: str, keys: Callable[[], jwt.JwtBundle]) -> http.Handler:
    async def handle(req: http.Request) -> http.Response:
        if req.method not in ("GET", "HEAD"):
            return http.Response.json({"error": "method not allowed"}, status=405)
        if req.path == "/.well-known/openid-configuration":
            body: dict[str, Any] = discovery_document(issuer)
            age = DISCOVERY_MAX_AGE
        elif req.path == "/keys":
            body, age = dict(keys_document(keys())), KEYS_MAX_AGE
        else:
            return http.Response.json({"error": "not found"}, status=404)
        return http.Response(
            200,
            json.dumps(body, indent=2).encode() + b"\n",
            headers=(("Cache-Control", f"public, max-age={age}"),),
        )

    return handle


def tls_context(cert: Path, key: Path) -> TLSContext:
    """The OIDC endpoint's server context from the operator's files (rule 4)."""
    try:
        chain = pem.chain_from_pem(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAKeyError(f"oidc certificate {cert}: {exc}") from exc
    try:
        return server_context(chain, load_private_key(key), client_auth="none")
    except ValueError as exc:
        raise CAKeyError(f"oidc certificate {cert} and key {key}: {exc}") from exc


async def _serve_one(
    ctx: TLSContext | None, handle: http.Handler, drain: http.Drain, stream: trio.SocketStream
) -> None:
    conn: trio.abc.Stream = stream
    if ctx is not None:
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (TLSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.aclose()
            return
        conn = tls
    async with conn:
        await http.serve_http(conn, handle, idle_timeout=30, request_timeout=10, drain=drain)


async def serve_oidc(
    address: Address,
    issuer: str,
    keys: Callable[[], jwt.JwtBundle],
    ctx: TLSContext | None,
    drain: http.Drain,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve discovery until cancelled; reports the bound address when listening."""
    listener = await open_listener(address)
    handle = handler(issuer, keys)
    async with trio.open_nursery() as nursery:
        task_status.started(bound_address(listener))
        await trio.serve_listeners(
            partial(_serve_one, ctx, handle, drain), [listener], handler_nursery=nursery
        )
