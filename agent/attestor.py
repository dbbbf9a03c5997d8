"""Who is calling on the Workload API socket: selectors from the kernel and /proc.

Rules:

1. Nothing the caller says counts.  The uid and gid come from the kernel's
   record of the connection (``SO_PEERCRED``); groups, names, the executable
   path and its hash come from ``/proc``.
2. PID reuse.  A pid names a process only while that process lives: a caller
   could connect, exit, and let another process take its pid before we read
   ``/proc``.  So the agent takes a *pidfd* for the connecting process from the
   kernel (``SO_PEERPIDFD``, Linux 6.5+), which pins that exact process and
   never another, reads ``/proc/<pid>``, and then checks through the pidfd that
   the same process is still alive.  If it died at any point, its pid may now
   belong to someone else and the attestation is refused.  Only a kernel
   that does not know ``SO_PEERPIDFD`` at all (before 6.5) gets the fallback,
   ``pidfd_open(pid)``, which leaves the window between the caller's
   ``connect`` and its call (the caller would have to exit and the pid space
   wrap inside it).  Any other failure of ``SO_PEERPIDFD`` means the caller is
   gone (kernels 6.5 to 6.15 refuse a pidfd for a reaped peer), and falling
   back then would pin whoever holds the pid now.
3. An executable's SHA-256 is cached by (device, inode, size, mtime), so a
   busy caller is hashed once, while a replaced binary is hashed again.
4. `selectors_for` is pure; the I/O lives in `attest_socket`.
6. Cheap when nothing is new.  Hashing a binary not seen before, and asking
   NSS for a user or group name (which may be a network call: LDAP, sssd),
   can block; everything else is a few reads of ``/proc``.  With
   ``cached_only`` `attest_socket` raises `NeedsThread` instead of doing a
   blocking step, so the agent attests a known caller on its event loop and
   sends only the rest to a thread (a thread hand-off per call was a fifth
   of a fetch's cost).  Names are remembered for `NAME_TTL_S`; a renamed
   user gets its new name's selector after at most that long.
5. What /proc cannot tell.  ``unix:path`` and ``unix:sha256`` name what the
   connecting process runs when its call arrives.  A process can connect,
   fork a child that keeps the connection, and exec the selected binary: the
   agent then attests that binary, truly, while the child reads the answer.
   No kernel interface reports the exec, so these selectors only separate
   processes that cannot run each other's binaries; pair them with a uid
   selector (tests/security/test_workloads.py shows the attack).  The uid and
   gid are safe from this: they are the kernel's record at ``connect``.
7. Only what some entry can use is read.  With ``kinds`` (the selector kinds
   the agent's entries name, `kinds_of`) `attest_socket` leaves out the facts
   no entry asks for: a node whose entries select on uid, gid or names reads
   nothing from ``/proc`` and takes no pidfd (the uid and gid are the
   kernel's record and need neither).  Matching is unchanged, because an
   entry matches when the caller has all of its selectors, and a selector of a
   kind that no entry names is in no entry; the agent attests a streaming
   caller again, with the new kinds, when a new entry names one
   (`agent.backend`), and in full before it logs a caller it denies.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from tally.spiffe.selectors import Selector

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class AttestationError(Exception):
    """The caller cannot be attested (it exited, or /proc would not say)."""


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    exe: str | None
    exe_sha256: str | None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def selectors_for(
    facts: ProcessFacts,
    user_name: str | None,
    group_names: dict[int, str | None],
) -> frozenset[Selector]:
    """Every selector a process with these facts satisfies."""
    out = {
        Selector("unix", f"uid:{facts.uid}"),
        Selector("unix", f"gid:{facts.gid}"),
    }
    if user_name:
        out.add(Selector("unix", f"user:{user_name}"))
    if group_names.get(facts.gid):
        out.add(Selector("unix", f"group:{group_names[facts.gid]}"))
    for gid in facts.groups:
        out.add(Selector("unix", f"supplementary_gid:{gid}"))
        name = group_names.get(gid)
        if name:
            out.add(Selector("unix", f"supplementary_group:{name}"))
    if facts.exe:
        out.add(Selector("unix", f"path:{facts.exe}"))
    if facts.exe_sha256:
        out.add(Selector("unix", f"sha256:{facts.exe_sha256}"))
    return frozenset(out)


_PROC_KINDS = frozenset({"supplementary_gid", "supplementary_group", "path", "sha256"})
"""Selector kinds whose facts come from /proc (rule 7); uid and gid come from the kernel."""
_GROUP_NAME_KINDS = frozenset({"group", "supplementary_group"})


def kinds_of(selectors: Iterable[Selector]) -> frozenset[str]:
    """The kinds of the ``unix`` selectors among ``selectors`` ("uid", "path", ...)."""
    return frozenset(s.value.split(":", 1)[0] for s in selectors if s.type == "unix")


def describe(selectors: Iterable[Selector]) -> list[str]:
    return sorted(str(s) for s in selectors)


class NeedsThread(Exception):
    """Attestation needs a step that may block (rule 6): run it in a thread."""


NAME_TTL_S = 30.0


class ExeHashCache:
    """Executable digests (rule 3), and user and group names for `NAME_TTL_S` (rule 6)."""

    def __init__(self, size: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._cache: dict[tuple[int, int, int, int], str] = {}
        self._names: dict[tuple[str, int], tuple[str | None, float]] = {}
        self._selectors: dict[tuple[object, ...], frozenset[Selector]] = {}
        self._clock = clock

    def name(self, kind: str, number: int, *, cached_only: bool = False) -> str | None:
        """The name of user (``kind`` "user") or group ``number``, None if it has none."""
        now = self._clock()
        known = self._names.get((kind, number))
        if known is not None and now - known[1] < NAME_TTL_S:
            return known[0]
        if cached_only:
            raise NeedsThread(f"{kind} {number} is not named yet")
        name = _user_name(number) if kind == "user" else _group_name(number)
        if len(self._names) >= self._size:
            self._names.pop(next(iter(self._names)))
        self._names[(kind, number)] = (name, now)
        return name

    def selectors(
        self, facts: ProcessFacts, user: str | None, names: dict[int, str | None]
    ) -> frozenset[Selector]:
        """`selectors_for`, remembered: building and checking each selector is most of an
        attestation's time, and a node's callers are few kinds of process."""
        key = (facts.uid, facts.gid, facts.groups, facts.exe, facts.exe_sha256, user,
               tuple(sorted(names.items())))  # fmt: skip
        got = self._selectors.get(key)
        if got is None:
            got = selectors_for(facts, user, names)
            if len(self._selectors) >= self._size:
                self._selectors.pop(next(iter(self._selectors)))
            self._selectors[key] = got
        return got

    def sha256(self, pid: int, *, cached_only: bool = False) -> str | None:
        path = f"/proc/{pid}/exe"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._cache.get(key)
                if cached is not None:
                    return cached
                if cached_only:
                    raise NeedsThread(f"{path} is not hashed yet")
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return None
        if len(self._cache) >= self._size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = digest
        return digest


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, or -1 once that process has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AttestationError("kernel did not report the caller's pid")


class PeerSocket(Protocol):
    """A connected Unix socket (stdlib or trio): all attestation needs is getsockopt."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def _peer_pidfd(sock: PeerSocket, pid: int) -> int:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, struct.calcsize("i"))
        return int(struct.unpack("i", raw)[0])
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise AttestationError(f"caller pid {pid} exited before it could be attested") from exc
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        raise AttestationError(f"caller pid {pid} is gone") from exc


def _read_groups(pid: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                return tuple(int(g) for g in line.split()[1:])
    return ()


def attest_socket(
    sock: PeerSocket,
    hashes: ExeHashCache,
    *,
    cached_only: bool = False,
    kinds: frozenset[str] | None = None,
) -> tuple[ProcessFacts, frozenset[Selector]]:
    """Attest the process at the other end of a Unix socket (blocking: run it in a thread),
    or with ``cached_only`` without blocking, raising `NeedsThread` when it would (rule 6).

    ``kinds`` limits the facts gathered to what selectors of those kinds need (rule 7);
    None gathers them all."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    if pid <= 0:
        raise AttestationError("kernel gave no pid for the caller (different pid namespace?)")
    groups: tuple[int, ...] = ()
    exe: str | None = None
    digest: str | None = None
    if kinds is None or not kinds.isdisjoint(_PROC_KINDS):
        pidfd = _peer_pidfd(sock, pid)
        try:
            if _pidfd_pid(pidfd) != pid:
                raise AttestationError(f"caller pid {pid} exited before it could be attested")
            try:
                if kinds is None or "supplementary_gid" in kinds or "supplementary_group" in kinds:
                    groups = _read_groups(pid)
                if kinds is None or "path" in kinds:
                    try:
                        exe = os.readlink(f"/proc/{pid}/exe")
                    except OSError:
                        exe = None
                if kinds is None or "sha256" in kinds:
                    digest = hashes.sha256(pid, cached_only=cached_only)
            except OSError as exc:
                raise AttestationError(f"cannot read /proc/{pid}: {exc.strerror}") from exc
            # Still the same live process: everything read above was about it.
            if _pidfd_pid(pidfd) != pid:
                raise AttestationError(f"caller pid {pid} exited during attestation")
        finally:
            os.close(pidfd)
    if exe is not None and exe.endswith(" (deleted)"):
        exe = None  # a deleted binary has no path to select on; its hash still counts
    facts = ProcessFacts(pid, uid, gid, groups, exe, digest)
    names: dict[int, str | None] = {}
    if kinds is None or not kinds.isdisjoint(_GROUP_NAME_KINDS):
        names = {g: hashes.name("group", g, cached_only=cached_only) for g in {gid, *groups}}
    user = None
    if kinds is None or "user" in kinds:
        user = hashes.name("user", uid, cached_only=cached_only)
    return facts, hashes.selectors(facts, user, names)
