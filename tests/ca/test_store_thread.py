"""The store's one thread (`ca.store_thread`): calls back to back, in order, never
abandoned, counted while they wait."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import trio
import trio.testing

from ca.store_thread import StoreThread

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def test_calls_run_back_to_back_while_the_event_loop_is_busy() -> None:
    """Rule 1: the second and third calls start without a turn of the event loop, so a
    loop busy with a herd's handshakes no longer leaves the thread idle between calls.
    (Behind trio's ``CapacityLimiter(1)`` the second call waited for the loop.)"""
    store = StoreThread()
    made: list[int] = []
    ran: list[int] = []
    all_ran, go = threading.Event(), threading.Event()

    def call(i: int) -> int:
        go.wait(timeout=10)
        ran.append(i)
        if len(ran) == 3:
            all_ran.set()
        return i * 10

    results: list[int] = []

    async def ask(i: int) -> None:
        made.append(i)
        results.append(await store.run(lambda: call(i)))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(ask, i)
            await trio.testing.wait_all_tasks_blocked()
            assert store.queued == 3  # one running (held by ``go``), two waiting
            go.set()
            # The event loop stays blocked here: the thread must get through all three.
            assert all_ran.wait(timeout=10)
            assert ran == made
        assert sorted(results) == [0, 10, 20]
        assert store.queued == 0
    finally:
        store.close()


async def test_an_exception_comes_back_to_the_caller_and_the_thread_goes_on() -> None:
    store = StoreThread()

    def fail() -> None:
        raise ValueError("no such agent")

    try:
        with pytest.raises(ValueError, match="no such agent"):
            await store.run(fail)
        assert await store.run(lambda: 42) == 42
    finally:
        store.close()


async def test_a_cancelled_caller_waits_for_its_call_to_finish() -> None:
    """Rule 2: a transaction is not abandoned by the task that asked for it."""
    store = StoreThread()
    release, finished = threading.Event(), []

    def slow() -> str:
        release.wait(timeout=10)
        time.sleep(0.01)
        finished.append(True)
        return "done"

    try:
        with trio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
                await trio.sleep(0.05)  # the call is still running: the caller still waits
                assert not finished
                release.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_soon)
                assert await store.run(slow) == "done"  # the answer is not thrown away
                await trio.lowlevel.checkpoint()
                pytest.fail("the cancellation arrives at the caller's next checkpoint")
        assert scope.cancelled_caught
        assert finished == [True]
        assert store.queued == 0
    finally:
        release.set()
        store.close()


async def test_each_call_sees_its_callers_context_variables() -> None:
    store = StoreThread()
    try:
        WHO.set("agent-7")
        assert await store.run(WHO.get) == "agent-7"
    finally:
        store.close()


async def test_after_close_calls_are_refused() -> None:
    store = StoreThread()
    assert await store.run(lambda: 1) == 1
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.run(lambda: 2)
    StoreThread().close()  # never started: nothing to end
