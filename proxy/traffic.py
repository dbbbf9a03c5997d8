"""What every connection shares, whichever way it goes: settings, counters, handshakes, splices.

Rules:

1. The proxy owns one `Traffic`, and a SIGHUP replaces its ``cfg`` in place:
   each step reads the settings it needs when it runs, so a reload reaches the
   next handshake, dial, request or splice without touching a connection.
2. A handshake is judged here for both directions (the server's inbound
   peers, the client's server proxy): its outcome is counted once by kind,
   and a refusal is one ``peer.denied`` line with a fixed reason.
3. A peer's certificate expiry becomes a trio deadline when the handshake
   ends (`expires_at`): connections are cut then, unless the operator allows
   expired peers.
4. Rotation policy (`tally.spiffe.peer_policy`) is judged here, right after
   the handshake and before a byte reaches the other side, for both
   directions.  Not inside OpenSSL's callback: the age depends on the clock,
   and a context remembers its verdict on a leaf for resumed handshakes
   (`tally.tls.contexts`), so a verdict there would never age.  The peer
   sees its connection closed rather than an alert.  An admitted peer's
   hard deadline is the earlier of its expiry and the moment it gets too
   old (``max_peer_age``), so a peer that stops rotating is cut off like an
   expired one.  The settings are read per handshake: SIGHUP reaches the next
   one, and connections already up keep the deadline they started with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import trio
from cryptography import x509

from proxy.bearer import BearerHooks
from proxy.hotswap import HotSwap, Mode
from proxy.http import Idlers
from proxy.metrics import Stats
from proxy.pool import DialError, Pool
from proxy.settings import ClientSettings, ServerSettings
from proxy.tcp import Deadline, Relay, Relayable
from tally.ops import net
from tally.ops.logs import get_logger
from tally.spiffe import peer_policy
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected, TLSError

log = get_logger("tally.proxy")


@dataclass(frozen=True)
class Peer:
    spiffe_id: SpiffeId
    leaf: x509.Certificate
    expires_at: float
    """trio time when its certificate expires (inf with --allow-expired-peer-connections)."""


class Traffic:
    def __init__(
        self,
        cfg: ServerSettings | ClientSettings,
        *,
        mode: Mode,
        clock: Callable[[], datetime],
        stats: Stats,
        swap: HotSwap,
    ) -> None:
        self.cfg = cfg
        self.mode = mode
        self.clock = clock
        self.stats = stats
        self.swap = swap
        self.idlers = Idlers()
        self.relay = Relay()
        self.pool: Pool | None = None
        """HTTP mode's kept-alive connections to the target (set by the proxy)."""
        self.bearer: BearerHooks | None = None
        """HTTP mode's JWT-SVID bearer tokens, out and in (set by the proxy)."""

    # -- handshakes (rules 2 and 3) --------------------------------------------------------

    def expires_at(self, leaf: x509.Certificate) -> float:
        """trio time when connections with this peer must end: expiry or max_peer_age (rule 4)."""
        ends = []
        if not self.cfg.allow_expired_peer_connections:
            ends.append(leaf.not_valid_after_utc)
        if self.cfg.max_peer_age is not None:
            ends.append(leaf.not_valid_before_utc + timedelta(seconds=self.cfg.max_peer_age))
        if not ends:
            return math.inf
        left = (min(ends) - self.clock()).total_seconds()
        return trio.current_time() + left

    def _judge(self, leaf: x509.Certificate) -> peer_policy.Judgement:
        """Rule 4, and the compliance histograms: every verified peer leaf is observed once."""
        now = self.clock()
        not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        self.stats.peer_cert_age.observe((now - not_before).total_seconds())
        self.stats.peer_cert_remaining.observe((not_after - now).total_seconds())
        return peer_policy.judge(self.cfg.rotation_policy(), not_before, not_after, now)

    def _denied(self, reason: str, detail: str, peer_id: SpiffeId | None, where: str) -> None:
        label = reason.split(":", 1)[0]
        self.stats.handshakes["denied"] += 1
        self.stats.denied[label] += 1
        log.warning(
            "peer.denied",
            peer_id=str(peer_id) if peer_id is not None else None,
            reason=label,
            detail=detail,
            peer=where,
            mode=self.mode,
        )

    async def handshake(self, stream: TLSStream, where: str) -> Peer | None:
        """Run and judge a handshake; None (after logging and counting) if it failed."""
        with trio.move_on_after(self.cfg.handshake_timeout):
            try:
                await stream.do_handshake()
            except PeerRejected as exc:
                self._denied(exc.reason, str(exc), exc.peer_id, where)
                return None
            except TLSError as exc:
                if exc.reason is not None:
                    self._denied(exc.reason, str(exc), None, where)
                else:
                    self.stats.handshakes["failed"] += 1
                    log.info("handshake.failed", peer=where, error=str(exc), mode=self.mode)
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.stats.handshakes["failed"] += 1
                log.debug("handshake.failed", peer=where, error=exc, mode=self.mode)
                return None
            verified = stream.peer_identity
            chain = stream.peer_chain
            if not isinstance(verified, SpiffeId) or not chain:  # pragma: no cover - tls rule 4
                self.stats.handshakes["failed"] += 1
                return None
            leaf = chain[0]
            verdict = self._judge(leaf)
            if verdict.reason is not None:
                self._denied(verdict.reason, f"{verified}: {verdict.detail}", verified, where)
                return None
            self.stats.handshakes["resumed" if stream.resumed else "ok"] += 1
            return Peer(verified, leaf, self.expires_at(leaf))
        self.stats.handshakes["timeout"] += 1
        log.info("handshake.timeout", peer=where, timeout_s=self.cfg.handshake_timeout)
        return None

    # -- the target and the bytes ----------------------------------------------------------

    async def connect_target(self) -> trio.SocketStream:
        """A connection to --target, or DialError."""
        try:
            with trio.fail_after(self.cfg.connect_timeout):
                return await net.connect(self.cfg.target)
        except trio.TooSlowError as exc:
            raise DialError(f"connecting to {self.cfg.target} timed out", timeout=True) from exc
        except OSError as exc:
            raise DialError(f"cannot connect to {self.cfg.target}: {exc.strerror or exc}") from exc

    async def splice(
        self, client: Relayable, target: Relayable, peer_id: SpiffeId | None, hard_at: float
    ) -> None:
        """TCP mode, both directions: relay until both sides end or a deadline cuts them."""
        why = await self.relay.splice(
            client,
            target,
            Deadline(self.cfg.idle_timeout, hard_at),
            self.count_to,
            self.count_from,
        )
        self.ended(why, peer_id)

    def count_to(self, n: int) -> None:
        self.stats.bytes_to_target += n

    def count_from(self, n: int) -> None:
        self.stats.bytes_from_target += n

    def ended(self, why: str, peer_id: SpiffeId | None) -> None:
        """Note why a connection ended: closed, reset, idle, draining, bad_request, peer_expired."""
        if why == "peer_expired":
            self.stats.closed_peer_expired += 1
            log.info("connection.peer_expired", peer_id=str(peer_id))
        else:
            log.debug("connection.ended", why=why, peer_id=str(peer_id) if peer_id else None)
