"""Bearer JWT-SVIDs in HTTP mode: put on outbound requests, required on inbound ones.

Rules:

1. **Client side (``--inject-jwt AUDIENCE``)**: every request the app sends
   leaves with ``Authorization: Bearer <JWT-SVID>`` for that audience,
   replacing whatever ``Authorization`` the app set.  Tokens come from the
   Workload API (``FetchJWTSVID``) and are reused until half their life has
   passed (`TokenSource`), so the server side always gets one with at least
   half its life left, and the agent is asked once per half-life.
2. **Server side (``--require-jwt AUDIENCE``)**: a request needs exactly one
   ``Authorization: Bearer`` header holding a JWT-SVID that validates for the
   audience against the JWT bundles streamed from the Workload API
   (``FetchJWTBundles``, `BearerGate`), and whose ``sub`` passes the same
   allow rules as certificates.  Otherwise: 401 with
   ``WWW-Authenticate: Bearer error="invalid_token"`` and one ``peer.denied``
   line whose reason is a fixed word (`tally.spiffe.jwt.REASONS` plus
   ``missing_token``).  Validation is local: no call per request.
3. **The token is a secret**: it appears in no log line, error message,
   metric label or response.  Refusals name the reason, never the token;
   ``peer.denied`` names the ``sub`` only once the signature has verified.
4. Where the Workload API is unavailable the proxy keeps the last JWT
   bundles it had (keys are published long before use and retired long
   after), and reconnects with backoff.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tally.ops.logs import get_logger
from tally.spiffe import jwt
from tally.spiffe.authz import Policy
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.wire import workload_client as wl

log = get_logger("tally.proxy")

AUTHORIZATION = b"authorization"
CHALLENGE = (b"www-authenticate", b'Bearer error="invalid_token"')


class TokenError(Exception):
    """No token could be had for an outbound request; the message holds no token."""


class TokenSource:
    """JWT-SVIDs for one audience, renewed at half-life (rule 1)."""

    def __init__(self, endpoint_socket: Path, audience: str, spiffe_id: str | None) -> None:
        self.endpoint_socket = endpoint_socket
        self.audience = audience
        self.spiffe_id = spiffe_id or ""
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = trio.Lock()
        self.fetched = 0

    async def token(self, now: float) -> str:
        if self._token is not None and now < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is not None and now < self._refresh_at:
                return self._token
            try:
                svids = await wl.fetch_jwt_svids(
                    self.endpoint_socket, [self.audience], self.spiffe_id, timeout_s=10
                )
            except wl.WorkloadApiError as exc:
                raise TokenError(f"no JWT-SVID for audience {self.audience}: {exc}") from exc
            token = svids[0].token
            try:
                claims = jwt.parse_insecure(token).claims
                iat, exp = float(claims["iat"]), float(claims["exp"])
            except (jwt.JwtError, KeyError, TypeError, ValueError) as exc:
                raise TokenError("the Workload API gave a JWT-SVID that does not parse") from exc
            self._token = token
            self._refresh_at = iat + (exp - iat) / 2
            self.fetched += 1
            return token

    def headers(self, token: str) -> list[tuple[bytes, bytes]]:
        return [(AUTHORIZATION, b"Bearer " + token.encode("ascii", "replace"))]


@dataclass(frozen=True)
class Verdict:
    spiffe_id: SpiffeId | None
    reason: str | None
    """None when the request may pass."""


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The token of the one ``Authorization: Bearer`` header, or None."""
    values = [v for name, v in headers if name.lower() == AUTHORIZATION]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        return None


class BearerGate:
    """Judges inbound requests' tokens against the streamed JWT bundles (rule 2)."""

    def __init__(self, audience: str, policy: Policy) -> None:
        self.audience = audience
        self.policy = policy
        self.bundles: dict[TrustDomain, jwt.JwtBundle] = {}
        self.ready = trio.Event()

    def update(self, raw: dict[str, bytes]) -> None:
        bundles: dict[TrustDomain, jwt.JwtBundle] = {}
        for name, jwks in raw.items():
            try:
                td = TrustDomain.parse(name)
                bundles[td] = jwt.JwtBundle.from_jwks(td, jwks)
            except (ValueError, jwt.JwtError) as exc:
                log.warning("jwt_bundle.rejected", trust_domain=name, error=str(exc))
        self.bundles = bundles
        self.ready.set()
        log.info("jwt_bundle.updated", trust_domains=sorted(str(td) for td in bundles))

    def check(self, headers: Sequence[tuple[bytes, bytes]], now: float) -> Verdict:
        token = bearer_token(headers)
        if token is None:
            return Verdict(None, "missing_token")
        try:
            svid = jwt.validate(token, self.audience, self.bundles, now)
        except jwt.JwtError as exc:
            return Verdict(None, exc.reason)
        if not self.policy.allows(svid.spiffe_id):
            return Verdict(svid.spiffe_id, "not_allowed")
        return Verdict(svid.spiffe_id, None)

    async def watch(self, endpoint_socket: Path) -> None:
        """Keep the bundles current from the Workload API, for ever (rule 4)."""
        delay = 0.25
        while True:
            try:
                async with wl.watch_jwt_bundles(endpoint_socket) as updates:
                    async for raw in updates:
                        self.update(raw)
                        delay = 0.25
            except wl.WorkloadApiError as exc:
                log.warning("workload.error", call="FetchJWTBundles", error=str(exc))
            await trio.sleep(delay * (1 + random.random()))
            delay = min(5.0, delay * 2)


@dataclass
class BearerHooks:
    """What HTTP mode does with bearer tokens; either side may be None."""

    inject: TokenSource | None = None
    require: BearerGate | None = None
