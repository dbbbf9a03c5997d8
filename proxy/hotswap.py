"""Hot swap: the identity and TLS context every new handshake takes, replaced in one assignment.

Rules:

1. Hot swap is one assignment.  Each identity the source publishes (and each
   reload that changes the allow rules) becomes a new immutable TLS context,
   built right there in the source's task, and is published together with
   the identity as one `Current` value.  A handshake takes whatever is current
   when it starts; connections already up keep the context they began with.
2. Authorization runs inside the handshake (`tally.tls.verify` rule 1) through
   `tally.spiffe.authz`, with the trust bundles of the identity it was built
   with: a bundle update reaches peers' checks through the same swap.
3. Publishing what is already current changes nothing (`Identity.same_as`):
   the file source re-reads on SIGHUP, and an unchanged file is not a
   rotation.  A context that cannot be built is logged and the old one stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import trio

from proxy.identity import Identity
from proxy.metrics import Stats, SvidInfo
from tally.ops.logs import get_logger
from tally.spiffe import authz
from tally.tls.contexts import ClientAuth, TLSContext, client_context, server_context
from tally.tls.verify import authz_verifier

log = get_logger("tally.proxy")

Mode = Literal["server", "client"]


@dataclass(frozen=True)
class Current:
    """What new handshakes use: published in one assignment (rule 1)."""

    identity: Identity
    context: TLSContext


class HotSwap:
    """Turns published identities and allow rules into the `Current` new handshakes take."""

    def __init__(self, mode: Mode, policy: authz.Policy, *, groups: str, stats: Stats) -> None:
        self.mode = mode
        self.policy = policy
        self.groups = groups
        self.stats = stats
        self.current: Current | None = None
        self.client_auth: ClientAuth = "required"
        """"none" with --no-client-cert: the bearer token is then the credential."""
        self.first = trio.Event()
        """Set when the first identity is in service."""

    def svid_info(self) -> SvidInfo | None:
        cur = self.current
        if cur is None:
            return None
        ident = cur.identity
        return SvidInfo(str(ident.spiffe_id), ident.serial, ident.not_after)

    def _context_for(self, identity: Identity) -> TLSContext:
        verifier = authz_verifier(identity.trusted(), self.policy)
        if self.mode == "server":
            return server_context(
                identity.chain,
                identity.key,
                roots=identity.roots(),
                client_auth=self.client_auth,
                verifier=verifier,
                groups=self.groups,
            )
        return client_context(
            roots=identity.roots(),
            chain=identity.chain,
            key=identity.key,
            verifier=verifier,
            groups=self.groups,
        )

    def publish(self, identity: Identity) -> None:
        """Put a checked identity into service for every handshake from now on (rule 1)."""
        old = self.current.identity if self.current is not None else None
        if identity.same_as(old):
            return
        try:
            context = self._context_for(identity)
        except ValueError as exc:
            log.warning("identity.update_rejected", reason="tls_context", error=str(exc))
            return
        self.current = Current(identity, context)
        fields: dict[str, object] = {
            "spiffe_id": str(identity.spiffe_id),
            "serial": identity.serial,
            "not_after": identity.not_after.isoformat(),
            "trust_domains": sorted(td.name for td in identity.bundles),
        }
        if old is None:
            log.info("svid.loaded", **fields)
            self.first.set()
            return
        self.stats.rotations += 1
        if old.chain != identity.chain:
            log.info("svid.rotated", old_serial=old.serial, **fields)
        if old.trusted() != identity.trusted():
            log.info("bundle.updated", **fields)

    def set_policy(self, policy: authz.Policy) -> None:
        """New allow rules (SIGHUP): new handshakes check by them, established ones keep theirs."""
        if policy == self.policy:
            return
        self.policy = policy
        cur = self.current
        if cur is not None:
            self.current = Current(cur.identity, self._context_for(cur.identity))
