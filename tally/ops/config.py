"""Daemon settings: declared once, read from defaults, a TOML file and flags.

Rules:

1. One declaration per daemon. A frozen dataclass whose fields are made with
   `setting()` is the whole truth: the TOML keys, the command-line flags, the
   validation and the generated docs (`describe`) all come from it, so they
   cannot drift apart.
2. Merge order is defaults < TOML file (``--config FILE``) < flags. A flag
   that was not given leaves no trace in the namespace (``argparse.SUPPRESS``),
   so "not given" is never confused with "given the default".
3. Nothing is silently forgiven. An unknown key, a value of the wrong type, a
   ``[section]`` in a flat file or an unreadable file is a `ConfigError` of one
   line that names the source (file path, flag or environment variable), the
   key and what was expected. A misspelt key that is ignored leaves the
   operator believing a setting is in force when it is not.
4. `REQUIRED` is a sentinel distinct from ``None``: ``None`` means "disabled"
   (only allowed for ``X | None`` settings), `REQUIRED` means "the operator
   must say".
5. Secret settings (``secret=True``, e.g. join tokens) never appear in help
   defaults, error messages or `dump_toml` output. Because a command line is
   readable by every local user (``/proc/*/cmdline``) and config files get
   copied around, a secret may also come from the environment variable
   ``TALLY_<NAME>`` (between the file and the flags); only secrets do, so that
   one stray variable cannot reconfigure every daemon on a host.
6. A list of strings in TOML may also be one string, a list of one: a
   setting that grew from one value to several (the agent's ``server``)
   keeps reading the files written when it was one, and ``x = "a"`` means
   what anyone reading it takes it to mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from tally.ops.durations import MAX_SECONDS, DurationError, format_duration, parse_duration

T = TypeVar("T")

_META_KEY = "tally.config"
_INT64 = (-(2**63), 2**63 - 1)
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SHOWN_CHARS = 60


class ConfigError(ValueError):
    """A setting the operator must fix; the message names where it came from."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name, an address, or a bracketed IPv6 address) can only be
    reached from this machine: ``localhost`` or a loopback address; any other name may
    resolve anywhere."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AddressError(ConfigError):
    """Text that is not a listen/connect address."""


class _Required(enum.Enum):
    REQUIRED = "REQUIRED"

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required.REQUIRED


Table = dict[str, Any]
"""A setting of type ``list[Table]`` is an array of TOML tables (``[[name]]``), each checked
by the daemon's own ``validate``; on the command line each flag gives one inline table."""


class Duration(float):
    """Seconds. A distinct type so the loader knows to accept '10m' as well as 600."""

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


# -- addresses --------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_ADDRESS_FORMS = "expected HOST:PORT, [IPv6]:PORT, unix:/abs/path or /abs/path"


@dataclass(frozen=True)
class Address:
    """Where a daemon listens or connects: TCP ``host:port`` or a Unix socket path.

    Exactly one of (``host``, ``port``) or ``path`` is set. IPv6 hosts are kept
    without brackets and in compressed form, ready for the socket calls.
    """

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        tcp = self.host is not None and self.port is not None
        unix = self.path is not None
        if tcp == unix or (unix and (self.host is not None or self.port is not None)):
            raise AddressError("an address is either host and port, or a unix socket path")

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            return cls(path=_unix_path(text, text[len("unix:") :]))
        if text.startswith("/"):
            return cls(path=_unix_path(text, text))
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not host_text:
            raise AddressError(f"invalid address {_shown(text)}: {_ADDRESS_FORMS}")
        if not _PORT_TEXT.fullmatch(port_text) or int(port_text) > 65535:
            raise AddressError(f"invalid address {_shown(text)}: port must be 0-65535")
        return cls(host=_host(text, host_text), port=int(port_text))

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _unix_path(text: str, path: str) -> str:
    if not path.startswith("/") or path == "/":
        raise AddressError(f"invalid address {_shown(text)}: a unix socket path must be absolute")
    if "\0" in path:
        raise AddressError(f"invalid address {_shown(text)}: NUL in socket path")
    try:
        size = len(path.encode())
    except UnicodeEncodeError as exc:
        raise AddressError(f"invalid address {_shown(text)}: not valid UTF-8") from exc
    if size > _UNIX_PATH_MAX:
        raise AddressError(
            f"invalid address {_shown(text)}: unix socket path longer than "
            f"{_UNIX_PATH_MAX} bytes ({size})"
        )
    return path


def _host(text: str, host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError as exc:
            raise AddressError(f"invalid address {_shown(text)}: bad IPv6 address") from exc
    if ":" in host:
        raise AddressError(
            f"invalid address {_shown(text)}: put an IPv6 host in brackets, e.g. [::1]:8443"
        )
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError as exc:
            raise AddressError(f"invalid address {_shown(text)}: bad IPv4 address") from exc
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"invalid address {_shown(text)}: bad host name {_shown(host)}")
    return host


# -- declaring settings -----------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    help: str
    flag: str | None
    metavar: str | None
    secret: bool


def setting(
    default: object = REQUIRED,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare one field of a settings dataclass.

    Fields are keyword-only so that a required setting may follow ones with
    defaults, and list defaults are copied per instance rather than shared.
    """
    if flag is not None and not flag.startswith("--"):
        raise TypeError(f"setting flag {flag!r} must be a long option, e.g. '--trust-domain'")
    metadata = {_META_KEY: _Meta(help, flag, metavar, secret)}
    if default is REQUIRED:
        return dataclasses.field(kw_only=True, metadata=metadata)
    if isinstance(default, list):
        return dataclasses.field(
            kw_only=True, metadata=metadata, default_factory=functools.partial(list, default)
        )
    return dataclasses.field(kw_only=True, metadata=metadata, default=default)


class _Kind(enum.Enum):
    """The value types a setting may have, with their names for messages and docs."""

    STR = ("string", "a string")
    INT = ("integer", "an integer")
    FLOAT = ("number", "a number")
    BOOL = ("boolean", "true or false")
    PATH = ("path", "a path")
    DURATION = ("duration", "a duration like '10m' or a number of seconds")
    ADDRESS = ("address", "an address (HOST:PORT, [IPv6]:PORT or unix:/path)")
    STR_LIST = ("list of strings", "a string or an array of strings")
    TABLES = (
        "list of tables",
        "an array of tables ([[name]] in TOML; a flag takes one inline table)",
    )

    def __init__(self, doc_name: str, expected: str) -> None:
        self.doc_name = doc_name
        self.expected = expected


_SCALARS: Mapping[object, _Kind] = {
    str: _Kind.STR,
    int: _Kind.INT,
    float: _Kind.FLOAT,
    bool: _Kind.BOOL,
    Path: _Kind.PATH,
    Duration: _Kind.DURATION,
    Address: _Kind.ADDRESS,
}
_PYTHON_TYPES: Mapping[_Kind, type | tuple[type, ...]] = {
    _Kind.STR: str,
    _Kind.INT: int,
    _Kind.FLOAT: (int, float),
    _Kind.BOOL: bool,
    _Kind.PATH: Path,
    _Kind.DURATION: Duration,
    _Kind.ADDRESS: Address,
    _Kind.STR_LIST: list,
    _Kind.TABLES: list,
}
_METAVARS: Mapping[_Kind, str] = {
    _Kind.INT: "N",
    _Kind.FLOAT: "NUMBER",
    _Kind.PATH: "PATH",
    _Kind.DURATION: "DURATION",
    _Kind.ADDRESS: "ADDRESS",
    _Kind.TABLES: "TABLE",
}


@dataclass(frozen=True)
class _Setting:
    name: str
    kind: _Kind
    optional: bool
    default: object  # REQUIRED, None or a value of `kind`
    meta: _Meta

    @property
    def flag(self) -> str:
        return self.meta.flag or "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str | None:
        return f"TALLY_{self.name.upper()}" if self.meta.secret else None


def _kind_of(annotation: object) -> tuple[_Kind, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return _kind_of(args[0])[0], True
    elif origin is list and typing.get_args(annotation) == (str,):
        return _Kind.STR_LIST, False
    elif origin is list and typing.get_args(annotation) == (Table,):
        return _Kind.TABLES, False
    elif annotation in _SCALARS:
        return _SCALARS[annotation], False
    raise TypeError(f"unsupported setting type {annotation!r}")


def _settings(schema: type) -> tuple[_Setting, ...]:
    """Read a schema's declarations; a mistake in them is a programming error (TypeError)."""
    params = schema.__dataclass_params__ if dataclasses.is_dataclass(schema) else None  # type: ignore[attr-defined]
    if params is None or not params.frozen:
        raise TypeError(f"{schema!r} is not a frozen dataclass")
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        meta = f.metadata.get(_META_KEY)
        where = f"{schema.__name__}.{f.name}"
        if not isinstance(meta, _Meta):
            raise TypeError(f"{where} is not declared with setting()")
        if not _NAME.fullmatch(f.name) or f.name == "config":
            raise TypeError(f"{where}: setting names are lower_snake_case and not 'config'")
        try:
            kind, optional = _kind_of(hints[f.name])
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from exc
        default: object = REQUIRED
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if optional and default is not None:
            raise TypeError(f"{where}: an optional setting defaults to None")
        if not optional and default is not REQUIRED:
            _check_default(where, kind, default)
        out.append(_Setting(f.name, kind, optional, default, meta))
    return tuple(out)


def _check_default(where: str, kind: _Kind, default: object) -> None:
    ok = isinstance(default, _PYTHON_TYPES[kind]) and not (
        kind in (_Kind.INT, _Kind.FLOAT) and isinstance(default, bool)
    )
    if kind is _Kind.STR_LIST and isinstance(default, list):
        ok = all(isinstance(item, str) for item in default)
    if kind is _Kind.TABLES and isinstance(default, list):
        ok = all(isinstance(item, dict) for item in default)
    if not ok:
        raise TypeError(f"{where}: default {default!r} is not {kind.expected}")


# -- converting values ------------------------------------------------------------------


class _Invalid(ValueError):
    """A bad value; the caller adds where it came from."""


def _inline_table(text: str) -> dict[str, Any]:
    """A flag's value for a `Table` setting: one TOML inline table, as written in the file."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise _Invalid(f'expected an inline table like {{key = "value"}}: {exc}') from exc
    if not isinstance(value, dict):
        raise _Invalid('expected an inline table like {key = "value"}')
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _toml_type(value: object) -> str:
    for python_type, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
    ):
        if isinstance(value, python_type):
            return name
    return type(value).__name__  # datetime, date, time


def _got(value: object, secret: bool) -> str:
    """What was found, in TOML's words; a secret's value is never shown."""
    if secret or isinstance(value, list | dict):
        return _toml_type(value)
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    shown = _shown(value) if isinstance(value, str) else str(value)
    return f"{_toml_type(value)} {shown}"


def _text(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise _Invalid("not valid UTF-8") from exc
    return value


def _path(value: str) -> Path:
    if not value:
        raise _Invalid("expected a path, got an empty string")
    if "\0" in value:
        raise _Invalid("NUL in path")
    return Path(_text(value))


def _duration_text(value: str) -> Duration:
    try:
        return Duration(parse_duration(value))
    except DurationError as exc:
        raise _Invalid(str(exc)) from exc


def _duration_number(value: int | float) -> Duration:
    if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
        raise _Invalid(f"invalid duration {value!r}: expected 0 to {MAX_SECONDS} seconds")
    return Duration(value)


def _int(value: int) -> int:
    if not _INT64[0] <= value <= _INT64[1]:
        raise _Invalid(f"integer {_shown(value)} out of range")
    return value


def _float(value: float) -> float:
    if not math.isfinite(value):
        raise _Invalid(f"expected a finite number, got {value!r}")
    return value


def _address(value: str) -> Address:
    try:
        return Address.parse(value)
    except AddressError as exc:
        raise _Invalid(str(exc)) from exc


def _from_toml(s: _Setting, value: object) -> object:
    """A value as tomllib returned it, checked against the setting's kind."""
    kind = s.kind
    if isinstance(value, bool):
        if kind is _Kind.BOOL:
            return value
    elif isinstance(value, int | float):
        if kind is _Kind.INT and isinstance(value, int):
            return _int(value)
        if kind is _Kind.FLOAT:
            return _float(float(value))
        if kind is _Kind.DURATION:
            return _duration_number(value)
    if kind is _Kind.STR and isinstance(value, str):
        return _text(value)
    if kind is _Kind.PATH and isinstance(value, str):
        return _path(value)
    if kind is _Kind.DURATION and isinstance(value, str):
        return _duration_text(value)
    if kind is _Kind.ADDRESS and isinstance(value, str):
        return _address(value)
    if kind is _Kind.STR_LIST and isinstance(value, str):
        return [_text(value)]  # rule 6: one string is a list of one
    if kind is _Kind.STR_LIST and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Invalid(f"expected {kind.expected}, item {i} is {_got(item, s.meta.secret)}")
        return [_text(item) for item in value]
    if kind is _Kind.TABLES and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise _Invalid(f"expected {kind.expected}, item {i} is {_got(item, s.meta.secret)}")
        return [dict(item) for item in value]
    raise _Invalid(f"expected {kind.expected}, got {_got(value, s.meta.secret)}")


def _from_text(s: _Setting, value: object) -> object:
    """A value from argparse (a string, a bool for switches, a list for repeats)."""
    kind = s.kind
    if kind is _Kind.BOOL and isinstance(value, bool):
        return value
    if kind is _Kind.STR_LIST and isinstance(value, list):
        return [_text(str(item)) for item in value]
    if kind is _Kind.TABLES and isinstance(value, list):
        return [_inline_table(str(item)) for item in value]
    if not isinstance(value, str):
        raise _Invalid(f"expected {kind.expected}, got {type(value).__name__}")
    shown = "value" if s.meta.secret else _shown(value)
    if kind is _Kind.STR:
        return _text(value)
    if kind is _Kind.INT:
        if not _INT_TEXT.fullmatch(value):
            raise _Invalid(f"invalid integer {shown}")
        return _int(int(value))
    if kind is _Kind.FLOAT:
        if not _FLOAT_TEXT.fullmatch(value):
            raise _Invalid(f"invalid number {shown}")
        return _float(float(value))
    if kind is _Kind.PATH:
        return _path(value)
    if kind is _Kind.DURATION:
        return _duration_text(value)
    if kind is _Kind.ADDRESS:
        return _address(value)
    raise _Invalid(f"expected {kind.expected}, got text {shown}")


# -- the command line and loading -------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, schema: type) -> None:
    """Add ``--config FILE`` and one flag per setting; `load` reads them back."""
    parser.add_argument(
        "--config", metavar="FILE", default=None, help="TOML file with settings (flags win)"
    )
    for s in _settings(schema):
        help_text = _flag_help(s).replace("%", "%%")
        common: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS, "help": help_text}
        if s.kind is _Kind.BOOL:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, **common)
            continue
        metavar = s.meta.metavar or _METAVARS.get(s.kind, s.name.upper())
        action = "append" if s.kind in (_Kind.STR_LIST, _Kind.TABLES) else "store"
        parser.add_argument(s.flag, action=action, metavar=metavar, **common)


def _flag_help(s: _Setting) -> str:
    notes = []
    if s.default is REQUIRED:
        notes.append("required")
    elif s.default is not None and not s.meta.secret:
        notes.append(f"default: {_render_default(s)}")
    if s.kind in (_Kind.STR_LIST, _Kind.TABLES):
        notes.append("repeatable")
    if s.env_var:
        notes.append(f"secret; or set ${s.env_var}")
    return f"{s.meta.help} ({'; '.join(notes)})" if notes else s.meta.help


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from exc


def _file_values(path: str, by_name: Mapping[str, _Setting]) -> dict[str, object]:
    values = {}
    for key, value in _read_toml(path).items():
        s = by_name.get(key)
        if s is None and isinstance(value, dict):
            raise ConfigError(
                f"config {path}: unexpected table {_shown(key)}: settings are top-level "
                "keys, with no [sections]"
            )
        if s is None:
            raise ConfigError(f"config {path}: unknown key {_shown(key)}{_suggest(key, by_name)}")
        try:
            values[key] = _from_toml(s, value)
        except _Invalid as exc:
            raise ConfigError(f"config {path}: key {key!r}: {exc}") from exc
    return values


def _suggest(key: str, names: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_").lower(), list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _given(source: str, s: _Setting, raw: object) -> object:
    try:
        return _from_text(s, raw)
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load(schema: type[T], args: argparse.Namespace, *, env: Mapping[str, str] | None = None) -> T:
    """Merge defaults < ``--config`` file < environment (secrets only) < flags.

    ``env`` defaults to ``os.environ``; tests pass a dict. The result's own
    ``validate()``, if it has one, runs last for checks across settings.
    """
    settings = _settings(schema)
    by_name = {s.name: s for s in settings}
    env = os.environ if env is None else env
    config_path = getattr(args, "config", None)
    values = _file_values(config_path, by_name) if config_path is not None else {}
    for s in settings:
        if s.env_var and env.get(s.env_var):
            values[s.name] = _given(f"environment {s.env_var}", s, env[s.env_var])
        if hasattr(args, s.name):
            values[s.name] = _given(f"flag {s.flag}", s, getattr(args, s.name))
        if s.name not in values and s.default is REQUIRED:
            also = f", or environment {s.env_var}" if s.env_var else ""
            raise ConfigError(
                f"missing required setting {s.name!r} (flag {s.flag} or key {s.name} "
                f"in the config file{also})"
            )
    cfg = schema(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


# -- docs and dumping -------------------------------------------------------------------


@dataclass(frozen=True)
class SettingDoc:
    """One row of a daemon's configuration reference."""

    name: str
    flag: str
    type: str
    default: str  # "required", "unset", "<redacted>" or the value as a person types it
    help: str


def describe(schema: type) -> list[SettingDoc]:
    return [
        SettingDoc(s.name, s.flag, s.kind.doc_name, _render_default(s), s.meta.help)
        for s in _settings(schema)
    ]


def _render_default(s: _Setting) -> str:
    if s.default is REQUIRED:
        return "required"
    if s.default is None:
        return "unset"
    if s.meta.secret:
        return "<redacted>"
    value = s.default
    if isinstance(value, Duration) and value.is_integer():
        return format_duration(int(value))
    if isinstance(value, str | Path | Address) and str(value):
        return str(value)
    return _toml_value(s.kind, value)


def dump_toml(cfg: object) -> str:
    """The TOML file that `load` turns back into ``cfg``, help as comments.

    Secrets are written as ``"<redacted>"``, so the output is safe to print
    but does not load back to the same secret. Unset optional settings are
    left as comments, since TOML has no null.
    """
    blocks = []
    for s in _settings(type(cfg)):
        value = getattr(cfg, s.name)
        lines = [f"# {line}" for line in s.meta.help.splitlines()]
        if value is None:
            lines.append(f"# {s.name} = (unset)")
        elif s.meta.secret:
            lines.append(f'{s.name} = "<redacted>"')
        else:
            lines.append(f"{s.name} = {_toml_value(s.kind, value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _toml_item(item: object) -> str:
    """One array item: a string, or (for `Table` settings) an inline table of TOML values."""
    if isinstance(item, dict):
        fields = ", ".join(f"{_toml_key(str(k))} = {_toml_item(v)}" for k, v in item.items())
        return "{" + fields + "}"
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return repr(item)
    if isinstance(item, list):
        return "[" + ", ".join(_toml_item(v) for v in item) + "]"
    return _toml_str(str(item))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_value(kind: _Kind, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is _Kind.DURATION and isinstance(value, float):
        if value.is_integer():
            return _toml_str(format_duration(int(value)))
        return repr(float(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_item(item) for item in value) + "]"
    return _toml_str(str(value))


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
