"""Signing on every core: a batch's CSR checks and signatures in worker processes.

A batch of CSRs is planned and recorded in the CA's main process (`Authority.plan_batch`,
`Authority.record_batch`, in the store's thread) and signed here in between.  Checking a
CSR and signing and validating its leaf (`ca.leaves.sign_jobs`) is about 85% of the CPU
of a batch of 500, and pure, so it runs in ``signing_workers`` processes while the main
process goes on with TLS, HTTP, the store and the audit chain.

Rules:

1. The main process decides everything: which key signs (the active intermediate of
   the published bundle, `KeyManager.signer`), the SPIFFE ID, serial and lifetime of
   each certificate (`ca.leaves` rule 1).  A worker only holds the keys it was sent.
2. Keys reach workers through the executor's pipes, never a file.  A job names its key
   by id; a worker that does not hold that key answers "send it", and the job goes
   again with the key (PKCS#8 DER, in memory), which the worker keeps by id.  So a
   rotation reaches every worker at its first job under the new key, and each worker
   keeps only the `WORKER_KEYS` latest keys it was sent.
3. Workers start from a clean interpreter (the ``forkserver`` context, with the signing
   modules preloaded): a trio process is never forked.  Trio waits for a worker in a
   thread (`trio.to_thread`), so the event loop never blocks, and a batch is split in
   up to one chunk per worker, each chunk at least `MIN_CHUNK` jobs.
4. A worker that dies breaks its executor (the stdlib's `BrokenProcessPool`); the pool
   replaces the executor with a fresh one (logged as ``signing.worker_died``) and sends
   the chunk once more.  A chunk that fails twice, or takes longer than
   `CHUNK_TIMEOUT`, fails its request with ``503 signing_unavailable`` and
   ``Retry-After``: never a hang.
5. ``signing_workers`` (`ca.settings.workers_for`) 0 signs in the main process, in a
   trio thread: for the tiniest deployments and for tests.  ``auto``, the default and
   what a fleet needs, is one worker per CPU the CA may run on.  `close` (at the end of
   `tally ca run`, after SIGTERM's drain) stops the workers.
6. A worker ends when the CA process ends, however it ends (`_follow`): nothing of
   the CA outlives it.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import Denied
from ca.keys import Signer
from ca.leaves import LeafJob, NotSigned, SignedLeaf, sign_jobs
from tally.ops.logs import get_logger
from tally.spiffe import x509profile

log = get_logger("tally.ca")

Answer = list[SignedLeaf | NotSigned]

MIN_CHUNK = 8
"""Fewest jobs worth a trip to another worker (a trip costs about one signature)."""
CHUNK_TIMEOUT = 60.0
"""Longest wait for one chunk; a chunk of 1,000 CSRs takes about 0.5 s of one core."""
WORKER_KEYS = 2
"""Signing keys a worker keeps: the active one and the one before a rotation."""


def unavailable() -> Denied:
    return Denied(
        503, "signing_unavailable", "the CA's signing workers failed; retry", retry_after=1
    )


# -- in a worker ---------------------------------------------------------------------

_held: OrderedDict[str, x509profile.LeafSigner] = OrderedDict()


def _sign_in_worker(
    key_id: str, key: tuple[bytes, bytes] | None, jobs: Sequence[LeafJob]
) -> Answer | None:
    """Sign ``jobs`` with the key ``key_id``; ``None`` asks for the key (rule 2).

    ``key`` is the intermediate's certificate and PKCS#8 private key, both DER.
    """
    signer = _held.get(key_id)
    if signer is None:
        if key is None:
            return None
        cert = x509.load_der_x509_certificate(key[0])
        private = serialization.load_der_private_key(key[1], password=None)
        assert isinstance(private, x509profile.SigningKey)
        signer = _held[key_id] = x509profile.LeafSigner(cert, private)
        while len(_held) > WORKER_KEYS:
            _held.popitem(last=False)
    return sign_jobs(signer, jobs)


def _follow(ca_pid: int) -> None:
    """Worker initializer: end this worker when the CA process ends (rule 6).

    A worker's parent is the forkserver, and the stdlib keeps both alive while any
    worker is, so a CA killed with SIGKILL would otherwise leave them behind, holding
    the CA's stderr open.  A pidfd becomes readable when the CA exits.
    """
    watched = os.pidfd_open(ca_pid)

    def watch() -> None:
        select.select([watched], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="follow-ca", daemon=True).start()


def _ready() -> None:
    """A job that does nothing: starts the workers before the first batch needs them."""


# -- in the CA's main process ----------------------------------------------------------


def _key_material(signer: Signer) -> tuple[bytes, bytes]:
    return (
        signer.cert.public_bytes(serialization.Encoding.DER),
        signer.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def chunks(jobs: Sequence[LeafJob], workers: int) -> list[Sequence[LeafJob]]:
    """``jobs`` split in order into at most ``workers`` near-equal runs of at least
    `MIN_CHUNK` (one run when there are fewer)."""
    count = max(1, min(workers, len(jobs) // MIN_CHUNK))
    size, extra = divmod(len(jobs), count)
    out: list[Sequence[LeafJob]] = []
    start = 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(jobs[start:end])
        start = end
    return out


class SigningPool:
    """``workers`` signing processes (none: sign in a thread of this process)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.replaced = 0
        """Executors replaced after a worker died (`tally_ca_signing_workers_replaced_total`)."""
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        # One thread per chunk in flight; two per worker keeps every worker busy.
        self._threads = trio.CapacityLimiter(max(1, 2 * workers))

    def _current(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise unavailable()
            if self._executor is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["ca.signing_pool"])
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_follow, initargs=(os.getpid(),)
                )
            return self._executor

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not broken:
                return  # another chunk replaced it already
            self._executor = None
            self.replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)
        log.warning("signing.worker_died", workers=self.workers)

    def _call(self, key_id: str, signer: Signer, jobs: Sequence[LeafJob]) -> Answer:
        """One chunk, in a thread: try twice if a worker dies under it (rule 4)."""
        for attempt in (1, 2):
            executor = self._current()
            try:
                answer = executor.submit(_sign_in_worker, key_id, None, jobs).result(CHUNK_TIMEOUT)
                if answer is None:
                    key = _key_material(signer)
                    answer = executor.submit(_sign_in_worker, key_id, key, jobs).result(
                        CHUNK_TIMEOUT
                    )
                assert answer is not None
                return answer
            except concurrent.futures.TimeoutError:
                log.error("signing.timeout", jobs=len(jobs), seconds=CHUNK_TIMEOUT)
                raise unavailable() from None
            except (BrokenProcessPool, concurrent.futures.CancelledError, RuntimeError):
                # A dead worker, or an executor shut down under this chunk: by `close`
                # (the CA is stopping), or by another chunk's `_replace`.
                if self._closed or attempt == 2:
                    raise unavailable() from None
                self._replace(executor)
        raise AssertionError("unreachable")

    async def sign(self, signer: Signer, jobs: Sequence[LeafJob]) -> Answer:
        """Sign ``jobs`` under ``signer`` (which the caller chose); answers in order."""
        if not jobs:
            return []
        if self.workers == 0:
            return await trio.to_thread.run_sync(sign_jobs, signer.leaf_signer, jobs)
        parts = chunks(jobs, self.workers)
        answers: list[Answer] = [[] for _ in parts]
        refused: list[Denied] = []

        async def one(i: int) -> None:
            try:
                answers[i] = await trio.to_thread.run_sync(
                    self._call, signer.key_id, signer, parts[i], limiter=self._threads
                )
            except Denied as exc:  # kept out of the nursery's exception group
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(parts)):
                nursery.start_soon(one, i)
        if refused:
            raise refused[0]
        return [leaf for answer in answers for leaf in answer]

    async def start(self) -> None:
        """Start the workers now, not in the first batch's way."""
        if self.workers == 0:
            return

        def start_all() -> None:
            executor = self._current()
            # A new worker is spawned for each job that finds none idle.
            for future in [executor.submit(_ready) for _ in range(self.workers)]:
                future.result()

        await trio.to_thread.run_sync(start_all)

    def close(self) -> None:
        """Stop the workers; a batch still waiting fails with 503."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
