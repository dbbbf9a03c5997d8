"""How a command prints its answer: text for people, ``--output json`` for scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "output", "text") == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text(data))
