"""The proxy's counters, and how Prometheus reads them.

The hot path only bumps plain integers on one `Stats` object (the proxy is one
trio thread, so no locks); a custom collector turns them into metric families
when ``/metrics`` is scraped.  Label values are fixed words (outcomes, denial
reasons, directions), never peer-controlled text, so the series count stays
bounded whatever peers send.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.core import Metric

from tally.ops import metrics

# From a minute to a year: hour-lived SVIDs land in the low buckets, and a long-lived
# certificate from elsewhere stands out in the high ones.
CERT_SECONDS_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 21600, 86400, 604800, 2592000, 31536000)


@dataclass
class Stats:
    connections_open: int = 0
    connections_total: int = 0
    handshakes: Counter[str] = field(default_factory=Counter)
    """By outcome: ok, resumed, denied, failed, timeout."""
    denied: Counter[str] = field(default_factory=Counter)
    """By reason, e.g. not_allowed, expired, untrusted, no_certificate, tls_version."""
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    """HTTP mode, by status class: 2xx, 4xx, 5xx..."""
    request_timeouts: Counter[str] = field(default_factory=Counter)
    """HTTP mode, requests that did not arrive whole in time, by phase: head, body."""
    rotations: int = 0
    closed_peer_expired: int = 0
    pool_reused: int = 0
    pool_dialed: int = 0
    peer_cert_age: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(CERT_SECONDS_BUCKETS)
    )
    """Seconds since each verified peer leaf was issued, observed at its handshake."""
    peer_cert_remaining: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(CERT_SECONDS_BUCKETS)
    )
    """Seconds each verified peer leaf had left, observed at its handshake."""


@dataclass(frozen=True)
class SvidInfo:
    spiffe_id: str
    serial: str
    not_after: datetime


class ProxyCollector:
    def __init__(
        self,
        stats: Stats,
        svid: Callable[[], SvidInfo | None],
        clock: Callable[[], datetime],
        mode: str,
    ) -> None:
        self.stats = stats
        self.svid = svid
        self.clock = clock
        self.mode = mode

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield metrics.gauge(
            "tally_proxy_connections_open", "connections being served", s.connections_open
        )
        yield metrics.counter(
            "tally_proxy_connections", "connections accepted", s.connections_total
        )
        yield metrics.counter_by(
            "tally_proxy_handshakes", "TLS handshakes by outcome", ["outcome"], s.handshakes
        )
        yield metrics.counter_by(
            "tally_proxy_peer_denied", "peers refused during the handshake", ["reason"], s.denied
        )
        yield metrics.counter_by(
            "tally_proxy_bytes",
            "payload bytes forwarded",
            ["direction"],
            {"to_target": s.bytes_to_target, "from_target": s.bytes_from_target},
        )
        yield metrics.counter_by(
            "tally_proxy_http_requests", "HTTP requests by status class", ["status"], s.requests
        )
        yield metrics.counter_by(
            "tally_proxy_http_request_timeouts",
            "HTTP requests cut off by request_timeout, by what was still arriving",
            ["phase"],
            s.request_timeouts,
        )
        yield metrics.counter(
            "tally_proxy_rotations", "new SVIDs or bundles put into service", s.rotations
        )
        yield metrics.counter(
            "tally_proxy_peer_expired_closed",
            "connections closed because the peer certificate expired",
            s.closed_peer_expired,
        )
        yield metrics.counter(
            "tally_proxy_pool_reused",
            "requests sent on a reused upstream connection",
            s.pool_reused,
        )
        yield metrics.counter(
            "tally_proxy_pool_dialed", "upstream mTLS connections opened for HTTP", s.pool_dialed
        )
        yield metrics.histogram(
            "tally_proxy_peer_cert_age_seconds",
            "age of each verified peer certificate at its handshake (now - not_before)",
            s.peer_cert_age,
        )
        yield metrics.histogram(
            "tally_proxy_peer_cert_remaining_seconds",
            "time left on each verified peer certificate at its handshake (not_after - now)",
            s.peer_cert_remaining,
        )
        svid = self.svid()
        if svid is not None:
            yield metrics.info(
                "tally_proxy_svid",
                "the SVID this proxy presents",
                {"spiffe_id": svid.spiffe_id, "serial": svid.serial, "mode": self.mode},
            )
            yield metrics.gauge(
                "tally_proxy_svid_expiry_seconds",
                "seconds until the presented SVID expires",
                (svid.not_after - self.clock()).total_seconds(),
            )
