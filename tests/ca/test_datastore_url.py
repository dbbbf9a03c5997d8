"""The datastore URL (`ca.datastore`): what is accepted, the one-line refusals, and no
password ever in what may be shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ca.datastore import DatastoreUrlError, parse, redact
from tally.ops.errors import OperatorError


def test_sqlite_and_postgresql_urls_are_read():
    sq = parse("sqlite:///var/lib/tally/ca/ca.db")
    assert (sq.engine, sq.path) == ("sqlite", Path("/var/lib/tally/ca/ca.db"))
    pg = parse("postgresql://tally@db.internal:5433/tally?sslmode=verify-full")
    assert pg.engine == "postgresql" and pg.path is None
    assert parse("postgres://tally@/tally?host=/run/postgresql").engine == "postgresql"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "empty"),
        ("ca.db", "not a URL"),
        ("mysql://root@db/tally", "unknown engine 'mysql'"),
        ("sqlite://relative/ca.db", "absolute path"),
        ("sqlite:///var/lib/../ca.db", "without '..'"),
        ("postgresql://tally@db.internal", "names no database"),
        ("postgresql://tally@db.internal/tally?nonsense=1", "not a valid PostgreSQL URL"),
    ],
)
def test_an_unusable_url_is_one_operator_line(url: str, words: str):
    with pytest.raises(DatastoreUrlError, match=words) as info:
        parse(url)
    assert isinstance(info.value, OperatorError) and "\n" not in str(info.value)


def test_passwords_are_never_shown():
    url = "postgresql://tally:hunter2@db/tally?sslpassword=s3cret&sslmode=require"
    shown = parse(url).shown
    assert "hunter2" not in shown and "s3cret" not in shown
    assert shown.startswith("postgresql://tally:***@db/tally?")
    assert "hunter2" not in repr(parse(url))
    with pytest.raises(DatastoreUrlError) as info:
        parse("postgresql://tally:hunter2@db/tally?bogus=1")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in redact("postgresql://u:hunter2@db/x?password=hunter2")


SECRET = st.text(st.characters(codec="ascii", exclude_characters="@/?#:&=%\x00"), min_size=6)


# A user name without the characters that end the authority: with one (``///:secret@``)
# the "secret" is part of the path, a database name, and no password at all.
USER = st.text(st.characters(exclude_characters="@/?#"), max_size=20)


@given(
    st.sampled_from(["postgresql", "postgres", "sqlite", "mysql", "PostgreSQL"]),
    USER,
    SECRET,
    st.text(max_size=30),
)
@example("postgresql", "", "000000", "?")  # "??password=": the key read as "?password"
def test_any_url_parses_or_is_refused_without_showing_its_password(scheme, user, secret, rest):
    for url in (f"{scheme}://{user}:{secret}@{rest}", f"{scheme}://{rest}?password={secret}"):
        try:
            parsed = parse(url)
        except DatastoreUrlError as exc:
            message = str(exc)
        else:
            message = parsed.shown + repr(parsed)
        assert secret not in message or secret in url.replace(secret, "", 1)
