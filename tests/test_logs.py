import io
import json
import logging
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.ops.logs import (
    HELD_MAX,
    REDACTED,
    SECRET_FIELDS,
    JsonFormatter,
    LogLevelError,
    flush_held,
    get_logger,
    setup_logging,
    timestamp,
)

log = get_logger("tally.test")


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(level="info"):
    stream = io.StringIO()
    setup_logging(level, stream=stream)
    return stream


def lines(stream):
    text = stream.getvalue()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line_with_core_fields():
    stream = capture()
    log.info("svid.issued", spiffe_id="spiffe://example.org/web", serial=17, ttl=3600.0)
    log.warning("peer.denied", reason="no matching entry")
    first, second = lines(stream)
    assert list(first)[:4] == ["ts", "level", "logger", "event"]
    assert first == {
        "ts": first["ts"],
        "level": "info",
        "logger": "tally.test",
        "event": "svid.issued",
        "spiffe_id": "spiffe://example.org/web",
        "serial": 17,
        "ttl": 3600.0,
    }
    assert (second["level"], second["event"]) == ("warning", "peer.denied")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])


def test_timestamp_is_utc_with_milliseconds():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC).timestamp()
    line = json.loads(JsonFormatter(tracebacks=False).format(record))
    assert line["ts"] == "2026-11-29T01:02:03.456Z"


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=30))
def test_timestamps_in_any_order_read_as_their_own_instant(instants):
    """The text of the last second is reused (`logs._timestamp`): lines many to a second,
    one second apart, out of order or years apart, each still shows its own instant."""
    nearby = [instants[0] + d for d in (0.0004, 0.9996, 1.0, 59.9999)]
    for created in [*instants, *nearby, *reversed(instants)]:
        t = datetime.fromtimestamp(created, tz=UTC)
        assert timestamp(created) == f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"


def test_secret_shaped_field_names_are_redacted_too():
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2ln"
    stream = capture()
    log.info("x", **{PEM: 1, f"a {jwt}": 2, "plain_name": jwt})
    (line,) = lines(stream)
    assert line["plain_name"] == REDACTED and line[REDACTED] in (1, 2)
    assert "PRIVATE KEY" not in stream.getvalue() and "eyJzdWIi" not in stream.getvalue()


def test_held_lines_wait_for_the_next_line_in_order():
    stream = capture()
    log.info_held("http.request", n=1)
    log.info_held("http.request", n=2)
    assert stream.getvalue() == ""  # held (rule 5)
    log.warning("peer.denied")
    assert [(x["event"], x.get("n")) for x in lines(stream)] == [
        ("http.request", 1),
        ("http.request", 2),
        ("peer.denied", None),
    ]


def test_held_lines_are_written_by_flush_held_by_count_and_at_exit():
    stream = capture()
    log.info_held("http.request", n=0)
    flush_held()
    assert [x["n"] for x in lines(stream)] == [0]
    for n in range(1, HELD_MAX + 1):
        log.info_held("http.request", n=n)
    assert [x["n"] for x in lines(stream)] == list(range(HELD_MAX + 1))  # the last one filled it
    # A process that exits normally writes what it held (``logging.shutdown``).
    code = (
        "from tally.ops.logs import get_logger, setup_logging; setup_logging(); "
        "get_logger('t').info_held('http.request', n='last')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stderr)["n"] == "last"


def test_held_lines_go_to_their_stream_when_setup_replaces_it():
    first = capture()
    log.info_held("http.request", n=1)
    second = capture()
    log.info("next")
    assert [x["event"] for x in lines(first)] == ["http.request"]
    assert [x["event"] for x in lines(second)] == ["next"]


def test_unserialisable_and_awkward_values_still_make_json():
    class Odd:
        def __str__(self):
            return "odd!"

    class Broken:
        def __str__(self):
            raise RuntimeError("no")

    stream = capture()
    log.info(
        "x.y",
        path=Path("/run/x.sock"),
        odd=Odd(),
        broken=Broken(),
        nan=float("nan"),
        when=datetime(2026, 1, 2, tzinfo=UTC),
        nested={"a": (1, 2), 3: {"b"}},
        text="caf\u00e9\nline two",
        level="not the level",
    )
    raw = stream.getvalue()
    assert raw.isascii() and raw.count("\n") == 1
    (line,) = lines(stream)
    assert line["path"] == "/run/x.sock"
    assert line["odd"] == "odd!"
    assert line["broken"] == "<unprintable Broken>"
    assert line["nan"] == "nan"
    assert line["when"] == "2026-01-02T00:00:00+00:00"
    assert line["nested"] == {"a": [1, 2], "3": ["b"]}
    assert line["text"] == "caf\u00e9\nline two"
    assert (line["level"], line["level_"]) == ("info", "not the level")


@pytest.mark.parametrize("name", sorted(SECRET_FIELDS))
def test_secret_field_names_are_redacted(name):
    stream = capture()
    log.info("agent.attesting", **{name: "hunter2-very-secret"}, key_id="k1")
    (line,) = lines(stream)
    assert line[name] == REDACTED and line["key_id"] == "k1"
    assert "hunter2" not in stream.getvalue()


def test_secrets_nested_in_values_are_redacted():
    stream = capture()
    log.info("ca.request", body={"join_token": "abc123", "items": [{"password": "pw1"}]})
    (line,) = lines(stream)
    assert line["body"] == {"join_token": REDACTED, "items": [{"password": REDACTED}]}


PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"


def test_pem_private_key_values_are_redacted():
    stream = capture()
    log.info("key.loaded", blob=PEM, note=f"loaded {PEM}", cert="-----BEGIN CERTIFICATE-----")
    (line,) = lines(stream)
    assert (line["blob"], line["note"]) == (REDACTED, REDACTED)
    assert line["cert"] == "-----BEGIN CERTIFICATE-----"


pem_blocks = st.builds(
    lambda kind, body: (
        f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"
    ),
    st.sampled_from(["", "RSA ", "EC ", "ENCRYPTED ", "OPENSSH "]),
    st.from_regex(r"[A-Za-z0-9+/=\n]{8,80}", fullmatch=True),
)


@given(
    prefix=st.text(max_size=20),
    block=pem_blocks,
    suffix=st.text(max_size=20),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    how=st.sampled_from(["field", "nested", "list", "bytes", "error", "stdlib", "event"]),
)
def test_a_pem_private_key_is_never_emitted(prefix, block, suffix, name, how):
    text = prefix + block + suffix
    for level in ("info", "debug"):
        stream = capture(level)
        if how == "field":
            log.error("x", **{name: text})
        elif how == "nested":
            log.error("x", outer={name: {"deeper": text}})
        elif how == "list":
            log.error("x", items=[1, text])
        elif how == "bytes":
            log.error("x", **{name: text.encode()})
        elif how == "error":
            log.error("x", error=ValueError(text))
        elif how == "stdlib":
            logging.getLogger("lib").error("loaded %s", text)
        else:
            log.error(text)
        out = stream.getvalue()
        assert "PRIVATE KEY" not in out
        assert all(json.loads(line) for line in out.splitlines())


def boom():
    raise ValueError("bad thing happened")


def test_exception_field_without_traceback_at_info():
    stream = capture("info")
    try:
        boom()
    except ValueError as exc:
        log.error("rotation.failed", error=exc)
    (line,) = lines(stream)
    assert line["error"] == "ValueError: bad thing happened"
    assert "traceback" not in line
    assert "Traceback" not in stream.getvalue()


def test_exception_gets_a_traceback_string_at_debug():
    stream = capture("debug")
    try:
        boom()
    except ValueError as exc:
        log.error("rotation.failed", error=exc)
    (line,) = lines(stream)
    assert line["error"] == "ValueError: bad thing happened"
    assert line["traceback"].startswith("Traceback (most recent call last):")
    assert "in boom" in line["traceback"]
    assert len(stream.getvalue().splitlines()) == 1


def test_stdlib_exception_logging_is_rendered_too():
    stream = capture("info")
    try:
        boom()
    except ValueError:
        logging.getLogger("somelib").exception("failed %d times", 3)
    (line,) = lines(stream)
    assert line["event"] == "log" and line["logger"] == "somelib"
    assert line["message"] == "failed 3 times"
    assert line["error"] == "ValueError: bad thing happened"
    assert "traceback" not in line


def test_bad_stdlib_format_arguments_do_not_break_the_line():
    # Tested on the formatter alone: pytest's own capture handler re-raises this error.
    record = logging.LogRecord("somelib", logging.WARNING, __file__, 1, "%d apples", ("x",), None)
    line = json.loads(JsonFormatter(tracebacks=False).format(record))
    assert (line["event"], line["message"]) == ("log", "%d apples")


def test_level_filtering():
    stream = capture("warning")
    log.debug("a")
    log.info("b")
    log.warning("c")
    log.error("d")
    assert [line["event"] for line in lines(stream)] == ["c", "d"]
    stream = capture("debug")
    log.debug("e")
    assert [line["event"] for line in lines(stream)] == ["e"]


def test_a_logger_with_its_own_lower_level_is_still_filtered():
    noisy = logging.getLogger("noisy")
    noisy.setLevel(logging.DEBUG)
    try:
        stream = capture("info")
        noisy.debug("chatter")
        assert stream.getvalue() == ""
    finally:
        noisy.setLevel(logging.NOTSET)


def test_setup_is_idempotent_and_replaces_the_stream():
    root = logging.getLogger()
    first = capture()
    before = len(root.handlers)
    second = capture()
    assert len(root.handlers) == before
    log.info("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_setup_leaves_other_handlers_alone():
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    capture()
    capture()
    assert other in root.handlers


def test_unknown_level_is_refused():
    with pytest.raises(LogLevelError, match="unknown log level 'loud': expected one of debug"):
        setup_logging("loud")


def test_default_stream_is_stderr_at_the_time(monkeypatch):
    setup_logging("info")
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    log.info("to.stderr")
    assert json.loads(swapped.getvalue())["event"] == "to.stderr"


def test_a_broken_stream_does_not_raise_or_print(capsys):
    stream = capture()
    stream.close()
    log.error("lost")
    assert capsys.readouterr() == ("", "")


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=32, max_size=32))
def test_the_suite_wide_leak_guard_knows_a_token_and_a_key_when_it_sees_one(raw_id, raw_secret):
    """tests/conftest.py fails the run if any daemon logs a line of these shapes."""
    import base64

    from tally.app.launch import SECRET_SHAPE
    from tally.spiffe import pem, x509profile

    token_id = raw_id.hex()
    secret = base64.urlsafe_b64encode(raw_secret).rstrip(b"=").decode()
    assert SECRET_SHAPE.search(json.dumps({"event": "x", "token": f"{token_id}.{secret}"}))
    assert not SECRET_SHAPE.search(json.dumps({"event": "x", "token_id": token_id}))
    key = pem.key_to_pem(x509profile.generate_key()).decode()
    assert SECRET_SHAPE.search(json.dumps({"event": "x", "detail": key}))
