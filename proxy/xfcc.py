"""X-Forwarded-Client-Cert in Envoy's format: how the inbound proxy names the caller.

Rules:

1. The header is ours alone.  Whatever a client sent under this name is
   dropped before ours is added (Envoy's SANITIZE_SET), so the service can
   believe it without trusting the client.
2. One element per hop, ``key=value`` pairs joined by ``;``, elements joined by
   ``,``.  We write ``By`` (our own SPIFFE ID), ``Hash`` (hex SHA-256 of the
   peer's leaf DER) and ``URI`` (the peer's SPIFFE ID).
3. No value can inject a pair or an element.  A value holding ``,``, ``;``,
   ``=``, ``"``, ``\\``, or space at either end, or nothing at all, is
   written in double quotes with ``"`` and ``\\`` escaped by a backslash (Envoy
   escapes only ``"``; escaping the backslash too makes a quoted value ending
   in one unambiguous).  Characters outside printable ASCII cannot go into an
   HTTP header safely and are refused.  `parse` reads what `element` writes,
   which is how the tests prove rule 3 (and what a Python backend can use).
4. Pure: strings in, strings out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HEADER = "x-forwarded-client-cert"

_SPECIAL = frozenset(',;="\\')
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

Pair = tuple[str, str]


class XfccError(ValueError):
    """A value that cannot be written, or a header that does not parse."""


def _check_printable(value: str, what: str) -> None:
    for ch in value:
        if not " " <= ch <= "~":
            raise XfccError(f"XFCC {what} {value[:60]!r}: character {ch!r} is not printable ASCII")


def quote_value(value: str) -> str:
    """``value`` as it goes after ``key=``: bare when that is unambiguous, else quoted."""
    _check_printable(value, "value")
    if value and value.strip(" ") == value and not _SPECIAL.intersection(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def element(pairs: Sequence[Pair]) -> str:
    """One hop's element; keys are fixed names such as ``By`` and must be plain tokens."""
    parts = []
    for key, value in pairs:
        if not key or not _KEY_CHARS.issuperset(key):
            raise XfccError(f"XFCC key {key[:60]!r}: expected letters, digits, '-' or '_'")
        parts.append(f"{key}={quote_value(value)}")
    return ";".join(parts)


def cert_hash(leaf_der: bytes) -> str:
    return hashlib.sha256(leaf_der).hexdigest()


def proxy_element(by: str, leaf_der: bytes, uri: str) -> str:
    """The element the inbound proxy sends: ``By=<own ID>;Hash=<sha256>;URI=<peer ID>``."""
    return element([("By", by), ("Hash", cert_hash(leaf_der)), ("URI", uri)])


def parse(header: str) -> list[list[Pair]]:
    """Elements, each a list of (key, value) pairs in order; keys keep their case."""
    _check_printable(header, "header")
    elements: list[list[Pair]] = [[]]
    i, n = 0, len(header)
    while True:
        eq = header.find("=", i)
        if eq < 0:
            raise XfccError(f"XFCC header: expected key=value at offset {i}")
        key = header[i:eq].strip(" ")
        if not key or not _KEY_CHARS.issuperset(key):
            raise XfccError(f"XFCC header: bad key {key[:60]!r} at offset {i}")
        value, i = _read_value(header, eq + 1)
        elements[-1].append((key, value))
        if i == n:
            return elements
        if header[i] == ",":
            elements.append([])
        i += 1


def _read_value(header: str, i: int) -> tuple[str, int]:
    """A value starting at ``i``; returns it and the offset of the separator (or the end)."""
    n = len(header)
    if i < n and header[i] == '"':
        out = []
        i += 1
        while i < n and header[i] != '"':
            if header[i] == "\\":
                i += 1
                if i == n:
                    break
            out.append(header[i])
            i += 1
        if i >= n:
            raise XfccError("XFCC header: unterminated quoted value")
        i += 1
        if i < n and header[i] not in ",;":
            raise XfccError(f"XFCC header: expected ',' or ';' after a quoted value at {i}")
        return "".join(out), i
    end = i
    while end < n and header[end] not in ",;":
        if header[end] in '="\\':
            raise XfccError(f"XFCC header: {header[end]!r} in an unquoted value at {end}")
        end += 1
    return header[i:end], end
