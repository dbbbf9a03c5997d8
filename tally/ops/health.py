"""``/healthz``, ``/readyz`` and ``/metrics`` for every daemon, on one small HTTP server.

Liveness says the process can answer at all; readiness says it can do its
job now (the CA has a signing key, the agent holds fresh SVIDs, the proxy has
a certificate) and, when not, says why in one line, so an operator does not
have to read logs to learn what a probe already knows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tally.ops.config import Address
from tally.ops.logs import get_logger
from tally.ops.net import bound_address, open_listener
from tally.wire import http

Readiness = Callable[[], tuple[bool, str]]
log = get_logger("tally.health")


class ReadyWatch:
    """Turns readiness samples into ``ready.lost`` / ``ready.regained`` transitions.

    Lost is said only after ``grace`` samples in a row are not ready, and only once the
    daemon has been ready at all: a start that is still waiting for its first SVID, or a
    moment between a new entry and its SVID, is not a loss anyone needs to act on.
    """

    def __init__(self, grace: int = 2) -> None:
        self.grace = grace
        self.was_ready = False
        self.lost = False
        self.misses = 0

    def observe(self, ok: bool) -> str | None:
        """The event one more sample makes: "ready.lost", "ready.regained" or None."""
        if ok:
            self.misses = 0
            self.was_ready = True
            if self.lost:
                self.lost = False
                return "ready.regained"
            return None
        self.misses += 1
        if self.was_ready and not self.lost and self.misses >= self.grace:
            self.lost = True
            return "ready.lost"
        return None


async def watch_ready(ready: Readiness, *, every: float = 1.0) -> None:
    """Log readiness changes, so hooks (``on = ["ready.lost"]``) and log readers hear of
    them without a probe: the same one-line reason ``/readyz`` gives."""
    watch = ReadyWatch()
    while True:
        ok, why = ready()
        event = watch.observe(ok)
        if event == "ready.lost":
            log.warning("ready.lost", why=why)
        elif event == "ready.regained":
            log.info("ready.regained", why=why)
        await trio.sleep(every)


async def _handle(
    metrics: Callable[[], Awaitable[bytes]],
    ready: Callable[[], Awaitable[tuple[bool, str]]],
    req: http.Request,
) -> http.Response:
    if req.method != "GET":
        return http.Response.json({"error": "method not allowed"}, status=405)
    if req.path == "/healthz":
        return http.Response.text("ok\n")
    if req.path == "/readyz":
        ok, why = await ready()
        return http.Response.text(
            f"{'ready' if ok else 'not ready'}: {why}\n", status=200 if ok else 503
        )
    if req.path == "/metrics":
        return http.Response(200, await metrics(), content_type=CONTENT_TYPE_LATEST)
    return http.Response.json({"error": "not found"}, status=404)


async def serve_health(
    addr: Address,
    registry: CollectorRegistry,
    ready: Readiness,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def metrics() -> bytes:
        return generate_latest(registry)

    async def ready_now() -> tuple[bool, str]:
        return ready()

    await serve_probes(addr, metrics, ready_now, task_status=task_status)


async def serve_probes(
    addr: Address,
    metrics: Callable[[], Awaitable[bytes]],
    ready: Callable[[], Awaitable[tuple[bool, str]]],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_health` for answers that need I/O: the proxy's supervisor asks its workers."""
    listener = await open_listener(addr)
    handler = partial(_handle, metrics, ready)

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            await http.serve_http(stream, handler, idle_timeout=10, request_timeout=10)

    async with trio.open_nursery() as nursery:
        task_status.started(bound_address(listener))
        await trio.serve_listeners(connection, [listener], handler_nursery=nursery)
