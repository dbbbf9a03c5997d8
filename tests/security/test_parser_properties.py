"""Every parser that reads outside input answers with its own error, never another one.

Rules / theory of operation: an exception a parser did not mean to raise is how
hostile input turns into a crash, a 500 with a traceback in the log, or a
refusal that names the wrong cause.  So each property feeds arbitrary (and
arbitrarily damaged real) input to the pure function a daemon calls, in
process, and allows exactly two outcomes: a value that is what it should be,
or the parser's own refusal.  Parsers whose properties already live next to
their unit tests (SPIFFE IDs, selectors, durations, bundles, the Sample config
schema, the gRPC framing round trip, XFCC on printable text, DER CSRs) are
not repeated here; this file adds what those leave out: the four real
settings schemas, the CA API's bodies and query parameters through its real
handlers, PEM CSRs, gRPC prefixes that lie, Workload API messages in both
directions, XFCC for any text and any client headers, and damaged key files.
The escapes these properties found (a 65-bit audit limit answered 500; damaged
certificates, keys and extensions in a Workload API response escaping the
client's own error; a key file of unknown type stopping a daemon with a
traceback) are fixed, and their examples stay here as plain tests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import string
from datetime import UTC, datetime
from itertools import count
from urllib.parse import urlencode

import h11
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.ca_client import make_csr
from agent.settings import AgentSettings
from agent.state import IDENTITY_FILE, StateError, load_identity
from agent.workload_messages import STREAMING_METHODS, SvidItem, X509Snapshot, x509_svid_response
from ca.api import AdminApi, AgentApi, AgentPeer
from ca.authority import Authority, EntrySpec, Limits
from ca.feed import ChangeFeed
from ca.keys import CAKeyError, KeyManager, load_private_key
from ca.schedule import Policy
from ca.settings import CASettings
from ca.store import Store
from proxy import xfcc
from proxy.http import request_headers
from proxy.settings import ClientSettings, ServerSettings
from tally.app.cli import build_parser
from tally.ops.config import ConfigError, describe, load
from tally.spiffe.pem import chain_to_pem
from tally.spiffe.selectors import Selector
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.spiffe.x509profile import ProfileError, csr_public_key, generate_key
from tally.wire import http, http1
from tally.wire import workload_pb as pb
from tally.wire.grpc import GrpcError, MessageDecoder, Status, encode_message
from tally.wire.workload_client import WorkloadApiError, parse_x509_svid_response
from tests import pki as proxy_pki

TD = TrustDomain.parse("example.org")
AGENT_ID = "spiffe://example.org/agent/node-1"

# -- shared strategies -----------------------------------------------------------------

# Text without lone surrogates: nothing can send those as UTF-8 in the first place.
any_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc), repr(str(exc))


# -- configs: the four real schemas ----------------------------------------------------------

ENDS = ["--listen", "127.0.0.1:1", "--target", "127.0.0.1:2", "--workload-socket", "/run/w.sock"]
# Each role with the fewest flags that start it; generated values are added after them.
ROLES = {
    "ca": (CASettings, ["ca", "run", "--trust-domain", "example.org"]),
    "agent": (
        AgentSettings,
        ["agent", "run", "--trust-domain", "example.org", "--server", "ca:8443"],
    ),
    "proxy server": (
        ServerSettings,
        ["proxy", "server", *ENDS, "--allow-trust-domain", "example.org"],
    ),
    "proxy client": (
        ClientSettings,
        ["proxy", "client", *ENDS, "--expect-id", "spiffe://example.org/web"],
    ),
}


def _toml_value(value: object) -> str:
    """TOML for a generated value (json.dumps strings are TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


# Setting values that are right, or nearly: they reach the checks after the type check.
near_text = st.sampled_from(
    [
        *("10m", "0s", "-1s", "1e400", "999d", "5", "-3", "", "a=b", "x.org=/b", "info"),
        *("unix:/x", "[::1]:0", "127.0.0.1:9", "/tmp/x", "example.org", "spiffe://example.org/a"),
    ]
)
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | any_text
    | near_text
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=2),
    max_leaves=6,
)


def _keys(schema: type) -> st.SearchStrategy[str]:
    return st.sampled_from([d.name for d in describe(schema)]) | any_text


def _load(role: str, extra: list[str]) -> object:
    schema, base = ROLES[role]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser(base[0]).parse_args([*base, *extra])
        except SystemExit:
            pytest.fail(f"the real parser refused {extra!r}: {err.getvalue()}")
    cfg: object = load(schema, args, env={})
    if isinstance(cfg, ServerSettings | ClientSettings):
        cfg.source({})  # the proxy's last startup check on its settings
    return cfg


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


@settings(max_examples=60)
@given(st.sampled_from(sorted(ROLES)), st.data())
def test_role_config_files_load_or_raise_only_config_error(config_dir, role, data):
    schema = ROLES[role][0]
    doc = data.draw(st.dictionaries(_keys(schema), toml_values, max_size=4), label="document")
    path = config_dir / "role.toml"
    text = "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in doc.items())
    path.write_text(text, encoding="utf-8")
    try:
        cfg = _load(role, ["--config", str(path)])
    except ConfigError as exc:
        one_line(exc)
        return
    assert isinstance(cfg, schema)


def _flags(schema: type) -> st.SearchStrategy[str]:
    words = []
    for d in describe(schema):
        if d.type == "boolean":
            words += [d.flag, "--no-" + d.flag.removeprefix("--")]
        else:
            words.append(d.flag + "=")
    return st.sampled_from(words)


@settings(max_examples=80)
@given(st.sampled_from(sorted(ROLES)), st.data())
def test_role_flags_load_or_raise_only_config_error(role, data):
    schema = ROLES[role][0]
    pairs = data.draw(
        st.lists(st.tuples(_flags(schema), any_text | near_text), max_size=4), label="flags"
    )
    argv = [flag + value if flag.endswith("=") else flag for flag, value in pairs]
    try:
        cfg = _load(role, argv)
    except ConfigError as exc:
        one_line(exc)
        return
    assert isinstance(cfg, schema)


# -- the CA API: bodies and query parameters through the real handlers -----------------------


class _CA:
    """An authority on a real store and real keys, behind the real API handlers."""

    def __init__(self, data_dir) -> None:
        clock = lambda: datetime.now(UTC)  # noqa: E731
        self.store = Store.open(data_dir / "ca.db")
        keys = KeyManager(self.store, data_dir, TD, Policy(86400, 10 * 365 * 86400, 3600), clock)
        keys.load()
        keys.tick()
        self.authority = a = Authority(self.store, keys, TD, Limits(3600, 86400, 3600, 600), clock)

        async def run(fn):
            return fn()

        async def keys_changed() -> None:
            return None

        self.agent_api = AgentApi(a, run, ChangeFeed(), ChangeFeed())
        self.admin_api = AdminApi(
            a, run, lambda agents, cause: None, keys_changed, lambda: {"status": "ok"}
        )
        token = a.create_token(SpiffeId.parse(AGENT_ID), None, "admin:uid=0").token
        issued = a.attest(token, make_csr(generate_key()), "10.0.0.1:1").svid
        self.agent = AgentPeer(SpiffeId.parse(AGENT_ID), issued.serial, "10.0.0.1:1")
        entry = a.create_entry(
            EntrySpec(
                SpiffeId.parse("spiffe://example.org/web"),
                SpiffeId.parse(AGENT_ID),
                (Selector.parse("unix:uid:1000"),),
            ),
            "admin:uid=0",
        )
        self.entry_id = entry.id
        # A live token the attestation property must never spend with a bad CSR.
        spare_id = SpiffeId.parse("spiffe://example.org/agent/spare")
        spare = a.create_token(spare_id, None, "admin:uid=0")
        self.spare_token, self.spare_id = spare.token, spare.token_id
        self.csr = make_csr(generate_key())
        self._peers = count(2)  # 10.0.0.1 is the agent's

    def fresh_peer(self) -> AgentPeer:
        """A new address per example, so the attestation throttle never answers for the parser."""
        n = next(self._peers)
        return AgentPeer(None, None, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}:4000")

    def admin(self, method: str, target: str, body: bytes = b"") -> http.Response:
        return trio.run(self.admin_api.handle, 0, http.Request(method, target, (), body))

    def as_agent(self, peer: AgentPeer, method: str, target: str, body: bytes = b""):
        return trio.run(self.agent_api.handle, peer, http.Request(method, target, (), body))


@pytest.fixture(scope="module")
def ca_api(tmp_path_factory):
    server = _CA(tmp_path_factory.mktemp("ca"))
    yield server
    server.store.close()


def refusal_or(response: http.Response, ok: set[int], refusals: set[int]) -> dict:
    """The response is a success we expect or one of our JSON refusals, never a 5xx."""
    assert response.status in ok | refusals, (response.status, response.body[:300])
    doc = json.loads(response.body)
    if response.status in refusals:
        assert isinstance(doc.get("code"), str) and isinstance(doc.get("error"), str), doc
        assert "\n" not in doc["error"] and "Traceback" not in doc["error"]
    return doc


IDS = [
    "spiffe://example.org/x",
    "spiffe://example.org/agent/other",
    "spiffe://other.org/x",
    "spiffe://example.org",
    "spiffe://EXAMPLE.org/x",
    "spiffe://example.org/a/../b",
    "spiffe://example.org/x?q",
    "",
]
# Values that look right, or nearly, per field: they get past the first checks.
NEAR_MISSES: dict[str, list[object]] = {
    "spiffe_id": [*IDS],
    "parent_id": [*IDS, AGENT_ID],
    "selectors": [["unix:uid:0"], ["unix:uid:0", "x"], ["nocolon"], [], ["unix:uid:0", 1]],
    "ttl": [3600, 0, -1, 10**30, True, 1.5, None, "1h"],
    "dns_names": [["a.example.org"], ["*.example.org", "UPPER.example.org"], ["a..b"], "x"],
    "hint": ["x" * 2000, "a\nb", "fine", None, 5],
    "token": ["0123456789abcdef." + "A" * 43, "x.y", ""],
}


def _bodies(fields: list[str], near: dict[str, list[object]]) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON value, and objects with some or all of the real field names."""
    values = {f: st.sampled_from(near.get(f, [None])) | json_values for f in fields}
    return st.one_of(
        st.binary(max_size=80),
        json_values,
        st.fixed_dictionaries({}, optional=values),
        st.fixed_dictionaries(values),
    ).map(lambda v: v if isinstance(v, bytes) else json.dumps(v).encode())


ADMIN_BODY_ROUTES = [
    ("POST", "/v1/tokens", ["spiffe_id", "ttl"]),
    ("POST", "/v1/entries", ["spiffe_id", "parent_id", "selectors", "ttl", "dns_names", "hint"]),
    ("PATCH", "/v1/entries/{entry}", ["spiffe_id", "selectors", "ttl", "dns_names", "hint"]),
    ("POST", "/v1/x509/mint", ["spiffe_id", "ttl", "dns_names"]),
    # Never the fixture's own agent: the agent-door properties need it active.
    ("POST", "/v1/agents/evict", ["spiffe_id"]),
    ("POST", "/v1/agents/ban", ["spiffe_id"]),
]


@settings(max_examples=150)
@given(st.data())
def test_admin_bodies_give_a_result_or_our_refusal(ca_api, data):
    method, path, fields = data.draw(st.sampled_from(ADMIN_BODY_ROUTES), label="route")
    body = data.draw(_bodies(fields, NEAR_MISSES), label="body")
    target = path.format(entry=ca_api.entry_id)
    refusal_or(ca_api.admin(method, target, body), {200, 201}, {400, 404, 409})


@settings(max_examples=100)
@given(_bodies(["token", "csr"], NEAR_MISSES))
def test_attest_bodies_from_strangers_give_only_our_refusal(ca_api, body):
    refusal_or(ca_api.as_agent(ca_api.fresh_peer(), "POST", "/v1/attest", body), set(), {400, 403})


@settings(max_examples=60)
@given(json_values | st.binary(max_size=80).map(lambda b: b.decode("latin-1")))
@example("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
def test_a_live_token_with_a_bad_csr_is_refused_and_not_spent(ca_api, csr):
    body = json.dumps({"token": ca_api.spare_token, "csr": csr}).encode()
    doc = refusal_or(ca_api.as_agent(ca_api.fresh_peer(), "POST", "/v1/attest", body), set(), {400})
    assert doc["code"] == "bad_csr"
    assert ca_api.store.get_token(ca_api.spare_id).used_at is None


def _csr_items(entry_id: str, csr: str) -> st.SearchStrategy[object]:
    item = st.fixed_dictionaries(
        {},
        optional={
            "entry_id": st.sampled_from([entry_id, "nope", 5]) | json_values,
            "csr": st.sampled_from([csr, csr[:-40], csr.replace("M", "N", 3)]) | json_values,
        },
    )
    return st.lists(item | json_values, max_size=3) | json_values


@settings(max_examples=100)
@given(st.data())
def test_agent_bodies_give_a_result_or_our_refusal(ca_api, data):
    if data.draw(st.booleans(), label="renew"):
        near = {
            "csr": [
                ca_api.csr[:-40],
                "",
                ca_api.csr.encode().hex(),
                ca_api.csr.replace("M", "N", 3),
            ]
        }
        body = data.draw(_bodies(["csr"], near), label="body")
        refusal_or(ca_api.as_agent(ca_api.agent, "POST", "/v1/agent/renew", body), set(), {400})
        return
    csrs = data.draw(_csr_items(ca_api.entry_id, ca_api.csr), label="csrs")
    body = json.dumps({"csrs": csrs}).encode()
    doc = refusal_or(ca_api.as_agent(ca_api.agent, "POST", "/v1/svids", body), {200}, {400})
    for result in doc.get("svids", []):
        assert ("error" in result) != ("cert_chain" in result), result


query_text = any_text | st.sampled_from(["1e999", "nan", "-inf", "9" * 30, "-9" * 20, "0x10"])


def _q(**params: object) -> str:
    return urlencode(params)


@settings(max_examples=120)
@given(st.data())
def test_query_parameters_give_a_result_or_our_refusal(ca_api, data):
    value = data.draw(query_text, label="value")
    # Each wait is paired with a sequence that has already changed, so no call blocks.
    method, target, door = data.draw(
        st.sampled_from(
            [
                ("GET", f"/v1/audit?{_q(limit=value)}", "admin"),
                ("GET", f"/v1/audit?{_q(since=value, spiffe_id=value, event=value)}", "admin"),
                ("GET", f"/v1/entries?{_q(spiffe_id=value, parent_id=value)}", "admin"),
                ("GET", f"/v1/agents/show?{_q(spiffe_id=value)}", "admin"),
                ("GET", f"/v1/bundle?{_q(format=value)}", "admin"),
                ("GET", f"/v1/bundle?{_q(since=value)}", "stranger"),
                ("GET", f"/v1/bundle?{_q(since=-1, wait=value)}", "stranger"),
                ("GET", f"/v1/entries?{_q(since=value)}", "agent"),
            ]
        ),
        label="call",
    )
    if door == "admin":
        response = ca_api.admin(method, target)
    else:
        peer = ca_api.agent if door == "agent" else ca_api.fresh_peer()
        response = ca_api.as_agent(peer, method, target)
    refusal_or(response, {200}, {400, 404})


def test_an_audit_limit_beyond_64_bits_is_refused(ca_api):
    refusal_or(ca_api.admin("GET", "/v1/audit?limit=9223372036854775808"), {200}, {400})


# -- CSRs in PEM (DER garbage and DER bit flips: tests/test_x509profile.py) -------------------

CSR_KEY = generate_key()
CSR_PEM = make_csr(CSR_KEY)
_B64 = string.ascii_letters + string.digits + "+/="


def _own_key(public_key: object) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return public_key.public_bytes(der, spki) == CSR_KEY.public_key().public_bytes(der, spki)  # type: ignore[attr-defined]


@given(st.integers(0, len(CSR_PEM) - 1), st.sampled_from(_B64 + "\n -!\x00é"))
def test_mutated_pem_csr_is_refused_or_still_proves_the_same_key(position, char):
    data = (CSR_PEM[:position] + char + CSR_PEM[position + 1 :]).encode()
    try:
        key = csr_public_key(data)
    except ProfileError as exc:
        assert exc.reason == "bad_csr"
        one_line(exc)
        return
    assert _own_key(key)  # a CSR that still parses can only be proving the original key


@given(st.integers(0, len(CSR_PEM)), st.binary(max_size=40))
def test_cut_or_padded_pem_csr_is_refused_or_still_proves_the_same_key(cut, tail):
    try:
        key = csr_public_key(CSR_PEM.encode()[:cut] + tail)
    except ProfileError as exc:
        assert exc.reason == "bad_csr"
        return
    assert _own_key(key)


# -- gRPC length prefixes that lie (round trip and garbage: tests/test_grpc.py) ----------------


@given(st.integers(0, 2**16), st.integers(1, 2**32 - 1), st.binary(max_size=20))
def test_an_announced_oversize_is_refused_before_the_body_arrives(limit, extra, sent):
    length = min(limit + extra, 2**32 - 1)
    decoder = MessageDecoder(max_message_size=limit)
    decoder.receive_data(b"\x00" + length.to_bytes(4, "big") + sent)
    with pytest.raises(GrpcError) as info:
        decoder.next_message()
    assert info.value.status is Status.RESOURCE_EXHAUSTED


@given(st.lists(st.binary(max_size=50), min_size=1, max_size=4), st.data())
def test_a_stream_cut_inside_a_message_is_reported_and_whole_ones_survive(payloads, data):
    frames = [encode_message(p) for p in payloads]
    wire = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    cut = data.draw(st.integers(0, len(wire) - 1).filter(lambda c: c not in boundaries))
    decoder = MessageDecoder()
    decoder.receive_data(wire[:cut])
    got = []
    while (message := decoder.next_message()) is not None:
        got.append(message)
    assert got == payloads[: len(got)]
    with pytest.raises(GrpcError) as info:
        decoder.end_of_stream()
    assert info.value.status is Status.INTERNAL


# -- Workload API messages, both directions --------------------------------------------------


@given(st.sampled_from(sorted(STREAMING_METHODS)), st.binary(max_size=200))
def test_request_messages_parse_or_raise_only_decode_error(method, payload):
    """The server turns DecodeError, and only that, into INTERNAL for the call."""
    with contextlib.suppress(pb.DecodeError):
        STREAMING_METHODS[method].parse_request(payload)


def _real_response() -> bytes:
    pki = proxy_pki.Authority.create("example.org")
    svid = pki.svid("spiffe://example.org/web")
    der = serialization.Encoding.DER
    key = svid.key.private_bytes(
        der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    item = SvidItem(
        "spiffe://example.org/web",
        b"".join(c.public_bytes(der) for c in svid.chain),
        key,
        pki.root.public_bytes(der),
        hint="h",
    )
    return x509_svid_response(X509Snapshot((item,), {"spiffe://example.org": item.bundle_der}))


REAL_RESPONSE = _real_response()


# A damaged serial can come out non-positive: cryptography warns (an error under this
# suite's filterwarnings) where a running daemon only warns, so the warning is let be.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@given(st.integers(0, len(REAL_RESPONSE) - 1), st.integers(1, 255), st.booleans())
def test_damaged_svid_responses_raise_only_our_error(position, flip, cut):
    data = bytearray(REAL_RESPONSE)
    if cut:
        data = data[:position]
    else:
        data[position] ^= flip
    try:
        context = parse_x509_svid_response(bytes(data))
    except WorkloadApiError as exc:
        assert exc.status is Status.INTERNAL
        return
    for svid in context.svids:  # whatever survived still names the ID its leaf carries
        assert svid.spiffe_id.startswith("spiffe://") and svid.chain


def _damage(part: str, message: pb.X509SVIDResponse) -> None:
    svid = message.svids[0]
    if part == "key type":
        key = bytearray(svid.x509_svid_key)
        key[10] ^= 1  # the key-type OID of a P-256 PKCS#8 key: 1.2.840... -> 1.3.840...
        svid.x509_svid_key = bytes(key)
    elif part == "version":
        chain = bytearray(svid.x509_svid)
        assert chain[8:13] == b"\xa0\x03\x02\x01\x02"  # [0] INTEGER 2: version 3
        chain[12] = 3
        svid.x509_svid = bytes(chain)
    else:  # keyUsage renamed basicConstraints: the same extension twice
        svid.x509_svid = svid.x509_svid.replace(b"\x06\x03\x55\x1d\x0f", b"\x06\x03\x55\x1d\x13", 1)


@pytest.mark.parametrize(
    "part",
    [
        "key type",  # load_der_private_key: UnsupportedAlgorithm
        "version",  # load_der_x509_certificate: InvalidVersion
        "extensions",  # cert.extensions: DuplicateExtension
    ],
)
def test_damaged_svid_parts_are_our_error(part):
    message = pb.X509SVIDResponse.FromString(REAL_RESPONSE)
    _damage(part, message)
    with pytest.raises(WorkloadApiError) as info:
        parse_x509_svid_response(message.SerializeToString())
    assert info.value.status is Status.INTERNAL


# -- key files: an operator's damaged file is a one-line error -----------------------------


def _damaged_key_pem() -> bytes:
    der = bytearray(
        CSR_KEY.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der[10] ^= 1  # the key-type OID, as in test_damaged_svid_parts_are_our_error
    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----\n"


def _load_ca_key(directory):
    path = directory / "key.pem"
    _write_0600(path, _damaged_key_pem())
    with pytest.raises(CAKeyError) as info:
        load_private_key(path)
    return info.value


def _load_agent_identity(directory):
    svid = proxy_pki.Authority.create("example.org").svid("spiffe://example.org/agent/n")
    _write_0600(directory / IDENTITY_FILE, _damaged_key_pem() + chain_to_pem(svid.chain))
    with pytest.raises(StateError) as info:
        load_identity(directory)
    return info.value


def _write_0600(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(
            _load_ca_key,
            id="ca-key",
        ),
        pytest.param(
            _load_agent_identity,
            id="agent-identity",
        ),
    ],
)
def test_a_key_file_of_unknown_key_type_is_a_one_line_error(tmp_path, load):
    exc = load(tmp_path)
    one_line(exc)
    assert str(tmp_path) in str(exc)


# -- XFCC: any text, any client headers (printable text: tests/proxy/test_xfcc.py) -----------

everything = st.text(max_size=40)


@given(everything, st.binary(max_size=32), everything)
@example("spiffe://example.org/a\r\nX-Evil: 1", b"", "spiffe://example.org/b")
@example("spiffe://example.org/a", b"", 'x";URI=spiffe://example.org/admin,By="y')
def test_the_xfcc_writer_refuses_or_writes_exactly_three_pairs(by, der, uri):
    try:
        header = xfcc.proxy_element(by, der, uri)
    except xfcc.XfccError as exc:
        one_line(exc)
        assert any(not " " <= ch <= "~" for ch in by + uri)
        return
    assert all(" " <= ch <= "~" for ch in header)  # no CR, LF, NUL or anything h11 refuses
    assert xfcc.parse(header) == [[("By", by), ("Hash", xfcc.cert_hash(der)), ("URI", uri)]]


header_names = st.sampled_from(
    [b"x-forwarded-client-cert", b"X-Forwarded-Client-Cert", b"connection", b"x-a"]
) | st.text(string.ascii_letters + "-", min_size=1, max_size=12).filter(
    lambda name: name.lower() != "host"
).map(str.encode)
# What h11 lets a client send: printable ASCII, no white space at either end.
header_values = st.text(string.printable[:-5], max_size=30).map(lambda v: v.strip().encode())


@given(
    st.lists(st.tuples(header_names, header_values), max_size=6),
    st.text(string.ascii_lowercase + "/", max_size=20),
)
def test_the_service_sees_exactly_one_xfcc_and_it_is_ours(client_headers, path):
    wire = h11.Connection(h11.CLIENT).send(
        h11.Request(method="GET", target="/", headers=[(b"host", b"svc"), *client_headers])
    )
    reader = http1.Connection(http1.SERVER)  # the request as the proxy reads it
    reader.receive_data(wire)
    request = reader.next_event()
    assert isinstance(request, http1.Request)
    stamp = xfcc.proxy_element("spiffe://example.org/api", b"leaf", f"spiffe://example.org/{path}")
    sent = request_headers(
        request,
        "svc",
        drop=frozenset({xfcc.HEADER.encode()}),
        add=[(xfcc.HEADER.encode(), stamp.encode())],
    )
    stamps = [value for name, value in sent if name == xfcc.HEADER.encode()]
    assert stamps == [stamp.encode()]
    assert len(xfcc.parse(stamp)) == 1 and len(xfcc.parse(stamp)[0]) == 3
