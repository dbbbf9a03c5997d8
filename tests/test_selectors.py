import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.spiffe.selectors import MAX_VALUE_BYTES, Selector, SelectorError, matches


def sel(text):
    return Selector.parse(text)


def test_splits_at_first_colon():
    s = sel("unix:uid:1000")
    assert (s.type, s.value) == ("unix", "uid:1000")
    assert str(s) == "unix:uid:1000"
    assert sel("k8s:ns:payments:x") == Selector("k8s", "ns:payments:x")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix",
        ":uid",
        "unix:",
        "Unix:uid:1",
        "un ix:uid",
        "unix:uid:1\n",
        "unix:a\x00b",
        "unix:a\x7fb",
        "unix:a\u2028b",
        "unix:\ud800",
        "ünix:a",
        "a" * 65 + ":x",
        "unix:" + "x" * (MAX_VALUE_BYTES + 1),
        "unix:" + "é" * (MAX_VALUE_BYTES // 2 + 1),  # the limit is in UTF-8 bytes
    ],
)
def test_rejects(text):
    with pytest.raises(SelectorError) as info:
        sel(text)
    assert "invalid selector" in str(info.value)
    assert "\n" not in str(info.value)


def test_value_may_be_long_and_unicode():
    assert sel("docker:label:" + "x" * (MAX_VALUE_BYTES - len("label:"))).type == "docker"
    assert sel("k8s:pod-name:café").value == "pod-name:café"


def test_constructor_validates():
    with pytest.raises(SelectorError):
        Selector("unix", "")
    with pytest.raises(SelectorError):
        Selector("UNIX", "uid:1")


def test_order_and_equality():
    assert sorted([sel("unix:uid:2"), sel("k8s:ns:a"), sel("unix:uid:1")]) == [
        sel("k8s:ns:a"),
        sel("unix:uid:1"),
        sel("unix:uid:2"),
    ]
    assert len({sel("unix:uid:1"), sel("unix:uid:1")}) == 1


def test_matches_is_subset():
    caller = [sel("unix:uid:1000"), sel("unix:gid:1000"), sel("unix:path:/usr/bin/web")]
    assert matches([sel("unix:uid:1000")], caller)
    assert matches([sel("unix:uid:1000"), sel("unix:gid:1000")], caller)
    assert matches(caller, caller)
    assert not matches([sel("unix:uid:1000"), sel("unix:gid:0")], caller)
    assert not matches([sel("unix:uid:0")], caller)
    assert not matches([sel("unix:uid:1000")], [])


def test_empty_entry_never_matches():
    assert not matches([], [sel("unix:uid:0")])
    assert not matches([], [])
    assert not matches(iter(()), iter([sel("unix:uid:0")]))


def test_matches_accepts_one_shot_iterables():
    assert matches(iter([sel("unix:uid:1")]), iter([sel("unix:uid:1"), sel("unix:gid:1")]))


types = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)
values = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
)
selectors = st.builds(Selector, types, values)


@given(selectors)
def test_round_trip(selector):
    assert Selector.parse(str(selector)) == selector


@given(st.text())
def test_garbage_raises_only_selector_error(text):
    try:
        selector = Selector.parse(text)
    except SelectorError:
        return
    assert str(selector) == text
    assert selector.value and len(selector.value.encode()) <= MAX_VALUE_BYTES


@given(st.sets(selectors, max_size=5), st.sets(selectors, max_size=5))
def test_matches_property(entry, caller):
    assert matches(entry, caller) == (bool(entry) and entry <= caller)
    if entry:
        assert matches(entry, entry | caller)
