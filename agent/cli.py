"""`tally agent ...`: the daemon, and Workload API client commands for operators."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from tally.ops import collector
from tally.ops.clock import wall_clock
from tally.ops.config import add_arguments, load
from tally.ops.errors import CommandError
from tally.ops.logs import setup_logging
from tally.ops.output import emit
from tally.spiffe import pem
from tally.wire import workload_client as wl


def cmd_run(args: argparse.Namespace) -> int:
    from agent.server import AgentServer
    from agent.settings import AgentSettings

    cfg = load(AgentSettings, args)
    setup_logging(cfg.log_level)
    server = AgentServer(cfg, reload=lambda: load(AgentSettings, args))
    # What is loaded by now (modules, mostly) lives as long as the daemon: kept out of the
    # cycle collector's full passes, which otherwise walk it all again and again (most of
    # the collector's cost under a stream of short Workload API connections).
    collector.freeze_loaded()
    trio.run(server.run)
    return 0


def _endpoint_socket(args: argparse.Namespace) -> Path:
    """The Workload API endpoint socket: ``--socket``, else ``SPIFFE_ENDPOINT_SOCKET``."""
    if args.socket:
        try:
            return wl.endpoint_socket_of(str(args.socket))
        except wl.EndpointError as exc:
            raise CommandError(f"--socket: {exc}") from exc
    try:
        return wl.endpoint_from_env(os.environ)
    except wl.EndpointError as exc:
        raise CommandError(f"{exc} (or give --socket)") from exc


def _svid_json(ctx: wl.X509Context) -> dict[str, Any]:
    now = wall_clock()
    return {
        "svids": [
            {
                "spiffe_id": s.spiffe_id,
                "serial": format(s.chain[0].serial_number, "x"),
                "not_after": s.chain[0].not_valid_after_utc.isoformat(),
                "seconds_left": int((s.chain[0].not_valid_after_utc - now).total_seconds()),
                "hint": s.hint,
            }
            for s in ctx.svids
        ],
        "bundles": {td: len(certs) for td, certs in ctx.bundles.items()},
    }


def _svid_text(data: dict[str, Any]) -> str:
    lines = []
    for s in data["svids"]:
        lines.append(
            f"SPIFFE ID: {s['spiffe_id']}\n  serial {s['serial']}, expires {s['not_after']} "
            f"(in {s['seconds_left']}s)"
        )
    for td, n in data["bundles"].items():
        lines.append(f"Bundle {td}: {n} CA certificate(s)")
    return "\n".join(lines)


def _failure(exc: wl.WorkloadApiError, endpoint_socket: Path) -> CommandError:
    return CommandError(f"Workload API at {endpoint_socket}: {exc}")


def _write(out: Path, ctx: wl.X509Context) -> list[str]:
    svid = ctx.svids[0]
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    own_td = svid.spiffe_id.split("/")[2]
    roots = [
        c
        for td, certs in ctx.bundles.items()
        if td.removeprefix("spiffe://") == own_td
        for c in certs
    ]
    files = {
        "svid.pem": (pem.chain_to_pem(svid.chain), 0o644),
        "key.pem": (key, 0o600),
        "bundle.pem": (pem.chain_to_pem(roots), 0o644),
    }
    for name, (data, mode) in files.items():
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)
    return [str(out / n) for n in files]


def cmd_api_fetch(args: argparse.Namespace) -> int:
    endpoint_socket = _endpoint_socket(args)
    try:
        ctx = trio.run(wl.fetch_x509, endpoint_socket)
    except wl.WorkloadApiError as exc:
        raise _failure(exc, endpoint_socket) from exc
    data = _svid_json(ctx)
    if args.write:
        out = Path(args.write)
        if not out.is_dir():
            raise CommandError(f"--write {out}: not a directory")
        data["files"] = _write(out, ctx)
    emit(
        args,
        data,
        lambda d: _svid_text(d) + ("\nWrote " + ", ".join(d["files"]) if "files" in d else ""),
    )
    return 0


def cmd_api_watch(args: argparse.Namespace) -> int:
    endpoint_socket = _endpoint_socket(args)

    async def watch() -> None:
        async with wl.watch_x509(endpoint_socket) as updates:
            async for ctx in updates:
                data = _svid_json(ctx)
                stamp = wall_clock().isoformat(timespec="seconds")
                if args.output == "json":
                    print(json.dumps({"at": stamp, **data}), flush=True)
                else:
                    ids = ", ".join(
                        f"{s['spiffe_id']} serial {s['serial']} ({s['seconds_left']}s left)"
                        for s in data["svids"]
                    )
                    print(f"{stamp} update: {ids}", flush=True)

    try:
        trio.run(watch)
    except wl.WorkloadApiError as exc:
        raise _failure(exc, endpoint_socket) from exc
    return 0


def cmd_api_fetch_jwt(args: argparse.Namespace) -> int:
    endpoint_socket = _endpoint_socket(args)
    try:
        svids = trio.run(
            partial(wl.fetch_jwt_svids, endpoint_socket, args.audience, args.spiffe_id or "")
        )
    except wl.WorkloadApiError as exc:
        raise _failure(exc, endpoint_socket) from exc
    data = {"svids": [{"spiffe_id": s.spiffe_id, "token": s.token, "hint": s.hint} for s in svids]}
    # The token goes to stdout, which is what was asked for; the default identity's first.
    emit(args, data, lambda d: d["svids"][0]["token"])
    return 0


def cmd_api_validate_jwt(args: argparse.Namespace) -> int:
    endpoint_socket = _endpoint_socket(args)
    try:
        spiffe_id, claims = trio.run(
            partial(wl.validate_jwt_svid, endpoint_socket, args.audience, args.token)
        )
    except wl.WorkloadApiError as exc:
        if exc.status == wl.Status.INVALID_ARGUMENT:
            # The agent's reason (a fixed word), never the token.
            raise CommandError(f"token refused: {exc.message}") from exc
        raise _failure(exc, endpoint_socket) from exc
    emit(args, {"spiffe_id": spiffe_id, "claims": claims}, lambda d: f"valid: {d['spiffe_id']}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    if args.metrics:
        try:
            with urllib.request.urlopen(f"http://{args.metrics}/readyz", timeout=5) as resp:
                print(resp.read().decode().strip())
                return 0
        except urllib.error.HTTPError as exc:
            print(exc.read().decode().strip())
            return 1
        except OSError as exc:
            raise CommandError(f"agent metrics at {args.metrics}: {exc}") from exc
    endpoint_socket = _endpoint_socket(args)
    try:
        trio.run(wl.fetch_x509, endpoint_socket)
    except wl.WorkloadApiError as exc:
        if exc.status == wl.Status.PERMISSION_DENIED:
            print("agent is serving (this caller has no identity)")
            return 0
        raise _failure(exc, endpoint_socket) from exc
    print("agent is serving")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.settings import AgentSettings

    agent = sub.add_parser("agent", help="the node agent")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    run = agent_sub.add_parser("run", help="run the node agent")
    add_arguments(run, AgentSettings)
    run.set_defaults(func=cmd_run)

    api = agent_sub.add_parser("api", help="Workload API client commands")
    api_sub = api.add_subparsers(dest="api_command", required=True, metavar="COMMAND")
    for name, func, help_text in (
        ("fetch", cmd_api_fetch, "fetch this process's SVIDs and bundles once"),
        ("watch", cmd_api_watch, "print a line for every update until interrupted"),
    ):
        p = api_sub.add_parser(name, help=help_text)
        p.add_argument("--socket", help="Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)")
        p.add_argument("--output", choices=("text", "json"), default="text")
        if name == "fetch":
            p.add_argument(
                "--write", metavar="DIR", help="write svid.pem, key.pem, bundle.pem here"
            )
        p.set_defaults(func=func)

    p = api_sub.add_parser("fetch-jwt", help="fetch a JWT-SVID for an audience and print it")
    p.add_argument("--audience", action="append", required=True, help="repeatable")
    p.add_argument("--spiffe-id", help="only this identity (default: the default one)")
    p.add_argument("--socket", help="Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_api_fetch_jwt)
    p = api_sub.add_parser("validate-jwt", help="ask the agent whether a JWT-SVID is valid")
    p.add_argument("--audience", required=True)
    p.add_argument("token")
    p.add_argument("--socket", help="Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_api_validate_jwt)

    p = agent_sub.add_parser("health", help="is the agent serving (and ready)?")
    p.add_argument("--socket", help="Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)")
    p.add_argument("--metrics", help="agent metrics HOST:PORT: report /readyz instead")
    p.set_defaults(func=cmd_health)
