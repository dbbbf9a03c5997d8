"""Where the CA keeps its state: a datastore URL, parsed once, shown without secrets.

Two engines sit behind the one `ca.store.Store` interface:

- ``sqlite:///ABSOLUTE/PATH`` (or no URL at all: ``<data dir>/ca.db``), the
  embedded default for one machine;
- ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?param=value...]`` (also
  ``postgres://``), for several CA servers on one database.  The text is
  libpq's own URI syntax, so every libpq parameter (``sslmode``, ``host=/run/
  postgresql`` for a Unix socket, ...) means what PostgreSQL's manual says.

Rules:

1. A URL that cannot be used is a `DatastoreUrlError` of one line, raised
   before anything is opened, and that line never repeats a password.
2. `Datastore.shown` is the only form that goes into a log line, an error or
   an audit record: the password (in the authority part or as a ``password``
   parameter) is replaced by ``***``.  A password belongs in ``~/.pgpass``, a
   ``PGPASSWORD`` environment variable or ``TALLY_DATASTORE``; the URL in a
   config file or on a command line is readable by too many people.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from tally.ops.errors import OperatorError

Engine = Literal["sqlite", "postgresql"]
_PG_SCHEMES = ("postgresql", "postgres")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DatastoreUrlError(OperatorError):
    """A ``--datastore`` the CA cannot use; the message never holds its password."""


@dataclass(frozen=True)
class Datastore:
    """A parsed datastore URL: which engine, and what to hand it."""

    engine: Engine
    url: str
    """The whole URL as given (may hold a password: never log it, log `shown`)."""
    path: Path | None = None
    """The SQLite file, for ``sqlite:``; None for PostgreSQL."""

    @property
    def shown(self) -> str:
        """The URL with any password replaced by ``***`` (rule 2)."""
        return redact(self.url)

    def __repr__(self) -> str:  # a stray repr() in a log or traceback shows no secret
        return f"Datastore({self.engine}, {self.shown})"

    @classmethod
    def sqlite(cls, path: Path) -> Datastore:
        return cls("sqlite", f"sqlite://{path}", path)


def _secret(key: str) -> bool:
    """Whether a query parameter may hold a password: ``password``, ``sslpassword``, and
    any key that merely contains the word (``?password`` after a doubled ``?``, say:
    libpq refuses it, and the message saying so must not show it)."""
    return "password" in key.lower()


def redact(url: str) -> str:
    """``url`` with its password, in either place libpq accepts one, shown as ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _secret(k) else v) for k, v in pairs], safe="/:")
        fragment = "***" if parts.fragment else ""  # libpq has no use for one: never shown
        return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
    except ValueError:
        return f"{url.split(':', 1)[0]}:(unparsable URL)"


def parse(text: str) -> Datastore:
    """Read a datastore URL (rule 1): ``sqlite:///path`` or a libpq ``postgresql://`` URI."""
    if not text or _CONTROL.search(text):
        raise DatastoreUrlError("datastore URL is empty or holds control characters")
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise DatastoreUrlError(
            f"datastore {redact(text)!r} is not a URL: use sqlite:///PATH or"
            " postgresql://USER@HOST/DB"
        )
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("///") or rest.startswith("////"):
            raise DatastoreUrlError(
                f"datastore {redact(text)!r}: a SQLite URL is sqlite:/// and an absolute path"
            )
        path = Path(unquote(rest[2:]))
        if path.name in ("", ".", "..") or ".." in path.parts:
            raise DatastoreUrlError(f"datastore {redact(text)!r}: name a file, without '..'")
        return Datastore("sqlite", text, path)
    if scheme in _PG_SCHEMES:
        _check_postgresql(text)
        return Datastore("postgresql", text)
    raise DatastoreUrlError(
        f"datastore {redact(text)!r}: unknown engine {scheme!r} (sqlite or postgresql)"
    )


def _check_postgresql(text: str) -> None:
    """libpq's own parser judges the URI, without connecting; its words may quote the
    password, so only ours are shown."""
    from psycopg import conninfo, errors  # the driver loads only where PostgreSQL is used

    shown = redact(text)
    try:
        params = conninfo.conninfo_to_dict(text)
    except (errors.ProgrammingError, errors.OperationalError, ValueError):
        raise DatastoreUrlError(f"datastore {shown!r} is not a valid PostgreSQL URL") from None
    if not params.get("dbname"):
        raise DatastoreUrlError(f"datastore {shown!r} names no database (postgresql://.../DB)")
