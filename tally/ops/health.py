"""``/healthz``, ``/readyz`` and ``/metrics`` for every daemon, on one small HTTP server.

Liveness says the process can answer at all; readiness says it can do its
job now (the CA has a signing key, the agent holds fresh SVIDs, the proxy has
a certificate) and, when not, says why in one line, so an operator does not
have to read logs to learn what a probe already knows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tally.ops.config import Address
from tally.ops.net import bound_address, open_listener
from tally.wire import http

Readiness = Callable[[], tuple[bool, str]]


async def _handle(
    registry: CollectorRegistry, ready: Readiness, req: http.Request
) -> http.Response:
    if req.method != "GET":
        return http.Response.json({"error": "method not allowed"}, status=405)
    if req.path == "/healthz":
        return http.Response.text("ok\n")
    if req.path == "/readyz":
        ok, why = ready()
        return http.Response.text(
            f"{'ready' if ok else 'not ready'}: {why}\n", status=200 if ok else 503
        )
    if req.path == "/metrics":
        return http.Response(200, generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
    return http.Response.json({"error": "not found"}, status=404)


async def serve_health(
    addr: Address,
    registry: CollectorRegistry,
    ready: Readiness,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = await open_listener(addr)
    handler = partial(_handle, registry, ready)

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            await http.serve_http(stream, handler, idle_timeout=10, request_timeout=10)

    async with trio.open_nursery() as nursery:
        task_status.started(bound_address(listener))
        await trio.serve_listeners(connection, [listener], handler_nursery=nursery)
