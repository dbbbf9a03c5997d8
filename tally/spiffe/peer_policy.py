"""Rotation policy at the proxy: how long a peer's leaf may live, and how old it may be.

Chaining to a trusted root says who issued a certificate, not that its holder
still rotates.  A long-lived leaf (from another issuer, a federated trust
domain, or a hand-minted file) and a leaf from a peer whose rotation stopped
both chain fine until they expire; this module is the rule that cuts them off
earlier.

Rules:

1. ``max_lifetime`` bounds ``not_after - not_before``: a leaf that was *issued*
   to live longer is refused (``lifetime_exceeds_policy``) whatever its age.
2. ``max_age`` bounds ``now - not_before``: a leaf issued longer ago is refused
   (``stale_certificate``), so a peer that stopped rotating is cut off before
   its certificate expires.  Lifetime is checked first: it does not change
   with time, so its reason is the more useful one to an operator.
3. An admitted peer gets a hard deadline, ``min(not_after, not_before +
   max_age)``: the moment it falls out of policy.  The proxy closes its
   connections then, exactly as it does at expiry.
4. ``None`` means no bound.  Pure: the caller passes ``now``, so tests pin it;
   the proxy passes its wall clock at the end of each handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

LIFETIME_EXCEEDS_POLICY = "lifetime_exceeds_policy"
STALE_CERTIFICATE = "stale_certificate"


@dataclass(frozen=True)
class RotationPolicy:
    """Bounds on a peer leaf, in seconds; ``None`` is no bound."""

    max_lifetime: float | None = None
    max_age: float | None = None

    @property
    def empty(self) -> bool:
        return self.max_lifetime is None and self.max_age is None


@dataclass(frozen=True)
class Judgement:
    """What the policy says about one leaf at one moment."""

    reason: str | None
    """None if admitted, else `LIFETIME_EXCEEDS_POLICY` or `STALE_CERTIFICATE`."""
    detail: str
    deadline: datetime
    """When the leaf stops being acceptable: ``min(not_after, not_before + max_age)``."""

    @property
    def admitted(self) -> bool:
        return self.reason is None


def judge(
    policy: RotationPolicy, not_before: datetime, not_after: datetime, now: datetime
) -> Judgement:
    """Judge a leaf's validity period against ``policy`` at ``now`` (rules 1-3)."""
    deadline = not_after
    if policy.max_age is not None:
        deadline = min(deadline, not_before + timedelta(seconds=policy.max_age))
    lifetime = (not_after - not_before).total_seconds()
    if policy.max_lifetime is not None and lifetime > policy.max_lifetime:
        return Judgement(
            LIFETIME_EXCEEDS_POLICY,
            f"the certificate lives {lifetime:.0f}s, more than max_peer_lifetime "
            f"{policy.max_lifetime:.0f}s",
            deadline,
        )
    if policy.max_age is not None:
        age = (now - not_before).total_seconds()
        if age > policy.max_age:
            return Judgement(
                STALE_CERTIFICATE,
                f"the certificate was issued {age:.0f}s ago, more than max_peer_age "
                f"{policy.max_age:.0f}s: its holder has stopped rotating",
                deadline,
            )
    return Judgement(None, "", deadline)
