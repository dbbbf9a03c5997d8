"""Logs: one JSON object per line on stderr, named events, no secrets.

Rules:

1. Every line is one JSON object: ``ts`` (RFC 3339, UTC, milliseconds),
   ``level``, ``logger``, ``event`` (a dotted name such as ``svid.issued``,
   ``rotation.failed``, ``peer.denied``), then the caller's fields. Machines
   read these lines (the demo and the end-to-end tests wait on events), so a
   line that is not JSON is a bug: non-serialisable values fall back to
   ``str()``, non-finite floats become strings, and the output is ASCII so no
   terminal encoding can break it.
2. An exception becomes an ``error`` field, ``"Type: message"``. Only when
   logging at debug level is a ``traceback`` field added, as a string inside
   the JSON; a raw multi-line traceback never reaches stderr, because an
   operator reads a traceback as "the program crashed".
3. No secret in any log line, ever. Logs are shipped, indexed and kept far
   longer and more widely readable than the key files, so a private key or
   join token written once is leaked. Fields named like secrets
   (`SECRET_FIELDS`) and any string that looks like PEM private key material
   or holds a JWT (a bearer credential: ``eyJ...`` header and claims) are
   replaced by ``"<redacted>"``, at any depth, whatever the caller passed.
   This is a safety net, not a licence: callers still should not pass
   secrets.
4. Logging never raises into the caller: a broken stderr loses the line,
   not the daemon.
5. A line is written and flushed when it is logged, except a *held* line
   (`EventLogger.info_held`, HTTP mode's line per request), whose own write
   would cost as much as the line.  Held lines wait, in order, until the next
   line that is not held, `HELD_MAX` of them, or `flush_held` (the proxy calls
   it every `HELD_FLUSH_S`), whichever comes first; a normal exit writes them
   too (``logging.shutdown``).  So no line is ever written out of order, and
   what a SIGKILL can lose is at most `HELD_FLUSH_S` of request lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import IO, Any, Final

SECRET_FIELDS: Final = frozenset(
    {"token", "join_token", "key", "private_key", "secret", "password"}
)
REDACTED: Final = "<redacted>"
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_EVENT_ATTR = "tally_event"
_FIELDS_ATTR = "tally_fields"
_HELD_ATTR = "tally_held"
HELD_MAX: Final = 256
"""Held lines written together at most (rule 5)."""
HELD_FLUSH_S: Final = 0.25
"""How often a daemon that holds lines writes them (rule 5): Envoy's access log waits 1 s."""
_CORE_KEYS = ("ts", "level", "logger", "event")
_MAX_DEPTH = 8


class LogLevelError(ValueError):
    """A log level name that is not one of `LEVELS`."""


def _looks_like_private_key(text: str) -> bool:
    # Deliberately loose (no check that the block is complete or well formed):
    # a truncated or mangled key is still a leaked key.
    return "-----BEGIN" in text and "PRIVATE KEY" in text


# A JWS in compact form: base64url of a JSON header and of JSON claims ('{"' encodes
# as "eyJ"), then a signature.  Loose on purpose, like the key check above.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")


def _scrub(text: str) -> str:
    jwt = "eyJ" in text and _JWT.search(text)  # the plain check first: a call saved per string
    return REDACTED if _looks_like_private_key(text) or jwt else text


def _error_text(exc: BaseException) -> str:
    message = str(exc)
    return _scrub(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _clean(value: object, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with secrets redacted."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, BaseException):
        return _error_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return _clean_fields(value, depth + 1)
    if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, depth + 1) for item in value]
    try:
        return _scrub(str(value))
    except Exception:  # a broken __str__ must not cost the whole line
        return f"<unprintable {type(value).__name__}>"


def _clean_fields(fields: Mapping[Any, object], depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        key = str(name)
        if not key.isidentifier():  # an identifier holds neither a PEM block nor a JWT
            key = _scrub(key)
        out[key] = REDACTED if key.lower() in SECRET_FIELDS else _clean(value, depth)
    return out


def clean_fields(fields: Mapping[str, object]) -> dict[str, Any]:
    """A log line's fields as they would be written: JSON-ready, secrets redacted (rule 3).

    Remediation hooks send exactly this, so a hook never carries more than the log.
    """
    return _clean_fields(fields)


def event_of(record: logging.LogRecord) -> tuple[str, Mapping[str, object]] | None:
    """The event name and fields of a record made by `EventLogger`, else None."""
    event = getattr(record, _EVENT_ATTR, None)
    if event is None:
        return None
    return str(event), getattr(record, _FIELDS_ATTR, {})


def timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds, as in every log line."""
    return _timestamp(created)


_second: tuple[datetime | None, str] = (None, "")
"""The last whole second rendered, and its text: lines come many to a second.  One
tuple, read once per line, so threads that log at once never mix two seconds."""


def _timestamp(created: float) -> str:
    global _second
    t = datetime.fromtimestamp(created, tz=UTC)
    whole = t.replace(microsecond=0)
    second = _second
    if second[0] != whole:
        second = _second = (whole, f"{t:%Y-%m-%dT%H:%M:%S}")
    return f"{second[1]}.{t.microsecond // 1000:03d}Z"


_ENCODER = json.JSONEncoder(ensure_ascii=True, allow_nan=False, check_circular=False)
"""One encoder for every line (``json.dumps`` with these options builds one per call);
no circular check, since `_clean` builds a fresh tree of bounded depth."""


class JsonFormatter(logging.Formatter):
    """Renders records from `EventLogger` and from any stdlib logger alike."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT_ATTR, None)
        fields: Mapping[str, object] = getattr(record, _FIELDS_ATTR, {})
        if event is None:  # a record from a stdlib logger (a library, or our own code)
            event = "log"
            fields = {"message": self._message(record)}
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _scrub(str(event)),
        }
        for key, value in _clean_fields(fields).items():
            line[f"{key}_" if key in _CORE_KEYS else key] = value
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and "error" not in line:
            line["error"] = _error_text(exc)
        if exc is None:
            exc = next((v for v in fields.values() if isinstance(v, BaseException)), None)
        if self.tracebacks and exc is not None:
            line["traceback"] = _scrub("".join(traceback.format_exception(exc)))
        return _ENCODER.encode(line)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:  # bad %-arguments from a library; keep the template
            return str(record.msg)


class _TallyHandler(logging.Handler):
    """Writes formatted lines; ``stream=None`` means whatever sys.stderr is at the time."""

    def __init__(self, stream: IO[str] | None) -> None:
        super().__init__()
        self.stream = stream
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if getattr(record, _HELD_ATTR, False):  # rule 5
                self._held.append(line)
                if len(self._held) < HELD_MAX:
                    return
                line = ""
            self._write(line)
        except Exception:  # rule 4: stderr is gone or broken; there is nowhere to report it
            return

    def _write(self, line: str) -> None:
        """The held lines, then ``line``, in one write (called under the handler's lock)."""
        held, self._held = self._held, []
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write("".join(held) + line if held else line)
        stream.flush()

    def flush(self) -> None:
        """Write the held lines now (`flush_held`, and ``logging.shutdown`` at exit)."""
        with self.lock or contextlib.nullcontext():
            if self._held:
                try:
                    self._write("")
                except Exception:  # rule 4
                    return


def flush_held() -> None:
    """Write every held line now (rule 5); a daemon that holds lines calls it every
    `HELD_FLUSH_S`."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _TallyHandler):
            handler.flush()


def setup_logging(level: str = "info", *, stream: IO[str] | None = None) -> None:
    """Send every log record, ours and libraries', to ``stream`` as JSON lines.

    Calling it again replaces the previous setup (level and stream) rather
    than adding a second handler, so a reload or a test can call it freely.
    """
    number = LEVELS.get(level)
    if number is None:
        raise LogLevelError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TallyHandler)]:
        old.flush()  # its held lines, to the stream they were meant for
        root.removeHandler(old)
    handler = _TallyHandler(stream)
    handler.setLevel(number)  # also holds back loggers that set a lower level of their own
    handler.setFormatter(JsonFormatter(tracebacks=number <= logging.DEBUG))
    root.addHandler(handler)
    root.setLevel(number)


class EventLogger:
    """A logger that takes an event name and keyword fields instead of a message."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def debug(self, event: str, **fields: object) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self._log(logging.INFO, event, fields)

    def info_held(self, event: str, **fields: object) -> None:
        """An info line that may wait for the next write (rule 5): for a line per request."""
        self._log(logging.INFO, event, fields, held=True)

    def warning(self, event: str, **fields: object) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self._log(logging.ERROR, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, object], held: bool = False) -> None:
        logger = self.logger
        if logger.isEnabledFor(level):
            # The record is made here rather than by ``Logger.log``, which would first
            # walk the stack for the caller's file and line: no line shows them, and an
            # HTTP-mode proxy writes a line per request.
            extra = {_EVENT_ATTR: event, _FIELDS_ATTR: fields, _HELD_ATTR: held}
            logger.handle(
                logger.makeRecord(logger.name, level, "", 0, "%s", (event,), None, extra=extra)
            )


def get_logger(name: str) -> EventLogger:
    """``name`` is dotted by component, e.g. ``tally.ca`` or ``tally.agent.rotation``."""
    return EventLogger(logging.getLogger(name))
