"""The store's one worker thread, which takes its next call the moment one ends.

Every datastore call runs in one thread (`ca.server` rule 4): SQLite sees one
writer and the event loop never blocks on disk.  That thread used to be trio's
``to_thread.run_sync`` behind a ``CapacityLimiter(1)``, where a call's answer, the
limiter's token and the next caller's start each wait for a turn of the event
loop.  Under a herd (10,000 agents reconnecting, `bench.fleet`) a turn lasts as
long as thousands of handshakes take, so the thread stood idle between calls
while a thousand waited, nothing was signed for minutes, and the queue told every
agent 429.

Rules:

1. Calls run in the order they were made, one at a time, back to back: the thread
   never waits for the event loop between two calls.  The event loop hears each
   answer when it next turns.
2. A caller waits for its call to finish, cancelled or not, as ``to_thread`` does
   by default: a datastore transaction is never abandoned half way by the task
   that asked for it.
3. `queued` counts calls made and not yet answered, the running one included: the
   CA's measure of overload (`ca.throttle.overload_retry_after`).
4. The thread starts with the first call and ends at `close`, which waits up to
   `CLOSE_WAIT` for the calls already made (a datastore gone quiet must not hold up
   the process's exit; the thread is a daemon); calls made after `close` fail with
   ``RuntimeError``.  Each call runs in a copy of its caller's
   context variables, as ``to_thread`` runs it.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = Callable[[], None]

CLOSE_WAIT = 5.0
"""Longest `close` waits for calls already made (rule 4)."""


class StoreThread:
    def __init__(self, name: str = "tally-store") -> None:
        self.name = name
        self.queued = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the store's thread; its result or its exception, here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("the store's thread is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        context = contextvars.copy_context()

        def job() -> None:
            result = outcome.capture(context.run, fn)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the caller's run ended; nobody to tell
                pass

        self.queued += 1
        self._jobs.put(job)
        try:
            answer: T = await trio.lowlevel.wait_task_rescheduled(
                lambda _: trio.lowlevel.Abort.FAILED
            )
        finally:
            self.queued -= 1
        return answer

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def close(self) -> None:
        """Let the calls already made finish, then end the thread (rule 4)."""
        self._closed = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(CLOSE_WAIT)
