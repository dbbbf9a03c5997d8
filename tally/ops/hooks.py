"""Remediation hooks, the trio half: a log sink that hands chosen events to per-hook workers.

`tally.ops.hook_rules` decides what a hook is, what it gets and what is
coalesced or dropped; this module only moves events and bytes.

Theory of operation:

1. Hooks ride on the structured log.  `Hooks.run` attaches one handler to the
   root logger; every event any part of the daemon logs passes it, and those a
   hook subscribed to (``on``) are put in that hook's `Outbox`.  So every
   daemon gets hooks for every event it logs, with no call sites to keep in
   step, and a hook sees exactly what the log does (also: nothing below the
   configured log level).
2. The handler never waits.  It runs in whatever thread logged (trio's or a
   worker thread), takes a lock held only for a dictionary update, and wakes
   the hook's worker through ``TrioToken.run_sync_soon``.  A hook that hangs,
   fails or floods therefore costs a rotation, a handshake or a request one
   dictionary update, never a wait: the bounded outbox drops what does not
   fit, and counts it.
3. One worker task per hook, so a slow hook delays only itself.  Each
   delivery attempt runs under the hook's ``timeout``; a failed one is retried
   ``retries`` times with jittered exponential backoff, then logged
   (``hook.failed``) and counted.  A command is run without a shell, with
   the event as JSON on stdin and without the daemon's ``TALLY_*`` variables
   (a secret may live there, `tally.ops.config` rule 5).  A URL gets a POST
   over TLS verified against the system roots or the hook's ``ca_file``.
4. SIGHUP: `Hooks.update` swaps the declared hooks.  Hooks that did not change
   keep their outboxes; the workers restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import trio
from prometheus_client.core import Metric

from tally.ops import metrics
from tally.ops.hook_rules import (
    QUEUED,
    HookSpec,
    Outbox,
    Pending,
    event_of,
    payload,
)
from tally.ops.logs import event_of as record_event
from tally.ops.logs import get_logger, timestamp
from tally.spiffe.rotation import backoff
from tally.wire.http import HttpClient, HttpClientError

log = get_logger("tally.hooks")

Send = Callable[[HookSpec, bytes], Awaitable[None]]
"""Delivers one payload to one hook, or raises `DeliveryError`; tests may pass their own."""


class DeliveryError(Exception):
    """One attempt to deliver failed; the message says how, without the payload."""


class _Live:
    """A declared hook with its outbox and the event its worker sleeps on."""

    def __init__(self, spec: HookSpec) -> None:
        self.spec = spec
        self.outbox = Outbox(spec.queue, spec.coalesce)
        self.wake = trio.Event()

    def wake_up(self) -> None:
        self.wake.set()


class Hooks:
    """The hooks of one daemon; `run` it in the daemon's nursery, `update` it on SIGHUP."""

    def __init__(
        self,
        daemon: str,
        specs: Sequence[HookSpec] = (),
        *,
        identity: Callable[[], str | None] = lambda: None,
        send: Send | None = None,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.daemon = daemon
        self.identity = identity
        self._send: Send = send if send is not None else deliver
        self._now = now
        self._rng = rng or random.Random()
        self._host = socket.gethostname()
        self._lock = threading.Lock()
        self._live: list[_Live] = [_Live(s) for s in specs]
        self._events = self._subscribed()
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()
        self.counts: Counter[str] = Counter()
        """By outcome: queued, coalesced, dropped, delivered, retried, failed."""

    def _subscribed(self) -> frozenset[str]:
        return frozenset().union(*(live.spec.on for live in self._live))

    @property
    def specs(self) -> tuple[HookSpec, ...]:
        return tuple(live.spec for live in self._live)

    # -- the sink (rules 1 and 2) --------------------------------------------------------------

    def offer(self, name: str, created: float, fields: Mapping[str, object]) -> None:
        """Hand one logged event to every hook that wants it; never waits (rule 2)."""
        if name not in self._events or name.startswith("hook."):
            return
        event = event_of(name, timestamp(created), fields, self.identity())
        now = self._now()
        woken = []
        with self._lock:
            for live in self._live:
                if name not in live.spec.on:
                    continue
                outcome = live.outbox.offer(event, now)
                self.counts[outcome] += 1
                if outcome == QUEUED:
                    woken.append(live)
        token = self._token
        for live in woken:
            if token is not None:
                try:
                    token.run_sync_soon(live.wake_up)
                except trio.RunFinishedError:
                    return

    # -- workers (rule 3) ------------------------------------------------------------------

    async def _worker(self, live: _Live) -> None:
        while True:
            live.wake = trio.Event()
            with self._lock:
                item = live.outbox.take(self._now())
            if item is None:
                await live.wake.wait()
                continue
            await self._deliver(live.spec, item)

    def _count(self, outcome: str) -> None:
        with self._lock:  # `offer` counts from other threads too
            self.counts[outcome] += 1

    async def _deliver(self, spec: HookSpec, item: Pending) -> None:
        doc = payload(self.daemon, self._host, item.event, item.repeats)
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        error = ""
        for attempt in range(spec.retries + 1):
            if attempt:
                self._count("retried")
                await trio.sleep(backoff(attempt - 1, self._rng, base=1.0, cap=30.0))
            try:
                with trio.fail_after(spec.timeout):
                    await self._send(spec, body)
            except trio.TooSlowError:
                error = f"no answer within {spec.timeout:g}s"
            except DeliveryError as exc:
                error = str(exc)
            except Exception as exc:  # a bug in a transport must not take the daemon down
                error = f"{type(exc).__name__}: {exc}"
            else:
                self._count("delivered")
                return
        self._count("failed")
        log.warning(
            "hook.failed",
            hook=spec.describe(),
            hook_event=item.event.name,
            attempts=spec.retries + 1,
            error=error,
        )

    # -- lifetime (rules 1 and 4) ----------------------------------------------------------

    def update(self, specs: Sequence[HookSpec]) -> None:
        """SIGHUP: new declarations; unchanged hooks keep what they hold."""
        if tuple(specs) == self.specs:
            return
        with self._lock:
            old = {live.spec: live for live in self._live}
            self._live = [old.get(spec) or _Live(spec) for spec in specs]
            self._events = self._subscribed()
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        sink = _Sink(self)
        root = logging.getLogger()
        root.addHandler(sink)
        try:
            task_status.started()
            while True:
                self._changed = trio.Event()
                async with trio.open_nursery() as workers:
                    for live in self._live:
                        workers.start_soon(self._worker, live)
                    await self._changed.wait()
                    workers.cancel_scope.cancel()
        finally:
            root.removeHandler(sink)
            self._token = None

    def metrics(self, prefix: str) -> Iterator[Metric]:
        """The daemon's hook counter, ``<prefix>_hook_events_total{outcome}``."""
        yield metrics.counter_by(
            f"{prefix}_hook_events",
            "events for remediation hooks, by outcome: queued, coalesced, dropped, delivered, "
            "retried, failed",
            ["outcome"],
            self.counts,
        )


class _Sink(logging.Handler):
    """Rule 1: every record passes here; only hooked events go further."""

    def __init__(self, hooks: Hooks) -> None:
        super().__init__()
        self.hooks = hooks

    def emit(self, record: logging.LogRecord) -> None:
        try:
            found = record_event(record)
            if found is not None:
                self.hooks.offer(found[0], record.created, found[1])
        except Exception:  # a hook must never break the logging of the daemon
            return


# -- the two transports (rule 3) ------------------------------------------------------------


async def deliver(spec: HookSpec, body: bytes) -> None:
    if spec.command is not None:
        await _run_command(spec.command, body)
    else:
        assert spec.url is not None
        await _post(spec.url, spec.ca_file, body, spec.timeout)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}


async def _run_command(argv: tuple[str, ...], body: bytes) -> None:
    try:
        done = await trio.run_process(
            list(argv),
            stdin=body,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            env=_child_env(),
        )
    except OSError as exc:
        raise DeliveryError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        raise DeliveryError(f"{argv[0]} exited with status {done.returncode}")


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _why(exc: HttpClientError) -> str:
    """What went wrong, without the request target (a webhook's path may hold its key)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return str(exc).split(": ", 1)[-1]


async def _post(url: str, ca_file: str | None, body: bytes, timeout: float) -> None:  # noqa: ASYNC109 - the attempt's own bound, also set outside
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        ctx = _tls_context(ca_file) if https else None
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"ca_file {ca_file}: {exc}") from exc

    async def connect() -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        if ctx is None:
            return stream
        return trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)

    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    client = HttpClient(connect, host=parts.netloc.rpartition("@")[2])
    try:
        response = await client.request(
            "POST",
            target,
            body=body,
            headers=[("content-type", "application/json"), ("user-agent", "tally-hooks")],
            timeout=timeout,
        )
    except HttpClientError as exc:
        where = f"{parts.scheme}://{host}:{port}"
        raise DeliveryError(f"POST to {where}: {_why(exc)}") from exc
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await client.aclose()
    if not 200 <= response.status < 300:
        raise DeliveryError(f"the webhook answered {response.status}")
