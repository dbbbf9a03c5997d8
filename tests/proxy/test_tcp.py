"""proxy.tcp's deadline on its own, in virtual time: how activity moves it, and the hard stop."""

from __future__ import annotations

import math

import pytest
import trio

from proxy.tcp import PUSH_EVERY_S, Deadline


async def test_activity_moves_the_idle_deadline_at_most_every_push_interval(autojump_clock):
    start = trio.current_time()
    d = Deadline(30)
    assert d.scope.deadline == pytest.approx(start + 30)
    d.touch(start + PUSH_EVERY_S / 2)  # too soon: the heap push is saved
    assert d.scope.deadline == pytest.approx(start + 30)
    d.touch(start + PUSH_EVERY_S)
    assert d.scope.deadline == pytest.approx(start + PUSH_EVERY_S + 30)
    assert d.pushed_at == pytest.approx(start + PUSH_EVERY_S)


async def test_the_hard_stop_caps_the_deadline_and_never_moves(autojump_clock):
    start = trio.current_time()
    d = Deadline(30, hard_at=start + 10)
    assert d.scope.deadline == pytest.approx(start + 10)
    d.touch(start + 5)
    assert d.scope.deadline == pytest.approx(start + 10)
    assert d.why() == "idle"
    await trio.sleep(10)
    assert d.why() == "peer_expired"


async def test_without_a_hard_stop_a_fired_deadline_means_idle(autojump_clock):
    d = Deadline(1)
    assert d.hard_at == math.inf
    with d.scope:
        await trio.sleep_forever()
    assert d.scope.cancelled_caught
    assert d.why() == "idle"
    assert trio.current_time() == pytest.approx(1)
