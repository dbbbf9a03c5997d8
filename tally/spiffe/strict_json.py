"""JSON as the SPIFFE documents (bundles, JWKS, JWT headers and claims) must be read.

Python's `json` quietly keeps the last of two members with one name and accepts
``NaN`` and ``Infinity``.  Two parsers that disagree on a duplicate ``kid`` or
``sub`` are how a token or a bundle means one thing to a validator and another
to whoever signed it, so every SPIFFE document goes through `loads`, which
refuses both.
"""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON member {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> object:
    """The document, or ValueError naming what is wrong with it."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
