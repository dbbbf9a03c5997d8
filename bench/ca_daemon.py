"""The CA every benchmark starts: a real `tally ca run` on a temporary dir and loopback.

One definition, so the benches measure the same daemon configured the same way.
"""

from __future__ import annotations

from pathlib import Path

from tally.app.launch import Daemon

TRUST_DOMAIN = "bench.org"


def ca_daemon(work: Path, *extra: str) -> tuple[Daemon, str]:
    """The CA daemon for ``work`` (not started yet, with ``extra`` flags) and the path of
    its admin socket."""
    admin = str(work / "ca-admin.sock")
    args = [
        "ca", "run", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(work / "ca"),
        "--listen", "127.0.0.1:0", "--admin-socket", admin, *extra,
    ]  # fmt: skip
    return Daemon("ca", args), admin
