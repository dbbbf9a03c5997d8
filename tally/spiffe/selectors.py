"""Selectors: the facts an attestor observes about a caller, and how entries match them.

Rules:

1. A selector is `type:value`, split at the *first* colon, because values
   carry colons of their own (`unix:uid:1000`, `k8s:ns:payments`). The type is
   a short lowercase word (`[a-z0-9_-]+`); the value is any non-empty text up
   to 1024 UTF-8 bytes without control characters, so that every selector
   prints on one log line and stores in one SQL column unchanged.
2. An entry matches a caller when *every* selector of the entry is among the
   caller's: the entry says what must be true, and the caller may have more
   facts than the entry asks about.
3. An entry with no selectors matches nobody. By rule 2 alone the empty set
   is a subset of everything, so such an entry would hand its SPIFFE ID to every
   workload on every node; an empty selector list is always a mistake (a bad
   import, a cleared form), and failing closed turns it into "no identity"
   instead of "everyone's identity".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

MAX_TYPE_BYTES = 64
MAX_VALUE_BYTES = 1024

_TYPE = re.compile(r"[a-z0-9_-]+")
# Cc: C0/C1 controls and DEL. Zl/Zp: line and paragraph separators, which split
# log lines like a newline does. Cs: lone surrogates, which have no UTF-8 form.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


class SelectorError(ValueError):
    """A selector that is not `type:value` as described in the module docstring."""


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"


def _value_problem(value: str) -> str | None:
    if not value:
        return "value cannot be empty"
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"value cannot contain control character {ch!r}"
    if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        return f"value is longer than {MAX_VALUE_BYTES} bytes"
    return None


def _type_problem(type_: str) -> str | None:
    if not _TYPE.fullmatch(type_):
        return "type must be lowercase letters, digits, '_' or '-' (e.g. 'unix')"
    if len(type_) > MAX_TYPE_BYTES:
        return f"type is longer than {MAX_TYPE_BYTES} bytes"
    return None


@dataclass(frozen=True, order=True)
class Selector:
    """One attested fact, e.g. `unix:uid:1000`; ordered so entries store them sorted."""

    type: str
    value: str

    def __post_init__(self) -> None:
        problem = _type_problem(self.type) or _value_problem(self.value)
        if problem:
            raise SelectorError(
                f"invalid selector {_shown(self.type + ':' + self.value)}: {problem}"
            )

    @classmethod
    def parse(cls, text: str) -> Selector:
        type_, colon, value = text.partition(":")
        if not colon:
            raise SelectorError(
                f"invalid selector {_shown(text)}: expected 'type:value', e.g. 'unix:uid:1000'"
            )
        problem = _type_problem(type_) or _value_problem(value)
        if problem:
            raise SelectorError(f"invalid selector {_shown(text)}: {problem}")
        return cls(type_, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def matches(entry_selectors: Iterable[Selector], caller_selectors: Iterable[Selector]) -> bool:
    """True iff the entry has selectors and the caller has every one of them (rule 3)."""
    wanted = frozenset(entry_selectors)
    return bool(wanted) and wanted.issubset(caller_selectors)
