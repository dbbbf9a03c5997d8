"""proxy.xfcc: the writer can never inject a pair or an element."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import xfcc

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@given(printable, st.binary(max_size=64), printable)
def test_proxy_element_round_trips_as_exactly_three_pairs(by, der, uri):
    header = xfcc.proxy_element(by, der, uri)
    assert xfcc.parse(header) == [
        [("By", by), ("Hash", hashlib.sha256(der).hexdigest()), ("URI", uri)]
    ]


@given(printable)
def test_quoted_values_round_trip(value):
    assert xfcc.parse("k=" + xfcc.quote_value(value)) == [[("k", value)]]


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["By", "URI", "x-1"]), printable), min_size=1, max_size=3
        ),
        min_size=1,
        max_size=3,
    )
)
def test_elements_join_and_parse_back(elements):
    header = ",".join(xfcc.element(pairs) for pairs in elements)
    assert xfcc.parse(header) == [list(pairs) for pairs in elements]


@given(st.text(max_size=80))
def test_garbage_raises_only_xfcc_error(text):
    try:
        result = xfcc.parse(text)
    except xfcc.XfccError:
        return
    assert result and all(result)


def test_envoy_example_parses():
    header = 'By=spiffe://example.org/api;Hash=abc;Subject="";URI=spiffe://example.org/web'
    assert xfcc.parse(header) == [
        [
            ("By", "spiffe://example.org/api"),
            ("Hash", "abc"),
            ("Subject", ""),
            ("URI", "spiffe://example.org/web"),
        ]
    ]


def test_plain_spiffe_ids_are_not_quoted():
    header = xfcc.proxy_element("spiffe://example.org/api", b"x", "spiffe://example.org/web")
    assert header == (
        "By=spiffe://example.org/api;Hash="
        + hashlib.sha256(b"x").hexdigest()
        + ";URI=spiffe://example.org/web"
    )


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("a,b", '"a,b"'),
        ("a;URI=evil", '"a;URI=evil"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("ends\\", '"ends\\\\"'),
        (" pad", '" pad"'),
        ("", '""'),
    ],
)
def test_quoting_rules(value, written):
    assert xfcc.quote_value(value) == written


@pytest.mark.parametrize("value", ["line\r\nX-Evil: 1", "nul\x00", "caf\u00e9"])
def test_unprintable_values_are_refused(value):
    with pytest.raises(xfcc.XfccError, match="not printable ASCII"):
        xfcc.quote_value(value)
