"""Starting real `tally` daemons as child processes, for the demo and the end-to-end tests.

A daemon is ready when it logs its ``*.started`` event, which carries the
addresses it actually bound (port 0 becomes a real port), so nobody has to
guess a free port or sleep.  Its stderr is read on a thread into `lines`,
so a chatty daemon never blocks on a full pipe, and again before each look
at the events (`settle`), so tests can assert on a line as soon as it is
logged.  Every line is also checked for the shape of a secret (a PEM
private key, a whole join token): `Daemon.leaks` names each daemon and event
that logged one, so the test suite can require that no daemon ever did.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar


def tally_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tally.app.cli", *args]


class DaemonError(Exception):
    pass


# A PEM private key, a join token whole (`<16 hex id>.<secret>`; the id alone is fine),
# or a JWT (a base64url JSON header and claims).
SECRET_SHAPE = re.compile(
    r"PRIVATE KEY|\b[0-9a-f]{16}\.[A-Za-z0-9_-]{20,}|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}"
)


class Daemon:
    leaks: ClassVar[list[str]] = []
    """"<daemon>: <event>" for each log line shaped like a secret, across every daemon."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._io = threading.Lock()
        self._partial = b""
        self._eof = False
        self._reader: threading.Thread | None = None

    def popen(self) -> subprocess.Popen[bytes]:
        """The child process, its stderr a pipe; a subclass may start another program."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return subprocess.Popen(
            tally_argv(*self.args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )

    def start(self, ready_event: str, timeout: float = 30) -> dict[str, Any]:
        self.proc = self.popen()
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self.wait_for(ready_event, timeout)

    def _read(self) -> None:
        """Keep the pipe empty, so a chatty daemon never blocks on it."""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while not self._eof and not self.proc.stderr.closed:
            try:
                select.select([fd], [], [], 0.5)
            except (OSError, ValueError):  # closed under us by _close
                break
            self.settle()
        with self._cond:
            self._cond.notify_all()

    def settle(self) -> None:
        """Take in every line the daemon has written so far.

        Reads happen only here and under one lock, so once this returns, every
        line logged before it was called is in `lines`: a test that checks
        `events` right after the daemon logged cannot miss the line because the
        reader thread had not got to it yet.
        """
        assert self.proc is not None and self.proc.stderr is not None
        with self._io:
            if self._eof or self.proc.stderr.closed:
                return
            chunks = [self._partial]
            while True:
                try:
                    data = os.read(self.proc.stderr.fileno(), 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    self._eof = True
                    break
                chunks.append(data)
            *complete, self._partial = b"".join(chunks).split(b"\n")
            if self._eof and self._partial:
                complete.append(self._partial)
            if complete:
                self._take([line.decode("utf-8", "replace") + "\n" for line in complete])

    def _take(self, raws: list[str]) -> None:
        for raw in raws:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "text": raw.rstrip()}
            if SECRET_SHAPE.search(raw):
                event = line.get("event") if isinstance(line, dict) else None
                Daemon.leaks.append(f"{self.name}: {event or 'unparsed line'}")
            with self._cond:
                self.raw.append(raw)
                if isinstance(line, dict):
                    self.lines.append(line)
        with self._cond:
            self._cond.notify_all()

    def events(self, event: str) -> list[dict[str, Any]]:
        self.settle()
        with self._cond:
            return [line for line in self.lines if line.get("event") == event]

    def wait_for(self, event: str, timeout: float = 30, count: int = 1) -> dict[str, Any]:
        """The ``count``-th log line with this event, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self.settle()
        with self._cond:
            while True:
                found = [line for line in self.lines if line.get("event") == event]
                if len(found) >= count:
                    return found[count - 1]
                assert self.proc is not None
                if self.proc.poll() is not None and self._eof:
                    raise DaemonError(
                        f"{self.name} exited with {self.proc.returncode} before logging {event}:\n"
                        + "".join(self.raw[-20:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonError(
                        f"{self.name} did not log {event} within {timeout}s:\n"
                        + "".join(self.raw[-20:])
                    )
                self._cond.wait(min(left, 0.2))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        """Collect the last log lines and close the pipe once the process is gone."""
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.settle()
            with self._io:
                self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tally_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
