"""When the CA's signing keys are made, used and dropped: a pure decision table.

Rules (DESIGN.md, "Identity and rotation rules"):

1. SVIDs are signed by an *intermediate* that rotates under a long-lived
   *root*; bundles carry roots only.  So a routine intermediate rotation needs
   no peer to learn anything.
2. The next intermediate is prepared once the active one is a third through
   its life and activated at two thirds: before the half and five-sixths marks
   the design sets as the latest moments.  An SVID signed late by the old
   intermediate is capped at that intermediate's expiry, so activating with a
   third of its life left keeps caps away from ordinary SVIDs.
3. A new root is *published* first (it joins the bundle, the bundle's sequence
   goes up, agents push it to every workload) and *used* only once the
   propagation window has passed.  Nothing is ever signed by a key that some
   peer does not yet trust.
4. A retired root stays in the bundle until nothing it signed is still valid:
   leaves are capped at their intermediate's expiry, so that is the latest
   expiry of the intermediates under it.
5. Without an upstream root the CA rotates its own root when it is two thirds
   through its life.  With an upstream root the operator owns that key, and
   the CA never replaces it.
6. Every certificate the CA makes starts a little before it is made
   (`not_before_cushion`), so that a peer whose clock is a few seconds behind
   the CA's does not find a fresh root, intermediate or SVID not yet valid.
   The schedule itself counts from the moment of issue, not from the backdated
   not_before.

`decide` looks at the keys as they are and says what to do next; the shell in
``ca.keys`` does it, stores the result and calls `decide` again until it
returns nothing.  Each step changes state so that the next call moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

# Seconds a certificate starts before the moment it is issued (rule 6).
MAX_NOT_BEFORE_CUSHION = 10


def not_before_cushion(ttl: int) -> timedelta:
    """The backdating for a certificate that lives `ttl` seconds: at most a tenth of
    its life, so that half-life (when renewal is due) stays after the moment of
    issue even for SVIDs that live seconds."""
    return timedelta(seconds=min(MAX_NOT_BEFORE_CUSHION, ttl // 10))


StepKind = Literal[
    "create_root",
    "activate_root",
    "remove_root",
    "create_intermediate",
    "activate_intermediate",
    "remove_intermediate",
]


@dataclass(frozen=True)
class KeyState:
    """The part of a stored key that the schedule looks at."""

    id: str
    kind: Literal["root", "intermediate"]
    state: Literal["prepared", "active", "retired", "removed"]
    parent_id: str | None
    not_before: int
    not_after: int
    created_at: int
    activated_at: int | None = None


@dataclass(frozen=True)
class Policy:
    intermediate_ttl: int
    root_ttl: int
    root_propagation: int
    own_root: bool = True


@dataclass(frozen=True)
class Step:
    kind: StepKind
    key_id: str | None = None
    activate: bool = False
    reason: str = ""


def _age_fraction(key: KeyState, now: int) -> float:
    life = max(1, key.not_after - key.not_before)
    return (now - key.not_before) / life


def decide(keys: Sequence[KeyState], now: int, policy: Policy) -> Step | None:
    """The next step, or None when the keys are as they should be at ``now``."""
    live = [k for k in keys if k.state != "removed"]
    roots = [k for k in live if k.kind == "root"]
    inters = [k for k in live if k.kind == "intermediate"]
    active_root = next((k for k in roots if k.state == "active"), None)
    prepared_root = next((k for k in roots if k.state == "prepared"), None)
    active_inter = next((k for k in inters if k.state == "active"), None)
    prepared_inter = next((k for k in inters if k.state == "prepared"), None)

    if active_root is None:
        if prepared_root is not None:
            return Step("activate_root", prepared_root.id, reason="no active root")
        return Step("create_root", activate=True, reason="first start")

    if prepared_root is not None and now >= prepared_root.created_at + policy.root_propagation:
        return Step("activate_root", prepared_root.id, reason="propagation window passed")

    if policy.own_root and prepared_root is None and _age_fraction(active_root, now) >= 2 / 3:
        return Step("create_root", reason="root two thirds through its life")

    under_active_root = active_inter is not None and active_inter.parent_id == active_root.id
    if active_inter is None or not under_active_root or now >= active_inter.not_after:
        return Step(
            "create_intermediate",
            activate=True,
            reason="no usable intermediate under the active root",
        )

    if prepared_inter is not None and prepared_inter.parent_id != active_root.id:
        return Step("remove_intermediate", prepared_inter.id, reason="prepared under an old root")

    if prepared_inter is None and _age_fraction(active_inter, now) >= 1 / 3:
        return Step("create_intermediate", reason="active intermediate a third through its life")

    if prepared_inter is not None and _age_fraction(active_inter, now) >= 2 / 3:
        return Step(
            "activate_intermediate",
            prepared_inter.id,
            reason="active intermediate two thirds through its life",
        )

    for inter in inters:
        if inter.state == "retired" and now >= inter.not_after:
            return Step("remove_intermediate", inter.id, reason="expired")

    for root in roots:
        if root.state != "retired":
            continue
        # Only intermediates that were ever active signed anything.
        signed = [
            k
            for k in keys
            if k.kind == "intermediate" and k.parent_id == root.id and k.activated_at is not None
        ]
        last_valid = max((k.not_after for k in signed), default=0)
        if now >= last_valid:
            return Step("remove_root", root.id, reason="nothing it signed is still valid")
    return None


def bundle_roots(keys: Sequence[KeyState]) -> list[KeyState]:
    """The roots peers must trust: published, in use, or still vouching for live SVIDs."""
    return [k for k in keys if k.kind == "root" and k.state in ("prepared", "active", "retired")]
