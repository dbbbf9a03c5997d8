"""SPIFFE IDs and trust domains, parsed strictly (like go-spiffe).

Rules:

1. One spelling per identity. The scheme must be lowercase `spiffe://` and the
   trust domain lowercase `a-z 0-9 . - _`; we do not normalize
   `SPIFFE://EXAMPLE.ORG` (py-spiffe does, go-spiffe does not). An ID is compared
   as a string by every peer, in SQL and in authorization policy, so accepting
   two spellings of one identity would let them drift apart.
2. Paths are `""` or `/seg/seg`: segments of `A-Z a-z 0-9 . - _`, never empty,
   never `.` or `..`, no trailing slash, no percent-encoding, no query or
   fragment. Whatever parses here is printed back byte for byte
   (`str(SpiffeId.parse(s)) == s`).
3. Bounded: the whole URI is at most 2048 bytes (the spec's "MUST accept"
   floor, which we also treat as the ceiling so nothing we emit is refused by a
   peer) and the trust domain at most 255 bytes (RFC 3986's host limit).
4. Every pattern is applied with `re.fullmatch` over ASCII classes: Python's `$`
   also matches before a trailing newline, which is how py-spiffe 0.3.2 accepts
   `spiffe://example.org/foo\\n`.
5. The value objects validate themselves, so a `SpiffeId` that exists is valid
   however it was built.
6. `SpiffeId.parse` remembers what it accepted (at most `_PARSED_MAX` IDs), since the
   same few IDs come back all day (a CA signs and records each entry's ID at every
   renewal); a fresh parse validates three times over and costs about 20 µs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_MAX_SHOWN = 80
_PARSED_MAX = 4096
_parsed: dict[str, SpiffeId] = {}  # rule 6


class SpiffeIdError(ValueError):
    """A SPIFFE ID or trust domain that does not follow the SPIFFE ID standard."""


def _shown(text: str) -> str:
    """Quote the input for an error message, cut short so a 1 MB input stays one line."""
    if len(text) <= _MAX_SHOWN:
        return repr(text)
    return f"{text[:_MAX_SHOWN]!r}... ({len(text)} characters)"


def _trust_domain_problem(name: str) -> str | None:
    if not name:
        return "trust domain is missing"
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
    if not _TRUST_DOMAIN.fullmatch(name):
        return (
            "trust domain characters are limited to lowercase letters, numbers, "
            "dots, dashes, and underscores"
        )
    return None


def _segment_problem(segment: str) -> str | None:
    if not segment:
        return "path cannot contain empty segments"
    if segment in (".", ".."):
        return "path cannot contain dot segments"
    if not _SEGMENT.fullmatch(segment):
        return (
            "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
        )
    return None


def _path_problem(path: str) -> str | None:
    if not path:
        return None
    if not path.startswith("/"):
        return "path must be empty or start with '/'"
    if path.endswith("/"):
        return "path cannot have a trailing slash"
    for segment in path[1:].split("/"):
        problem = _segment_problem(segment)
        if problem:
            return problem
    return None


@dataclass(frozen=True, order=True)
class TrustDomain:
    """The authority part of a SPIFFE ID: the unit of trust, one CA and one bundle."""

    name: str

    def __post_init__(self) -> None:
        problem = _trust_domain_problem(self.name)
        if problem:
            raise SpiffeIdError(f"invalid trust domain {_shown(self.name)}: {problem}")

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept `example.org` or `spiffe://example.org` (config files use both).

        An ID with a path is refused rather than cut down to its trust domain:
        where a trust domain is expected, a path is a mistake worth reporting.
        """
        if text.startswith(SCHEME_PREFIX):
            spiffe_id = SpiffeId.parse(text)
            if not spiffe_id.is_root:
                raise SpiffeIdError(
                    f"invalid trust domain {_shown(text)}: expected a trust domain such as "
                    "'example.org' or 'spiffe://example.org', got a SPIFFE ID with a path"
                )
            return spiffe_id.trust_domain
        problem = _trust_domain_problem(text)
        if problem:
            raise SpiffeIdError(f"invalid trust domain {_shown(text)}: {problem}")
        return cls(text)

    def id(self) -> SpiffeId:
        """The trust domain's own ID (`spiffe://example.org`), carried by its CAs."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity: trust domain plus operator-defined path ("" for the root ID)."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, got {self.trust_domain!r}")
        problem = _path_problem(self.path)
        if problem:
            raise SpiffeIdError(
                f"invalid SPIFFE ID {_shown(SCHEME_PREFIX + self.trust_domain.name + self.path)}: "
                f"{problem}"
            )
        size = len(SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path)
        if size > MAX_ID_BYTES:
            raise SpiffeIdError(
                f"invalid SPIFFE ID {_shown(str(self))}: longer than {MAX_ID_BYTES} bytes"
            )

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        known = _parsed.get(text)
        if known is not None:
            return known
        parsed = cls._parse(text)
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[text] = parsed
        return parsed

    @classmethod
    def _parse(cls, text: str) -> SpiffeId:
        def fail(problem: str) -> SpiffeIdError:
            return SpiffeIdError(f"invalid SPIFFE ID {_shown(text)}: {problem}")

        if not text:
            raise fail("cannot be empty")
        # Counted in UTF-8 bytes as the spec does; anything non-ASCII fails later anyway.
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise fail(f"longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise fail("scheme is missing or invalid (expected lowercase 'spiffe://')")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        problem = _trust_domain_problem(name) or _path_problem(path)
        if problem:
            raise fail(problem)
        return cls(TrustDomain(name), path)

    @classmethod
    def from_parts(cls, td: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build an ID from path segments, refusing any segment that is not one segment.

        Checking each segment (rather than joining and parsing) keeps a `/` inside
        a caller's value from silently creating extra path levels.
        """
        domain = td if isinstance(td, TrustDomain) else TrustDomain.parse(td)
        for segment in segments:
            problem = _segment_problem(segment)
            if problem:
                raise SpiffeIdError(
                    f"invalid SPIFFE ID path segment {_shown(segment)} "
                    f"for trust domain {domain.name!r}: {problem}"
                )
        return cls(domain, "".join("/" + segment for segment in segments))

    @property
    def is_root(self) -> bool:
        """True for the trust domain's own ID, which CAs carry and leaves must not."""
        return not self.path

    def member_of(self, td: TrustDomain) -> bool:
        return self.trust_domain == td

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
