"""`tally demo`: the real daemons on loopback in a temporary directory, narrated.

The demo drives Tally only through what an operator has: the daemons as
child processes and the `tally` CLI.  It imports no role, so it shows exactly
what a user would see, and it always stops what it started (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tally import x509profile
from tally.cli_support import CommandError
from tally.launch import Daemon, DaemonError, run_cli


def _cli(admin: str, *args: str) -> Any:
    result = run_cli("ca", *args, "--admin-socket", admin, "--output", "json")
    if result.returncode != 0:
        raise CommandError(f"tally ca {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tally-demo-"))
    admin = str(workdir / "ca-admin.sock")
    ca = Daemon(
        "ca",
        [
            "ca",
            "run",
            "--trust-domain",
            "demo.tally",
            "--data-dir",
            str(workdir / "ca"),
            "--listen",
            "127.0.0.1:0",
            "--admin-socket",
            admin,
        ],
    )
    try:
        _say(f"== Tally demo in {workdir}")
        started = ca.start("ca.started")
        _say(f"CA for trust domain demo.tally is up: agent API on {started['listen']}")
        bundle = _cli(admin, "bundle", "show")
        roots = x509profile.chain_from_pem(bundle["bundle"].encode())
        _say(f"Trust bundle: {len(roots)} root, sequence {bundle['bundle_sequence']}")
        token = _cli(admin, "token", "create", "--spiffe-id", "spiffe://demo.tally/agent/node-1")
        _say(f"Join token for {token['spiffe_id']} (single use, expires {token['expires_at']})")
        entry = _cli(
            admin,
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://demo.tally/web",
            "--parent-id",
            token["spiffe_id"],
            "--selector",
            "unix:uid:1000",
            "--ttl",
            "1h",
        )
        _say(
            f"Registered {entry['spiffe_id']} for workloads matching "
            + ", ".join(entry["selectors"])
        )
        out = workdir / "minted"
        out.mkdir()
        minted = _cli(
            admin,
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://demo.tally/web",
            "--ttl",
            "1h",
            "--out",
            str(out),
        )
        _say(f"Minted an SVID naming {minted['spiffe_id']}")
        _say(
            f"  serial {minted['serial']}, expires {minted['not_after']}"
            " (one hour: a leak stops mattering soon)"
        )
        verdict = _cli(admin, "audit", "verify")
        records = _cli(admin, "audit", "list")["records"]
        for r in records[-4:]:
            _say(f"  audit #{r['seq']:<3} {r['event']:<16} {r['spiffe_id'] or ''}")
        state = "unbroken" if verdict["ok"] else f"BROKEN: {verdict['problem']}"
        _say(f"Audit chain: {verdict['records']} records, {state}")
        return 0 if verdict["ok"] else 1
    except DaemonError as exc:
        raise CommandError(f"demo: {exc}") from exc
    finally:
        code = ca.stop()
        _say(f"CA stopped (exit {code}); removing {workdir}")
        shutil.rmtree(workdir, ignore_errors=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run Tally on loopback and watch identities being issued")
    p.add_argument("--duration", type=float, default=60, help="seconds of traffic (later issues)")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of a live view")
    p.set_defaults(func=run_demo)
