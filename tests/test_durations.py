import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.ops.durations import MAX_SECONDS, DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        ("0", 0),
        ("0s", 0),
        ("3600", 3600),
        ("90m", 5400),
        ("007s", 7),
    ],
)
def test_accepts(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\t\n",
        "-1",
        "-5s",
        "+5s",
        "1.5h",
        "1.5",
        "5 s",
        " 5s",
        "5s ",
        "5s\n",
        "1w",
        "1y",
        "1ms",
        "5S",
        "h",
        "s1",
        "30m1h",  # units largest first
        "1h1h",
        "1e3",
        "٣s",  # a non-ASCII digit
        "36526d",  # more than 100 years
        "9" * 100,
    ],
)
def test_rejects(text):
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert repr(text[:64]) in str(info.value)


def test_limit_is_exactly_100_years():
    assert parse_duration(f"{MAX_SECONDS}") == MAX_SECONDS
    with pytest.raises(DurationError, match="100 years"):
        parse_duration(f"{MAX_SECONDS + 1}")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (60, "1m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (86400, "1d"),
        (90061, "1d1h1m1s"),
    ],
)
def test_format(seconds, text):
    assert format_duration(seconds) == text


def test_format_rejects_negative():
    with pytest.raises(DurationError):
        format_duration(-1)


@given(st.integers(0, MAX_SECONDS))
def test_format_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.text(max_size=80))
def test_garbage_raises_only_duration_error(text):
    try:
        seconds = parse_duration(text)
    except DurationError:
        return
    assert 0 <= seconds <= MAX_SECONDS
    assert text.isascii() and text.strip() == text
