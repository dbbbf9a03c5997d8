"""What every `tally` command shares: the error type for operator mistakes and output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


class OperatorError(Exception):
    """Something the operator must fix: shown as one line, never a traceback."""


class CommandError(OperatorError):
    """A command's own refusal or an unreachable daemon."""


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "output", "text") == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text(data))
