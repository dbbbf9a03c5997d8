"""``--workers N``: N proxy processes sharing one listener, under one supervisor.

A proxy process runs one trio loop, so it uses one core however many the
machine has.  With ``--workers N`` the command becomes a supervisor that
serves nothing itself and runs N ordinary proxies (`proxy.daemon`, each with
a `WorkerSlot`) as its children.

Rules / theory of operation:

1. One listener, N accept queues.  For TCP the supervisor binds the address
   with ``SO_REUSEPORT`` first (so port 0 becomes one real port and "address
   in use" fails the start with one line), never listens on it, and gives
   the port to the workers, who bind it too; the kernel hashes each new
   connection to one of the workers that listen.  A Unix socket cannot be
   shared that way: the supervisor binds it and the workers inherit it
   (`proxy.listen` rule 3).
2. Each worker is a whole proxy with its own identity source: its own
   Workload API stream (the agent pushes the same SVIDs and bundles down
   every stream) or its own watch on the files.  Every worker therefore
   rotates on the same data, independently, with no shared state to lock.
3. Signals go to the supervisor and are passed on.  SIGTERM (or SIGINT) is
   sent to every worker, each drains as a single proxy does, and the
   supervisor exits once all have, with 0 or the first worker's non-zero
   code; a second SIGTERM is passed on too, cutting what is left.  SIGHUP
   is passed on, and each worker re-reads the configuration itself.  The
   workers run in their own session, so a Ctrl-C in a terminal reaches
   them once, through the supervisor, not twice; and each drains by itself
   should the supervisor die (`proxy.daemon.Proxy`, rule 6: its parent
   changes).  Not ``PR_SET_PDEATHSIG``: that fires when the *thread* that
   started the child ends, and trio starts processes from worker threads.
4. ``max_connections`` holds for the whole proxy: worker i of N takes
   ``total // N`` connections, plus one for the first ``total % N``
   (`proxy.daemon.WorkerSlot.share`), so the shares add up to the total
   exactly.  A worker at its share leaves further connections in its own
   accept queue even when another has room: the price of not sharing a
   counter between processes.
5. Probes and metrics cover every worker.  Each worker serves its probes on
   a private Unix socket; the supervisor's ``--metrics`` endpoint asks them
   all.  ``/readyz`` is ready when every worker is, and names those that are
   not; ``/metrics`` is every worker's samples, each with a ``worker``
   label (sum over it for the proxy's totals), plus ``tally_proxy_workers``.
6. A worker that exits before it was ever ready ends the start (its own
   error line is already on stderr), with its exit code.  One that exits
   later, unasked, is logged (``proxy.worker_exited``) and started again
   after `RESTART_DELAY_S`.
7. Worker log lines go straight to the shared stderr, never through the
   supervisor; the supervisor adds ``proxy.started`` (all workers ready,
   with the addresses) and ``proxy.stopped``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from proxy import listen
from proxy.identity import FileSource, IdentityError
from proxy.settings import ClientSettings, FileSourceSpec, ServerSettings
from tally.ops import net
from tally.ops.clock import wall_clock
from tally.ops.config import Address
from tally.ops.errors import CommandError
from tally.ops.health import serve_probes
from tally.ops.logs import get_logger
from tally.ops.net import ListenError
from tally.spiffe.spiffeid import SpiffeId
from tally.wire.http import HttpClient, HttpClientError

log = get_logger("tally.proxy")

RESTART_DELAY_S = 1.0
PROBE_TIMEOUT_S = 2.0
POLL_S = 0.05


def merge_metrics(texts: Sequence[tuple[int, str]]) -> str:
    """Prometheus text from several workers as one exposition, each sample labelled with
    its ``worker`` (rule 5).  Pure: ``(worker index, exposition text)`` pairs in."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                seen = headers.setdefault(family, [])
                samples.setdefault(family, [])
                if line not in seen:
                    seen.append(line)
            elif line and not line.startswith("#"):
                head, _, value = line.rpartition(" ")
                label = f'worker="{index}"'
                if head.endswith("}"):
                    name, _, rest = head.partition("{")
                    head = f"{name}{{{label},{rest}" if rest != "}" else f"{name}{{{label}}}"
                else:
                    head = f"{head}{{{label}}}"
                samples.setdefault(family, []).append(f"{head} {value}")
                headers.setdefault(family, [])
    out: list[str] = []
    for family, lines in headers.items():
        out += lines
        out += samples.get(family, [])
    return "\n".join(out) + "\n"


class Worker:
    """One child proxy: how to start it, how to reach its probes, what it did."""

    def __init__(
        self, index: int, argv: list[str], probes: Path, pass_fds: tuple[int, ...]
    ) -> None:
        self.index = index
        self.argv = argv
        self.probes = probes
        self.pass_fds = pass_fds
        self.proc: trio.Process | None = None
        self.ever_ready = False
        self.client = HttpClient(lambda: net.connect(Address.parse(f"unix:{probes}")))

    async def get(self, path: str) -> tuple[int, str] | None:
        """A probe answer, or None when the worker does not answer (yet)."""
        try:
            resp = await self.client.request("GET", path, timeout=PROBE_TIMEOUT_S)
        except HttpClientError:
            return None
        return resp.status, resp.body.decode("utf-8", "replace")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)


class Supervisor:
    def __init__(
        self, cfg: ServerSettings | ClientSettings, args: Sequence[str], count: int
    ) -> None:
        """``args`` are the command's own (``proxy server ...``), repeated to each worker."""
        self.cfg = cfg
        self.args = list(args)
        self.count = count
        self.mode = "server" if isinstance(cfg, ServerSettings) else "client"
        self.workers: list[Worker] = []
        self.stopping = False
        self.exit_code: int | None = None
        self.addresses: dict[str, str] = {}

    # -- probes (rule 5) ----------------------------------------------------------------

    async def _each(self, path: str) -> list[tuple[Worker, tuple[int, str] | None]]:
        answers: list[tuple[Worker, tuple[int, str] | None]] = []

        async def ask(w: Worker) -> None:
            answers.append((w, await w.get(path)))

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(ask, w)
        answers.sort(key=lambda pair: pair[0].index)
        return answers

    async def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining: not accepting new connections"
        answers = await self._each("/readyz")
        missing = [
            f"worker {w.index}: {got[1].strip() if got else 'not answering'}"
            for w, got in answers
            if got is None or got[0] != 200
        ]
        if missing:
            return False, "; ".join(missing)
        first = answers[0][1]
        detail = first[1].strip().removeprefix("ready: ") if first else ""
        return True, f"{self.count} workers ready; {detail}"

    async def metrics(self) -> bytes:
        answers = await self._each("/metrics")
        texts = [(w.index, got[1]) for w, got in answers if got is not None and got[0] == 200]
        running = sum(1 for w in self.workers if w.proc is not None and w.proc.returncode is None)
        own = (
            "# HELP tally_proxy_workers Worker processes, configured and running.\n"
            "# TYPE tally_proxy_workers gauge\n"
            f'tally_proxy_workers{{state="configured"}} {self.count}\n'
            f'tally_proxy_workers{{state="running"}} {running}\n'
        )
        return (merge_metrics(texts) + own).encode()

    # -- the workers (rules 3 and 6) ----------------------------------------------------

    async def _keep(self, w: Worker) -> None:
        """Run one worker until the supervisor stops, restarting it if it dies unasked."""
        while True:
            w.proc = await trio.lowlevel.open_process(
                w.argv, stdin=subprocess.DEVNULL, pass_fds=w.pass_fds, start_new_session=True
            )
            if self.stopping:  # the signal came while this one was starting
                w.signal(signal.SIGTERM)
            try:
                code = await w.proc.wait()
            finally:
                if w.proc.returncode is None:  # cancelled: never leave a worker behind
                    w.proc.kill()
            if self.stopping:
                if code != 0 and self.exit_code is None:
                    self.exit_code = code
                return
            if not w.ever_ready:
                self.exit_code = code or 1
                self._stop(f"worker {w.index} exited with code {code} before it was ready")
                return
            log.error("proxy.worker_exited", worker=w.index, code=code, restart_in_s=1.0)
            w.ever_ready = False
            await trio.sleep(RESTART_DELAY_S)
            w.ever_ready = True  # it was good once: a crash loop restarts, it does not end

    def _stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("proxy.draining", why=why, workers=self.count)
        for w in self.workers:
            w.signal(signal.SIGTERM)

    async def _announce(self) -> None:
        """``proxy.started`` once every worker is ready (rule 7); ``proxy.waiting`` if that
        takes longer than a second (no SVID yet from the agent, say), as a single proxy
        says it when it starts without one."""
        waiting_from = trio.current_time() + 1.0
        said_waiting = False
        while not self.stopping:
            if not said_waiting and trio.current_time() >= waiting_from:
                said_waiting = True
                log.info("proxy.waiting", workers=self.count, **self.addresses)
            answers = await self._each("/readyz")
            for w, got in answers:
                if got is not None and got[0] == 200:
                    w.ever_ready = True
            if all(w.ever_ready for w in self.workers):
                log.info(
                    "proxy.started",
                    mode=self.mode,
                    http=self.cfg.http,
                    target=str(self.cfg.target),
                    workers=self.count,
                    pids=[w.proc.pid for w in self.workers if w.proc is not None],
                    **self.addresses,
                )
                return
            await trio.sleep(POLL_S)

    async def _signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("config.reload_forwarded", workers=self.count)
                    for w in self.workers:
                        w.signal(signal.SIGHUP)
                elif not self.stopping:
                    self._stop(f"signal {signal.Signals(signum).name}")
                else:
                    log.info("proxy.drain_cut", workers=self.count)
                    for w in self.workers:
                        w.signal(signal.SIGTERM)

    def _worker_argv(self, index: int, listen_at: str, probes: Path, fd: int | None) -> list[str]:
        argv = [sys.executable, "-m", "tally.app.cli", *self.args]
        argv += ["--metrics", f"unix:{probes}", "--workers", "1"]
        argv += ["--worker-slot", f"{index}/{self.count}", "--worker-parent", str(os.getpid())]
        if fd is None:
            argv += ["--listen", listen_at]
        else:
            argv += ["--worker-fd", str(fd)]
        return argv

    def _check_files(self) -> None:
        """With the file source, load the identity once here, so that bad files end the start
        with one line instead of one line per worker."""
        spec = self.cfg.source(os.environ)
        if not isinstance(spec, FileSourceSpec):
            return
        want = SpiffeId.parse(self.cfg.spiffe_id) if self.cfg.spiffe_id is not None else None
        source = FileSource(
            spec.cert, spec.key, spec.bundle, spec.federated, want=want, clock=wall_clock
        )
        try:
            source.load()
        except IdentityError as exc:
            raise CommandError(f"identity: {exc}") from exc

    async def run(self) -> int:
        self._check_files()
        try:
            sock = await listen.bind(self.cfg.listen, reuse_port=self.cfg.listen.path is None)
        except ListenError as exc:
            raise CommandError(f"--listen: {exc}") from exc
        unix = self.cfg.listen.path is not None
        fd = sock.fileno() if unix else None
        self.addresses["listen"] = listen.bound_name(sock)
        work = Path(tempfile.mkdtemp(prefix="tally-proxy-workers-"))
        try:
            for i in range(self.count):
                probes = work / f"worker-{i}.sock"
                argv = self._worker_argv(i, self.addresses["listen"], probes, fd)
                self.workers.append(Worker(i, argv, probes, (fd,) if fd is not None else ()))
            async with trio.open_nursery() as outer:
                await outer.start(self._signals)
                if self.cfg.metrics is not None:
                    try:
                        self.addresses["metrics"] = await outer.start(
                            serve_probes, self.cfg.metrics, self.metrics, self.ready
                        )
                    except ListenError as exc:
                        raise CommandError(f"--metrics: {exc}") from exc
                async with trio.open_nursery() as procs:
                    for w in self.workers:
                        procs.start_soon(self._keep, w)
                    outer.start_soon(self._announce)
                outer.cancel_scope.cancel()
        finally:
            sock.close()
            if unix and self.cfg.listen.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.cfg.listen.path)
            for w in self.workers:
                with contextlib.suppress(Exception):
                    await w.client.aclose()
            shutil.rmtree(work, ignore_errors=True)
        log.info("proxy.stopped", workers=self.count, exit_code=self.exit_code or 0)
        return self.exit_code or 0
