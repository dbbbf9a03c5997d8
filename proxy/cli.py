"""`tally proxy server` and `tally proxy client`: flags and TOML come from `proxy.settings`.

Startup problems (a bad flag, unreadable certificate files, an address in
use) end the command with one line; `tally.app.cli` prints it.  Errors raised
inside the proxy's nurseries arrive wrapped in exception groups, so the one
operator error inside is unwrapped here.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from proxy.settings import ClientSettings, ServerSettings
from tally.ops.config import ConfigError, add_arguments, load
from tally.ops.errors import OperatorError
from tally.ops.logs import setup_logging


def _operator_error(exc: BaseException) -> BaseException | None:
    if isinstance(exc, OperatorError | ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _operator_error(inner)
            if found is not None:
                return found
    return None


def _run(cfg: ServerSettings | ClientSettings, args: argparse.Namespace) -> int:
    from proxy.daemon import Proxy, WorkerSlot

    setup_logging(cfg.log_level)
    schema = type(cfg)
    count = cfg.worker_count()
    slot_text = getattr(args, "worker_slot", None)
    if count > 1 and slot_text is None:
        return _supervise(cfg, count)
    worker = None
    if slot_text is not None:
        worker = WorkerSlot.parse(slot_text, args.worker_fd, args.worker_parent)

    def reload() -> ServerSettings | ClientSettings:
        return load(schema, args)

    proxy = Proxy(cfg, reload=reload, env=dict(os.environ), worker=worker)
    try:
        trio.run(proxy.run)
    except BaseExceptionGroup as group:
        found = _operator_error(group)
        if found is None:
            raise
        raise found from None
    return 0


def _supervise(cfg: ServerSettings | ClientSettings, count: int) -> int:
    """``--workers N`` (N > 1): run N proxies under a supervisor (`proxy.workers`)."""
    from proxy.workers import Supervisor

    supervisor = Supervisor(cfg, _command_args(), count)
    try:
        return trio.run(supervisor.run)
    except BaseExceptionGroup as group:
        found = _operator_error(group)
        if found is None:
            raise
        raise found from None


def _command_args() -> list[str]:
    """This command's arguments (``proxy server ...``), for the workers to repeat."""
    return sys.argv[1:]


def _worker_flags(parser: argparse.ArgumentParser) -> None:
    """How a supervisor tells a worker who it is (`proxy.workers`); not for operators."""
    parser.add_argument("--worker-slot", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-parent", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)


def cmd_server(args: argparse.Namespace) -> int:
    return _run(load(ServerSettings, args), args)


def cmd_client(args: argparse.Namespace) -> int:
    return _run(load(ClientSettings, args), args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    proxy = sub.add_parser("proxy", help="the mTLS proxy")
    modes = proxy.add_subparsers(dest="proxy_command", required=True, metavar="MODE")
    server = modes.add_parser(
        "server",
        help="in front of a service: mutual TLS in, plain TCP or HTTP out to --target",
        description="Accept mutual TLS on --listen, admit peers by SPIFFE ID, forward to --target.",
    )
    add_arguments(server, ServerSettings)
    _worker_flags(server)
    server.set_defaults(func=cmd_server)
    client = modes.add_parser(
        "client",
        help="beside an app: plain TCP or HTTP in, mutual TLS out to --target",
        description="Accept plain connections on --listen and carry them over mutual TLS to "
        "--target, whose SPIFFE ID must be one of --expect-id.",
    )
    add_arguments(client, ClientSettings)
    _worker_flags(client)
    client.set_defaults(func=cmd_client)
