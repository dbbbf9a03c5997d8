"""Audit anchors: signatures only this CA's anchor key makes, files read or refused whole."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca.anchor import KEY_FILE, AnchorError, AnchorKey, anchor_from, parse_anchors
from ca.keys import CAKeyError

HEAD = "ab" * 32


@pytest.fixture
def key(tmp_path) -> AnchorKey:
    return AnchorKey.load_or_create(tmp_path)


def test_key_is_made_once_0600_and_kept(tmp_path, key):
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert AnchorKey.load_or_create(tmp_path).key_id == key.key_id


def test_loose_key_file_is_refused(tmp_path, key):
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(CAKeyError, match="chmod 600"):
        AnchorKey.load_or_create(tmp_path)


def test_own_anchor_verifies_and_every_edit_is_refused(tmp_path, key):
    anchor = key.sign("example.org", 7, HEAD, "2026-12-06T00:00:00Z")
    assert key.problem(anchor, "example.org") is None
    for edit in (
        {"seq": 8},
        {"hash": "cd" * 32},
        {"at": "2026-12-07T00:00:00Z"},
        {"signature": anchor.signature[:-4] + "AAA="},
        {"signature": "not base64!"},
    ):
        problem = key.problem(replace(anchor, **edit), "example.org")
        assert problem is not None and "bad signature" in problem, edit
    assert "trust domain other.org" in str(
        key.problem(replace(anchor, trust_domain="other.org"), "example.org")
    )
    (tmp_path / "other").mkdir()
    other = AnchorKey.load_or_create(tmp_path / "other")
    assert "not this CA's anchor key" in str(other.problem(anchor, "example.org"))


def test_a_file_reads_anchors_and_audit_anchor_log_lines(key):
    anchor = key.sign("example.org", 3, HEAD, "t")
    log_line = {
        "ts": "x",
        "level": "info",
        "event": "audit.anchor",
        "reason": "schedule",
        **anchor.to_json(),
    }
    text = json.dumps(anchor.to_json()) + "\n\n" + json.dumps(log_line) + "\n"
    assert parse_anchors(text) == [anchor, anchor]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no anchors in it"),
        ("[1]", "line 1: not a JSON object"),
        ("{", "line 1: not JSON"),
        ('{"event": "svid.issued"}', "not an audit.anchor one"),
    ],
)
def test_bad_files_are_named(text, words):
    with pytest.raises(AnchorError, match=words):
        parse_anchors(text)


@given(st.text(max_size=300))
def test_any_text_is_anchors_or_one_anchor_error(text):
    try:
        parse_anchors(text)
    except AnchorError:
        pass


@given(
    st.dictionaries(
        st.sampled_from(["trust_domain", "seq", "hash", "at", "key_id", "signature", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=70)),
    )
)
def test_any_object_is_an_anchor_or_one_anchor_error(obj):
    try:
        anchor = anchor_from(obj, "here")
    except AnchorError as exc:
        assert str(exc).startswith("here: ")
    else:
        assert anchor.seq >= 1 and len(anchor.hash) == 64
