"""The `tally` command: one entry point for every role.

`tally.app` is the only room that imports the roles (they are laid out side by
side and never import one another; the layering test holds both rules).  Each
role is imported inside `_register`, only when its command is run: `tally ca ...`
never loads the proxy, and startup stays quick.  Every role module exposes
``register(subparsers)``; each command sets ``func``.
"""

from __future__ import annotations

import argparse
import sys

from tally.ops.config import ConfigError
from tally.ops.errors import OperatorError

ROLES = {
    "ca": "the certificate authority and its admin commands",
    "agent": "the node agent and Workload API client commands",
    "proxy": "the mTLS proxy",
    "demo": "run the whole system on loopback and watch it rotate",
}


def _register(role: str, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    if role == "ca":
        from ca import cli as ca_cli

        ca_cli.register(sub)
    elif role == "agent":
        from agent import cli as agent_cli

        agent_cli.register(sub)
    elif role == "proxy":
        from proxy import cli as proxy_cli

        proxy_cli.register(sub)
    else:
        from tally.app import demo

        demo.register(sub)


def build_parser(role: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally", description="Hour-lived SPIFFE identities: CA, node agent and mTLS proxy."
    )
    sub = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for name, help_text in ROLES.items():
        if name == role:
            _register(name, sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role = argv[0] if argv and argv[0] in ROLES else None
    try:
        parser = build_parser(role)
    except ModuleNotFoundError as exc:
        print(f"tally: error: {role} is not available in this build ({exc.name})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.parse_args([*argv, "--help"])
        return 2
    try:
        code: int = args.func(args)
    except BaseException as exc:
        problem = _operator_problem(exc)
        if problem is None:
            raise
        print(f"tally: error: {problem}", file=sys.stderr)
        return 130 if problem == "interrupted" else 1
    return code


def _operator_problem(exc: BaseException) -> str | None:
    """The one line to show for an operator's mistake, also from inside a nursery.

    Daemons raise their startup errors from inside trio nurseries, which wrap
    them in exception groups; the operator still gets one line, not a traceback.
    """
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _operator_problem(exc.exceptions[0])
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OperatorError | ConfigError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


if __name__ == "__main__":
    sys.exit(main())
