"""The key schedule through simulated time: the rotation rules of DESIGN.md as invariants."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from ca.schedule import KeyState, Policy, Step, bundle_roots, decide


class Sim:
    """Applies steps the way ca.keys does, recording when roots were published and used."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.keys: list[KeyState] = []
        self.ids = itertools.count()
        self.published: dict[str, int] = {}
        self.first_signing: dict[str, int] = {}
        self.removed_at: dict[str, int] = {}
        self.activations: list[tuple[int, KeyState | None]] = []

    def active(self, kind: str) -> KeyState | None:
        return next((k for k in self.keys if k.kind == kind and k.state == "active"), None)

    def apply(self, step: Step, now: int) -> None:
        if step.kind in ("create_root", "create_intermediate"):
            kind = "root" if step.kind == "create_root" else "intermediate"
            ttl = self.policy.root_ttl if kind == "root" else self.policy.intermediate_ttl
            parent = None
            not_after = now + ttl
            if kind == "intermediate":
                root = self.active("root")
                assert root is not None
                parent = root.id
                not_after = min(not_after, root.not_after)
                self.first_signing.setdefault(root.id, now)
            key = KeyState(
                f"{kind}-{next(self.ids)}",
                kind,  # type: ignore[arg-type]
                "active" if step.activate else "prepared",
                parent,
                now,
                not_after,
                now,
                now if step.activate else None,
            )
            if kind == "root":
                self.published[key.id] = now
            if step.activate:
                self._retire(kind, now)
            self.keys.append(key)
            if step.activate and kind == "intermediate":
                self.activations.append((now, None))
        else:
            old = next(k for k in self.keys if k.id == step.key_id)
            if step.kind.startswith("activate"):
                prev = self.active(old.kind)
                self._retire(old.kind, now)
                if old.kind == "intermediate":
                    self.activations.append((now, prev))
                new = replace(old, state="active", activated_at=now)
            else:
                new = replace(old, state="removed")
                self.removed_at[old.id] = now
            self.keys = [new if k.id == old.id else k for k in self.keys]

    def _retire(self, kind: str, now: int) -> None:
        self.keys = [
            replace(k, state="retired") if k.kind == kind and k.state == "active" else k
            for k in self.keys
        ]

    def settle(self, now: int) -> None:
        for _ in range(16):
            step = decide(self.keys, now, self.policy)
            if step is None:
                return
            self.apply(step, now)
        raise AssertionError("schedule did not settle")

    def check(self, now: int) -> None:
        root = self.active("root")
        inter = self.active("intermediate")
        assert root is not None and inter is not None
        assert inter.parent_id == root.id
        assert inter.not_before <= now < inter.not_after
        # A root is used only after it was published for the propagation window
        # (the very first root has nobody to propagate to).
        first_root = self.keys[0].id
        for root_id, used in self.first_signing.items():
            if root_id != first_root:
                assert used - self.published[root_id] >= self.policy.root_propagation
        # A root leaves the bundle only when every intermediate under it has expired.
        for root_id, removed in self.removed_at.items():
            for k in self.keys:
                if k.parent_id == root_id and k.activated_at is not None:
                    assert k.not_after <= removed
        # Every intermediate that can still vouch for SVIDs chains to a root in the bundle.
        in_bundle = {k.id for k in bundle_roots(self.keys)}
        for k in self.keys:
            if k.kind == "intermediate" and k.state != "removed" and k.not_after > now:
                assert k.parent_id in in_bundle


@settings(max_examples=60, deadline=None)
@given(
    inter_ttl=st.integers(60, 86400),
    root_factor=st.integers(20, 200),
    prop_fraction=st.floats(0.0, 0.3),
    steps=st.lists(st.integers(1, 5000), min_size=5, max_size=200),
)
def test_invariants_hold_over_any_timeline(inter_ttl, root_factor, prop_fraction, steps):
    root_ttl = inter_ttl * root_factor
    policy = Policy(inter_ttl, root_ttl, int(root_ttl * prop_fraction / 3))
    sim = Sim(policy)
    now = 1_000_000
    sim.settle(now)
    sim.check(now)
    for delta in steps:
        # Ticks never step further than a tenth of an intermediate's life, as the CA's loop does.
        now += min(delta, inter_ttl // 10)
        sim.settle(now)
        sim.check(now)


def test_intermediate_prepared_before_half_and_activated_before_five_sixths():
    policy = Policy(intermediate_ttl=600, root_ttl=10**8, root_propagation=3600)
    sim = Sim(policy)
    sim.settle(0)
    first = sim.active("intermediate")
    assert first is not None
    prepared_at = activated_at = None
    for now in range(0, 600):
        sim.settle(now)
        if prepared_at is None and any(k.state == "prepared" for k in sim.keys):
            prepared_at = now
        if sim.active("intermediate") != first and activated_at is None:
            activated_at = now
    assert prepared_at is not None and prepared_at < 300
    assert activated_at is not None and activated_at < 500
    retired = next(k for k in sim.keys if k.id == first.id)
    assert retired.state == "retired"


def test_root_rotation_publishes_first_then_uses_then_removes():
    policy = Policy(intermediate_ttl=100, root_ttl=10_000, root_propagation=50)
    sim = Sim(policy)
    sim.settle(0)
    old_root = sim.active("root")
    assert old_root is not None
    sim.apply(Step("create_root", reason="operator"), 10)
    new_root = next(k for k in sim.keys if k.state == "prepared")
    assert {k.id for k in bundle_roots(sim.keys)} == {old_root.id, new_root.id}
    sim.settle(59)
    assert sim.active("root") == old_root  # still inside the propagation window
    sim.settle(60)
    active = sim.active("root")
    assert active is not None and active.id == new_root.id
    inter = sim.active("intermediate")
    assert inter is not None and inter.parent_id == new_root.id
    # The old root stays while the intermediate it signed is still valid...
    sim.settle(99)
    assert old_root.id in {k.id for k in bundle_roots(sim.keys)}
    # ...and leaves the bundle once it is not.
    sim.settle(100)
    assert old_root.id not in {k.id for k in bundle_roots(sim.keys)}


def test_own_root_rotates_itself_but_upstream_never_does():
    for own in (True, False):
        policy = Policy(intermediate_ttl=100, root_ttl=3000, root_propagation=10, own_root=own)
        sim = Sim(policy)
        sim.settle(0)
        sim.settle(2001)
        prepared = [k for k in sim.keys if k.kind == "root" and k.state == "prepared"]
        assert bool(prepared) is own
