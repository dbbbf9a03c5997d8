"""Caller attestation from the kernel and /proc, on real sockets and real processes."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.attestor import (
    NAME_TTL_S,
    AttestationError,
    ExeHashCache,
    NeedsThread,
    ProcessFacts,
    attest_socket,
    kinds_of,
    selectors_for,
)
from tally.spiffe.selectors import Selector


@given(
    uid=st.integers(0, 2**31 - 1),
    gid=st.integers(0, 2**31 - 1),
    groups=st.lists(st.integers(0, 2**31 - 1), max_size=5),
    exe=st.none() | st.just("/usr/bin/x"),
)
def test_selectors_name_exactly_the_facts(uid, gid, groups, exe):
    facts = ProcessFacts(1, uid, gid, tuple(groups), exe, "ab" * 32)
    sels = selectors_for(facts, "alice", {gid: "staff"})
    assert Selector("unix", f"uid:{uid}") in sels
    assert Selector("unix", f"gid:{gid}") in sels
    assert Selector("unix", "user:alice") in sels
    assert Selector("unix", "group:staff") in sels
    assert Selector("unix", "sha256:" + "ab" * 32) in sels
    assert (Selector("unix", "path:/usr/bin/x") in sels) == (exe is not None)
    for g in groups:
        assert Selector("unix", f"supplementary_gid:{g}") in sels
    uids = [s for s in sels if s.value.startswith("uid:")]
    assert len(uids) == 1


def test_attests_a_real_peer_process():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    facts, sels = attest_socket(a, ExeHashCache())
    assert facts.pid == os.getpid()
    assert facts.uid == os.geteuid()
    assert facts.exe == os.path.realpath(sys.executable)
    with open(sys.executable, "rb") as f:
        assert facts.exe_sha256 == hashlib.file_digest(f, "sha256").hexdigest()
    assert Selector("unix", f"uid:{os.geteuid()}") in sels
    a.close()
    b.close()


def test_only_the_facts_of_the_kinds_asked_for_are_gathered():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cache = ExeHashCache()
    _, full = attest_socket(a, cache)
    # uid and gid come from the kernel: nothing from /proc, nothing that may block.
    facts, sels = attest_socket(a, ExeHashCache(), cached_only=True, kinds=frozenset({"uid"}))
    assert (facts.groups, facts.exe, facts.exe_sha256) == ((), None, None)
    assert sels == {
        Selector("unix", f"uid:{os.geteuid()}"),
        Selector("unix", f"gid:{os.getegid()}"),
    }
    # Each kind brings its facts, and matching against entries of those kinds is unchanged.
    for kind in ("path", "sha256", "supplementary_gid", "user", "group"):
        _, some = attest_socket(a, cache, kinds=frozenset({kind}))
        assert some <= full
        assert {s for s in full if kinds_of([s]) == {kind}} <= some
    assert kinds_of([Selector("unix", "uid:1"), Selector("k8s", "ns:x")]) == {"uid"}
    a.close()
    b.close()


def test_a_known_caller_is_attested_without_blocking_steps_and_names_age_out():
    now = [0.0]
    cache = ExeHashCache(clock=lambda: now[0])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(NeedsThread):  # nothing hashed or named yet: the thread's job
        attest_socket(a, cache, cached_only=True)
    first = attest_socket(a, cache)
    assert attest_socket(a, cache, cached_only=True) == first  # all remembered now
    now[0] += NAME_TTL_S
    with pytest.raises(NeedsThread):  # names are asked again after the TTL
        attest_socket(a, cache, cached_only=True)
    assert attest_socket(a, cache) == first
    a.close()
    b.close()


def test_a_caller_that_exited_is_refused(tmp_path):
    """The PID-reuse guard: once the connecting process is gone, nothing is attested."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "import os; os._exit(0)",
            path,
        ],
    )
    conn, _ = server.accept()
    child.wait()
    # Let other processes start and possibly take the pid; the pidfd still names the dead one.
    for _ in range(5):
        subprocess.run(["true"], check=True)
    time.sleep(0.05)
    with pytest.raises(AttestationError, match="exited"):
        attest_socket(conn, ExeHashCache())
    conn.close()
    server.close()


def test_exe_hash_is_cached_per_binary():
    cache = ExeHashCache()
    first = cache.sha256(os.getpid())
    assert first is not None
    assert cache.sha256(os.getpid()) == first
    assert len(cache._cache) == 1
