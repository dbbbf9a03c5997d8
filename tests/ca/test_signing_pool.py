"""The signing workers (`ca.signing_pool`): the same certificates as in-process signing,
a key rotation that reaches every worker, a killed worker survived, a closed pool refused.

The pool's workers are real processes (``forkserver``), as in `tally ca run`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ca.authority import Denied
from ca.keys import Signer
from ca.leaves import LeafJob, NotSigned, SignedLeaf, sign_jobs
from ca.signing_pool import MIN_CHUNK, SigningPool, chunks
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import TrustDomain
from tests.ca.conftest import make_csr

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def make_signer(key_id: str) -> Signer:
    """A signing key of its own (a self-signed CA may sign leaves as well as any)."""
    key = x509profile.generate_key()
    cert = x509profile.build_root(
        key,
        TrustDomain.parse("example.org"),
        NOW - timedelta(days=1),
        NOW + timedelta(days=10),
        subject_cn=key_id,
    )
    return Signer(
        key_id,
        cert,
        key,
        (cert,),
        cert.not_valid_after_utc,
        x509profile.LeafSigner(cert, key),
        pem.chain_to_pem([cert]),
    )


def jobs(count: int, bad: frozenset[int] = frozenset()) -> list[LeafJob]:
    return [
        LeafJob(
            "not a CSR" if i in bad else make_csr(x509profile.generate_key()),
            f"spiffe://example.org/w{i}",
            x509profile.new_serial(),
            NOW,
            NOW + timedelta(hours=1),
            (f"w{i}.example.org",),
        )
        for i in range(count)
    ]


def leaf(answer: SignedLeaf | NotSigned) -> x509.Certificate:
    assert isinstance(answer, SignedLeaf), answer
    cert = x509.load_der_x509_certificate(answer.der)
    assert pem.chain_to_pem([cert]) == answer.pem
    return cert


def signed_by(cert: x509.Certificate, signer: Signer) -> bool:
    public = signer.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    try:
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


@pytest.fixture
async def pool() -> AsyncIterator[SigningPool]:
    p = SigningPool(2)
    await p.start()
    yield p
    p.close()


async def test_workers_sign_what_the_main_process_would(pool: SigningPool) -> None:
    signer = make_signer("k1")
    batch = jobs(3 * MIN_CHUNK, bad=frozenset({5, 20}))  # two chunks, one refusal in each
    in_process = sign_jobs(signer.leaf_signer, batch)
    pooled = await pool.sign(signer, batch)
    assert len(pooled) == len(batch)
    for i, (here, there) in enumerate(zip(in_process, pooled, strict=True)):
        if i in (5, 20):
            assert isinstance(here, NotSigned) and here == there and here.code == "bad_csr"
            continue
        # Everything but the (randomised) ECDSA signature is the same, byte for byte.
        assert leaf(here).tbs_certificate_bytes == leaf(there).tbs_certificate_bytes
        assert signed_by(leaf(there), signer)


async def test_a_rotation_reaches_every_worker(pool: SigningPool) -> None:
    first, second = make_signer("k1"), make_signer("k2")
    for signer in (first, second, first):
        for answer in await pool.sign(signer, jobs(2 * MIN_CHUNK)):
            cert = leaf(answer)
            assert cert.issuer == signer.cert.subject
            assert signed_by(cert, signer)


async def test_a_killed_worker_is_replaced_and_the_batch_still_signed(pool: SigningPool) -> None:
    signer = make_signer("k1")
    assert all(isinstance(a, SignedLeaf) for a in await pool.sign(signer, jobs(MIN_CHUNK)))
    executor = pool._current()
    victim = executor.submit(os.getpid).result()
    os.kill(victim, signal.SIGKILL)
    # The stdlib's executor learns of the death from its own thread: a batch that the
    # other worker signs before then is signed all the same, and the next finds it out.
    with trio.fail_after(10):
        while pool.replaced == 0:
            answers = await pool.sign(signer, jobs(2 * MIN_CHUNK))
            assert all(signed_by(leaf(a), signer) for a in answers)
            await trio.sleep(0.01)
    assert pool.replaced == 1
    assert pool._current() is not executor


async def test_a_closed_pool_refuses_with_503() -> None:
    pool = SigningPool(1)
    pool.close()
    with pytest.raises(Denied) as refused:
        await pool.sign(make_signer("k1"), jobs(1))
    assert (refused.value.status, refused.value.code) == (503, "signing_unavailable")
    assert refused.value.retry_after == 1


async def test_no_workers_signs_in_process() -> None:
    signer = make_signer("k1")
    [answer] = await SigningPool(0).sign(signer, jobs(1))
    assert signed_by(leaf(answer), signer)


@given(count=st.integers(0, 300), workers=st.integers(1, 16))
def test_chunks_keep_order_and_size(count: int, workers: int) -> None:
    items = [
        LeafJob(str(i), "spiffe://example.org/w", i + 1, NOW, NOW + timedelta(hours=1))
        for i in range(count)
    ]
    parts = chunks(items, workers)
    assert [job for part in parts for job in part] == items
    assert 1 <= len(parts) <= workers
    if len(parts) > 1:
        assert min(len(p) for p in parts) >= MIN_CHUNK
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_workers_end_with_a_killed_ca() -> None:
    """A CA killed with SIGKILL leaves no worker behind (nor its stderr held open)."""
    script = (
        "import os, signal, trio\n"
        "from ca.signing_pool import SigningPool\n"
        "pool = SigningPool(2)\n"
        "trio.run(pool.start)\n"
        "print(pool._current().submit(os.getpid).result(), flush=True)\n"
        "print(*(p for p in pool._current()._processes), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    workers = [int(pid) for pid in done.stdout.split()[1:]]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the CA"
        time.sleep(0.05)
