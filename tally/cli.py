"""The `tally` command: one entry point for every role.

`tally/` imports no role (roles are laid out side by side and never import one
another), so the roles are found by module name and imported only when their
command is run: `tally ca ...` never loads the proxy, and startup stays quick.
Every role module exposes ``register(subparsers)``; each command sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tally.cli_support import OperatorError
from tally.config import ConfigError

ROLES = {
    "ca": ("ca.cli", "the certificate authority and its admin commands"),
    "agent": ("agent.cli", "the node agent and Workload API client commands"),
    "proxy": ("proxy.cli", "the mTLS proxy"),
    "demo": ("tally.demo", "run the whole system on loopback and watch it rotate"),
}


def build_parser(role: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally", description="Hour-lived SPIFFE identities: CA, node agent and mTLS proxy."
    )
    sub = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for name, (module, help_text) in ROLES.items():
        if name == role:
            importlib.import_module(module).register(sub)
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
    except KeyboardInterrupt:
        return 130
    except (OperatorError, ConfigError) as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tally: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
