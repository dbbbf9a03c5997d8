"""Durations in config files and on the command line: `90s`, `10m`, `1h30m`, `7d`, `3600`.

Rules:

1. Whole seconds only. Certificates carry whole seconds (ASN.1 time has no
   fraction), so a TTL of `1.5s` or `500ms` would be rounded behind the
   operator's back; we refuse it instead.
2. Units are `d`, `h`, `m`, `s`, each at most once and largest first
   (`1h30m`, not `30m1h`), so each written value has one obvious reading. A
   bare integer means seconds, because that is what older configs and flags
   hold.
3. Nothing is silently forgiven: no sign, no spaces, no empty string, no
   unknown unit (`1w`, `1y`, `1ms`), and nothing above 100 years, which is a
   typo rather than a TTL (and would overflow certificate dates).
4. `format_duration` is the inverse: the greedy compound form
   (`5400` -> `1h30m`), so logs and `tally ... show` print what a human
   would have typed.
"""

from __future__ import annotations

import re

MAX_SECONDS = 36525 * 86400  # 100 Julian years
_MAX_TEXT = 64  # longer input is not a duration; bounds work done on garbage

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_COMPOUND = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_BARE = re.compile(r"[0-9]+")
_EXPECTED = (
    "expected whole seconds or units d/h/m/s largest first, e.g. '90s', '10m', '1h30m', '7d'"
)


class DurationError(ValueError):
    """A duration that is not a whole, non-negative, sane number of seconds."""


def parse_duration(text: str) -> int:
    """Return the number of seconds `text` stands for."""
    shown = repr(text) if len(text) <= _MAX_TEXT else f"{text[:_MAX_TEXT]!r}..."
    if not text or len(text) > _MAX_TEXT:
        raise DurationError(f"invalid duration {shown}: {_EXPECTED}")
    if _BARE.fullmatch(text):
        seconds = int(text)
    else:
        match = _COMPOUND.fullmatch(text)
        if match is None or not any(match.groups()):
            raise DurationError(f"invalid duration {shown}: {_EXPECTED}")
        seconds = sum(
            int(amount) * size
            for amount, (_, size) in zip(match.groups(), _UNITS, strict=True)
            if amount is not None
        )
    if seconds > MAX_SECONDS:
        raise DurationError(f"invalid duration {shown}: longer than 100 years")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest compound spelling `parse_duration` reads back as `seconds`."""
    if seconds < 0:
        raise DurationError(f"invalid duration {seconds}: cannot be negative")
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS:
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
