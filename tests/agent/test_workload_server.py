"""The Workload API server against py-spiffe, raw HTTP/2 peers and Tally's own client.

The backend is an in-memory fake: the real agent sits behind that boundary.
py-spiffe always runs in a separate process (its package-less proto would
clash with anything else loaded here, and a real workload is a separate
process anyway).  Timeouts are checked in virtual time over in-memory streams.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.workload_messages import (
    InvalidJwt,
    JwtSvidItem,
    NoIdentity,
    SvidItem,
    ValidatedJwt,
    X509Snapshot,
)
from agent.workload_server import WorkloadStats, serve_workload_api, serve_workload_connection
from tally.ops.net import PeerCred, open_unix_listener
from tally.wire import workload_pb as pb
from tally.wire.grpc import MessageDecoder, Status, encode_message, status_from_headers
from tally.wire.workload_client import (
    WorkloadApiError,
    endpoint_socket_of,
    fetch_x509,
    watch_x509,
)

SPIFFE_ID = "spiffe://example.org/workload"
X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
X509_BUNDLES = "/SpiffeWorkloadAPI/FetchX509Bundles"
EMPTY_REQUEST = encode_message(b"")
PEER = PeerCred(pid=4242, uid=1000, gid=1000)

# ---------------------------------------------------------------------------
# Certificates: a throwaway root per trust domain and leaves with the SPIFFE profile.


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return builder.not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(
        now + dt.timedelta(hours=1)
    )


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def make_ca(trust_domain: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(f"{trust_domain} root"))
        .issuer_name(_name(f"{trust_domain} root"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    return CA(builder.sign(key, hashes.SHA256()), key)


def make_svid(ca: CA, serial: int, spiffe_id: str = SPIFFE_ID, hint: str = "") -> SvidItem:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name("workload"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    )
    cert = builder.sign(ca.key, hashes.SHA256())
    return SvidItem(
        spiffe_id=spiffe_id,
        cert_chain_der=cert.public_bytes(serialization.Encoding.DER),
        private_key_pkcs8=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        bundle_der=ca.der,
        hint=hint,
    )


@pytest.fixture(scope="module")
def cas() -> dict[str, CA]:
    return {"example.org": make_ca("example.org"), "other.org": make_ca("other.org")}


def snapshot(cas: dict[str, CA], serial: int, *, padding: int = 0) -> X509Snapshot:
    """One SVID in example.org; other.org federated; ``padding`` extra copies of the
    root in the own bundle, to make messages as large as a test needs."""
    own = cas["example.org"]
    svid = make_svid(own, serial)
    if padding:
        svid = SvidItem(
            svid.spiffe_id, svid.cert_chain_der, svid.private_key_pkcs8, own.der * (1 + padding)
        )
    return X509Snapshot(
        svids=(svid,),
        bundles={
            "spiffe://example.org": svid.bundle_der,
            "spiffe://other.org": cas["other.org"].der,
        },
    )


# ---------------------------------------------------------------------------
# The fake backend: one shared current snapshot, pushed to every watcher.


class FakeBackend:
    def __init__(self, current: X509Snapshot) -> None:
        self.current = current
        self.version = 0
        self.changed = trio.Event()
        self.deny = False
        self.revoked = False
        self.peers: list[PeerCred] = []

    def publish(self, current: X509Snapshot) -> None:
        self.current = current
        self.version += 1
        self.changed.set()
        self.changed = trio.Event()

    def revoke(self) -> None:
        self.revoked = True
        self.publish(self.current)

    def x509_now(self, peer: PeerCred) -> X509Snapshot | None:
        if self.deny or self.revoked or not self.current.svids:
            return None
        self.peers.append(peer)
        return self.current

    @asynccontextmanager
    async def watch_x509(self, peer: PeerCred):
        self.peers.append(peer)
        if self.deny:
            raise NoIdentity(f"no entry for pid {peer.pid}")
        yield _Snapshots(self)

    async def fetch_jwt(self, peer: PeerCred, audience, spiffe_id: str):
        self.peers.append(peer)
        if self.deny:
            raise NoIdentity(f"no entry for pid {peer.pid}")
        return [JwtSvidItem("spiffe://example.org/web", f"token-for-{','.join(audience)}")]

    @asynccontextmanager
    async def watch_jwt_bundles(self, peer: PeerCred):
        self.peers.append(peer)
        if self.deny:
            raise NoIdentity(f"no entry for pid {peer.pid}")

        async def updates():
            yield {"spiffe://example.org": b'{"keys": []}'}
            await trio.sleep_forever()

        yield updates()

    async def validate_jwt(self, peer: PeerCred, audience: str, token: str):
        if token != "good":
            raise InvalidJwt("malformed")
        return ValidatedJwt("spiffe://example.org/web", {"aud": [audience], "n": 1})


class _Snapshots:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.seen = -1

    def __aiter__(self):
        return self

    async def __anext__(self) -> X509Snapshot:
        while self.seen == self.backend.version and not self.backend.revoked:
            await self.backend.changed.wait()
        if self.backend.revoked:
            raise NoIdentity("entry removed")
        self.seen = self.backend.version
        return self.backend.current


# ---------------------------------------------------------------------------
# A raw HTTP/2 client, to send what well-behaved clients never send.


@dataclass
class CallResult:
    status: tuple[Status, str] | None = None
    messages: list[bytes] = field(default_factory=list)
    reset: bool = False
    decoder: MessageDecoder = field(default_factory=lambda: MessageDecoder(16 * 1024 * 1024))


class RawClient:
    def __init__(self, stream: trio.abc.Stream, *, big_window: bool = False, ack: bool = True):
        self.stream = stream
        self.ack = ack
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        if big_window:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            self.conn.increment_flow_control_window(2**31 - 1 - 65535)
        self.calls: dict[int, CallResult] = {}
        self.terminated = False
        self.eof = False

    def call(self, path=X509_SVID, *, header=True, body=EMPTY_REQUEST, end=True, extra=()):
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ]
        if header:
            headers.append((b"workload.spiffe.io", b"true"))
        self.conn.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.calls[stream_id] = CallResult()
        return stream_id

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def read_once(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = True
            result = self.calls.get(getattr(event, "stream_id", 0))
            if result is None:
                continue
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                result.status = status_from_headers(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                if self.ack:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                result.decoder.receive_data(event.data)
                while (message := result.decoder.next_message()) is not None:
                    result.messages.append(message)
            elif isinstance(event, h2.events.StreamReset):
                result.reset = True
        await self.flush()

    async def wait_status(self, stream_id: int) -> tuple[Status, str]:
        while (status := self.calls[stream_id].status) is None:
            assert not self.eof, "connection closed before the call ended"
            await self.read_once()
        return status

    async def wait_messages(self, stream_id: int, count: int) -> list[bytes]:
        while len(self.calls[stream_id].messages) < count:
            assert not self.eof
            await self.read_once()
        return self.calls[stream_id].messages

    async def wait_closed(self) -> None:
        while not self.eof:
            await self.read_once()


# ---------------------------------------------------------------------------
# The server on a real Unix socket.


@dataclass
class Agent:
    path: Path
    backend: FakeBackend
    stats: WorkloadStats
    opened: list[trio.SocketStream] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"unix://{self.path}"

    async def connect(self, *, rcvbuf: int | None = None) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(str(self.path))
        stream = trio.SocketStream(sock)
        self.opened.append(stream)
        return stream

    async def raw(self, **kwargs) -> RawClient:
        client = RawClient(await self.connect(), **kwargs)
        await client.flush()
        return client


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="tally-w-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agent(nursery, sock_dir, cas):
    backend = FakeBackend(snapshot(cas, serial=1001))
    path = sock_dir / "agent.sock"
    listener = await open_unix_listener(path, 0o666)
    stats = await nursery.start(partial(serve_workload_api, listener, backend))
    agent = Agent(path, backend, stats)
    yield agent
    for stream in agent.opened:
        await stream.aclose()


async def run_python(script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(15):
        return await trio.run_process(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


# ---------------------------------------------------------------------------
# (1) py-spiffe, the reference client, in its own process.

PY_SPIFFE_FETCH = """
    import json, sys
    from spiffe import WorkloadApiClient
    with WorkloadApiClient(socket_path=sys.argv[1]) as client:
        ctx = client.fetch_x509_context(timeout=5)
        bundles = client.fetch_x509_bundles(timeout=5)
        print(json.dumps({
            "id": str(ctx.default_svid.spiffe_id),
            "serial": ctx.default_svid.leaf.serial_number,
            "context_bundles": sorted(
                str(b.trust_domain) for b in ctx.x509_bundle_set.bundles),
            "bundles": {str(b.trust_domain): len(b.x509_authorities) for b in bundles.bundles},
        }))
"""


async def test_py_spiffe_fetches_svid_and_bundles(agent):
    result = await run_python(PY_SPIFFE_FETCH, agent.uri)
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["id"] == SPIFFE_ID
    assert seen["serial"] == 1001
    assert seen["context_bundles"] == ["example.org", "other.org"]
    assert seen["bundles"] == {"example.org": 1, "other.org": 1}
    # Two calls, both attested with the kernel's idea of who called.
    assert len(agent.backend.peers) == 2
    assert {(p.uid, p.gid) for p in agent.backend.peers} == {(os.getuid(), os.getgid())}
    assert agent.stats.requests[("FetchX509SVID", "CANCELLED")] == 1
    assert agent.stats.requests[("FetchX509Bundles", "CANCELLED")] == 1


PY_SPIFFE_DENIED = """
    import sys
    from spiffe import WorkloadApiClient
    with WorkloadApiClient(socket_path=sys.argv[1]) as client:
        try:
            client.fetch_x509_context(timeout=5)
        except Exception as exc:
            print(type(exc).__name__, exc)
"""


async def test_py_spiffe_sees_permission_denied_without_identity(agent):
    agent.backend.deny = True
    result = await run_python(PY_SPIFFE_DENIED, agent.uri)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "PERMISSION_DENIED" in out
    assert "no identity issued" in out
    assert agent.stats.requests[("FetchX509SVID", "PERMISSION_DENIED")] >= 1


DESCRIBE_MESSAGES = """
    import json, sys
    from spiffe._proto import workload_pb2

    def describe(message):
        return [[f.name, f.number, f.type, f.is_repeated, nested(f)] for f in message.fields]

    def nested(field):
        if field.message_type is None:
            return None
        if field.message_type.GetOptions().map_entry:
            return describe(field.message_type)
        return field.message_type.name

    print(json.dumps({name: describe(getattr(workload_pb2, name).DESCRIPTOR)
                      for name in sys.argv[1:]}))
"""

MESSAGE_NAMES = [
    "X509SVIDRequest", "X509SVIDResponse", "X509SVID", "X509BundlesRequest",
    "X509BundlesResponse", "JWTSVIDRequest", "JWTSVIDResponse", "JWTSVID",
    "JWTBundlesRequest", "JWTBundlesResponse", "ValidateJWTSVIDRequest",
    "ValidateJWTSVIDResponse",
]  # fmt: skip


def _describe(message):
    return [[f.name, f.number, f.type, f.is_repeated, _nested(f)] for f in message.fields]


def _nested(field):
    if field.message_type is None:
        return None
    if field.message_type.GetOptions().map_entry:
        return _describe(field.message_type)
    return field.message_type.name


async def test_every_message_has_the_standard_wire_shape():
    # py-spiffe's generated copy of workloadapi.proto is the oracle: same field
    # names, numbers, types, repetition and nested shapes, map entries included.
    result = await run_python(DESCRIBE_MESSAGES, *MESSAGE_NAMES)
    assert result.returncode == 0, result.stderr.decode()
    theirs = json.loads(result.stdout)
    ours = {name: _describe(getattr(pb, name).DESCRIPTOR) for name in MESSAGE_NAMES}
    assert ours == theirs
    assert pb.X509SVID.DESCRIPTOR.full_name == "tally.workload.X509SVID"


# (2) py-spiffe's X509Source follows a rotation.

PY_SPIFFE_SOURCE = """
    import sys
    from spiffe import X509Source
    source = X509Source(socket_path=sys.argv[1], timeout_in_seconds=5)
    def show():
        print(source.get_x509_context().default_svid.leaf.serial_number, flush=True)
    source.subscribe_for_updates(show)
    show()
    sys.stdin.read()
    source.close()
"""


async def _lines(stream: trio.abc.ReceiveStream):
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
        data = await stream.receive_some()
        if not data:
            return
        buffer += data


async def test_py_spiffe_source_sees_rotation_within_a_second(agent, cas):
    command = [sys.executable, "-c", textwrap.dedent(PY_SPIFFE_SOURCE), agent.uri]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        lines = _lines(process.stdout)
        with trio.fail_after(10):
            assert await anext(lines) == "1001"
        rotated = snapshot(cas, serial=1002)
        agent.backend.publish(rotated)
        with trio.fail_after(1):
            async for line in lines:
                if line == "1002":
                    break
                assert line == "1001"
        await lines.aclose()
    finally:
        await process.stdin.aclose()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert agent.backend.peers[0].pid == process.pid


# ---------------------------------------------------------------------------
# (3) Statuses for calls the server will not serve.


async def test_missing_security_header_is_invalid_argument_before_anything_else(agent):
    client = await agent.raw()
    for path in (X509_SVID, "/no/such/method"):
        stream_id = client.call(path, header=False)
        await client.flush()
        status, message = await client.wait_status(stream_id)
        assert status is Status.INVALID_ARGUMENT
        assert "workload.spiffe.io" in message
    assert agent.backend.peers == []  # nobody was attested


@pytest.mark.parametrize(
    "method",
    ["FetchWITSVID", "FetchWITBundles", "Nope"],
)
async def test_other_methods_are_unimplemented(agent, method):
    client = await agent.raw()
    stream_id = client.call(f"/SpiffeWorkloadAPI/{method}")
    await client.flush()
    assert (await client.wait_status(stream_id))[0] is Status.UNIMPLEMENTED
    label = method if method != "Nope" else "unknown"
    assert agent.stats.requests[(label, "UNIMPLEMENTED")] == 1


async def test_jwt_svid_is_fetched_for_the_requested_audiences(agent):
    client = await agent.raw()
    body = pb.JWTSVIDRequest(audience=["a", "b"]).SerializeToString()
    stream_id = client.call("/SpiffeWorkloadAPI/FetchJWTSVID", body=encode_message(body))
    await client.flush()
    (message,) = await client.wait_messages(stream_id, 1)
    assert (await client.wait_status(stream_id))[0] is Status.OK
    svids = pb.JWTSVIDResponse.FromString(message).svids
    assert [(s.spiffe_id, s.svid) for s in svids] == [("spiffe://example.org/web", "token-for-a,b")]


async def test_jwt_svid_needs_an_audience(agent):
    client = await agent.raw()
    stream_id = client.call("/SpiffeWorkloadAPI/FetchJWTSVID")
    await client.flush()
    assert (await client.wait_status(stream_id))[0] is Status.INVALID_ARGUMENT


async def test_jwt_methods_deny_a_caller_without_identity(agent):
    agent.backend.deny = True
    client = await agent.raw()
    for method, body in (
        ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["a"]).SerializeToString()),
        ("FetchJWTBundles", b""),
    ):
        stream_id = client.call(f"/SpiffeWorkloadAPI/{method}", body=encode_message(body))
        await client.flush()
        assert (await client.wait_status(stream_id))[0] is Status.PERMISSION_DENIED


async def test_jwt_bundles_stream_and_validate(agent):
    client = await agent.raw()
    stream_id = client.call("/SpiffeWorkloadAPI/FetchJWTBundles")
    await client.flush()
    (message,) = await client.wait_messages(stream_id, 1)
    assert dict(pb.JWTBundlesResponse.FromString(message).bundles) == {
        "spiffe://example.org": b'{"keys": []}'
    }
    for token, status in (("good", Status.OK), ("bad", Status.INVALID_ARGUMENT)):
        body = pb.ValidateJWTSVIDRequest(audience="a", svid=token).SerializeToString()
        sid = client.call("/SpiffeWorkloadAPI/ValidateJWTSVID", body=encode_message(body))
        await client.flush()
        got, text = await client.wait_status(sid)
        assert got is status, text
        if status is Status.INVALID_ARGUMENT:
            assert text == "invalid JWT-SVID: malformed"


async def test_unknown_service_is_unimplemented(agent):
    client = await agent.raw()
    stream_id = client.call("/grpc.health.v1.Health/Check")
    await client.flush()
    assert (await client.wait_status(stream_id))[0] is Status.UNIMPLEMENTED


async def test_our_settings_reach_a_client_that_waits_for_them_before_calling(agent):
    # grpc-go sends no call before the server's SETTINGS; the server holds its SETTINGS
    # back only for a response that comes with them, so a client is never left waiting,
    # even one slower to send its own preface than the server is to look for it.
    stream = await agent.connect()
    with trio.fail_after(5):
        data = await stream.receive_some(65536)
    assert data[3] == 0x4 and data[4] == 0  # a SETTINGS frame, not an ack
    client = RawClient(stream)
    client.conn.receive_data(data)
    await client.flush()
    stream_id = client.call()
    await client.flush()
    assert len(await client.wait_messages(stream_id, 1)) == 1


async def test_bundles_stream_over_raw_http2(agent, cas):
    client = await agent.raw()
    stream_id = client.call(X509_BUNDLES)
    await client.flush()
    [first] = await client.wait_messages(stream_id, 1)
    bundles = pb.X509BundlesResponse.FromString(first).bundles
    assert dict(bundles) == {
        "spiffe://example.org": cas["example.org"].der,
        "spiffe://other.org": cas["other.org"].der,
    }
    # A rotation that changes no bundle sends nothing on this stream.
    agent.backend.publish(snapshot(cas, serial=1002))
    agent.backend.publish(
        X509Snapshot(agent.backend.current.svids, {"spiffe://example.org": cas["example.org"].der})
    )
    second = (await client.wait_messages(stream_id, 2))[1]
    assert dict(pb.X509BundlesResponse.FromString(second).bundles) == {
        "spiffe://example.org": cas["example.org"].der
    }


def _leaf_serial(message: bytes) -> int:
    svid = pb.X509SVIDResponse.FromString(message).svids[0]
    return x509.load_der_x509_certificate(svid.x509_svid).serial_number


async def test_a_change_just_after_the_first_answer_reaches_the_stream_once(agent, cas):
    """The first answer goes out without a task (workload_server rule 2); the task that
    watches the stream starts later, and sends what changed meanwhile, and only that."""
    client = await agent.raw()
    stream_id = client.call()
    await client.flush()
    [first] = await client.wait_messages(stream_id, 1)
    agent.backend.publish(snapshot(cas, serial=1002))  # before the stream's task starts
    with trio.fail_after(2):
        second = (await client.wait_messages(stream_id, 2))[1]
    assert (_leaf_serial(first), _leaf_serial(second)) == (1001, 1002)
    with trio.move_on_after(0.3):
        await client.wait_messages(stream_id, 3)
    assert len(client.calls[stream_id].messages) == 2
    assert agent.stats.streams_open == 1


async def test_empty_snapshot_ends_with_permission_denied(agent, cas):
    agent.backend.publish(X509Snapshot((), {"spiffe://example.org": cas["example.org"].der}))
    client = await agent.raw()
    stream_id = client.call()
    await client.flush()
    assert await client.wait_status(stream_id) == (Status.PERMISSION_DENIED, "no identity issued")
    assert client.calls[stream_id].messages == []


# ---------------------------------------------------------------------------
# (4) Hostile peers close their own connection and nothing else.


async def _still_serves(agent: Agent) -> None:
    with trio.fail_after(5):
        context = await fetch_x509(agent.path)
    assert context.default_svid.spiffe_id == SPIFFE_ID


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff" * 5000,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # A SETTINGS frame whose length is not a multiple of 6.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x04\x00\x00\x00\x00\x00" + b"\xff" * 4,
    ],
    ids=["binary", "http1", "bad-frame"],
)
async def test_garbage_closes_only_that_connection(agent, garbage):
    stream = await agent.connect()
    await stream.send_all(garbage)
    with trio.fail_after(5):
        while await stream.receive_some():
            pass
    await _still_serves(agent)
    assert agent.stats.connections_dropped == 1


async def test_oversized_request_ends_that_call(agent):
    client = await agent.raw()
    huge = b"\x00" + (5 * 1024 * 1024).to_bytes(4, "big") + b"\x00" * 1000
    stream_id = client.call(body=huge, end=False)
    await client.flush()
    assert (await client.wait_status(stream_id))[0] is Status.RESOURCE_EXHAUSTED
    # The connection still serves a proper call.
    stream_id = client.call()
    await client.flush()
    await client.wait_messages(stream_id, 1)


async def test_second_request_message_is_a_cardinality_error(agent):
    client = await agent.raw()
    stream_id = client.call(body=EMPTY_REQUEST * 2)
    await client.flush()
    status = await client.wait_status(stream_id)
    assert status[0] is Status.INTERNAL


async def test_thousand_streams_at_once_close_that_connection(agent):
    client = await agent.raw()
    for _ in range(1000):
        client.call()
    await client.flush()
    with trio.fail_after(5):
        await client.wait_closed()
    assert client.terminated  # a GOAWAY came before the close
    await _still_serves(agent)


async def test_many_streams_within_the_limit_are_all_served(agent):
    client = await agent.raw()
    await client.read_once()  # learn the server's SETTINGS
    assert client.conn.remote_settings.max_concurrent_streams == 100
    ids = [client.call() for _ in range(100)]
    await client.flush()
    with trio.fail_after(5):
        for stream_id in ids:
            [message] = await client.wait_messages(stream_id, 1)
            assert pb.X509SVIDResponse.FromString(message).svids[0].spiffe_id == SPIFFE_ID
    assert agent.stats.streams_open == 100


# ---------------------------------------------------------------------------
# (5) A peer that stops reading delays nobody, and is dropped in the end.


async def test_stalled_reader_does_not_delay_another_clients_rotation(agent, cas):
    agent.backend.publish(snapshot(cas, serial=2001, padding=2000))  # ~1 MB messages
    slow = RawClient(await agent.connect(rcvbuf=4096), big_window=True)
    slow.call()
    await slow.flush()  # ... and never reads again
    with trio.fail_after(5):
        async with watch_x509(agent.path) as updates:
            first = await anext(updates)
            assert first.default_svid.leaf.serial_number == 2001
            agent.backend.publish(snapshot(cas, serial=2002, padding=2000))
            with trio.fail_after(1):
                second = await anext(updates)
            assert second.default_svid.leaf.serial_number == 2002
    assert agent.stats.connections_dropped == 0


async def _serve_in_memory(stream, backend, stats):
    await serve_workload_connection(stream, PEER, backend, stats=stats)
    return trio.current_time()


async def test_peer_that_never_reads_is_dropped_after_the_stall_timeout(autojump_clock, cas):
    server_side, client_side = trio.testing.lockstep_stream_pair()
    stats = WorkloadStats()
    ended_at = []
    async with trio.open_nursery() as nursery:

        async def serve():
            ended_at.append(
                await _serve_in_memory(server_side, FakeBackend(snapshot(cas, 1)), stats)
            )

        nursery.start_soon(serve)
        client = RawClient(client_side)
        client.call()
        await client.flush()  # and never read
    assert ended_at == [pytest.approx(30.0)]
    assert stats.connections_dropped == 1
    assert stats.connections_open == 0


async def test_peer_that_never_opens_its_window_is_dropped(autojump_clock, cas):
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    backend = FakeBackend(snapshot(cas, 1, padding=400))  # > 64 KiB: needs WINDOW_UPDATEs
    client = RawClient(client_side, ack=False)
    stream_id = client.call()
    await client.flush()
    async with trio.open_nursery() as nursery:

        async def read_forever():
            while True:
                await client.read_once()

        nursery.start_soon(read_forever)
        ended_at = await _serve_in_memory(server_side, backend, stats)
        nursery.cancel_scope.cancel()
    assert ended_at == pytest.approx(30.0)
    assert stats.connections_dropped == 1
    assert client.calls[stream_id].messages == []  # only the first 64 KiB ever arrived


async def test_pings_do_not_keep_a_closed_window_alive(autojump_clock, cas):
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    backend = FakeBackend(snapshot(cas, 1, padding=400))
    client = RawClient(client_side, ack=False)
    client.call()
    await client.flush()
    async with trio.open_nursery() as nursery:

        async def read_and_ping_forever():
            while True:
                client.conn.ping(b"12345678")
                await client.flush()
                with trio.move_on_after(5):
                    while True:
                        await client.read_once()

        nursery.start_soon(read_and_ping_forever)
        ended_at = await _serve_in_memory(server_side, backend, stats)
        nursery.cancel_scope.cancel()
    assert ended_at == pytest.approx(30.0)
    assert stats.connections_dropped == 1


async def test_idle_reader_is_never_dropped(autojump_clock, cas):
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    backend = FakeBackend(snapshot(cas, 1, padding=400))
    client = RawClient(client_side)
    stream_id = client.call()
    await client.flush()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_in_memory, server_side, backend, stats)
        await client.wait_messages(stream_id, 1)
        with trio.move_on_after(3600):
            await client.wait_closed()
        assert trio.current_time() == pytest.approx(3600, abs=1)
        backend.publish(snapshot(cas, 2))
        await client.wait_messages(stream_id, 2)
        nursery.cancel_scope.cancel()
    assert stats.connections_dropped == 0


async def test_connection_is_closed_an_idle_timeout_after_its_last_call(autojump_clock, cas):
    """Rule 5: a connection whose calls have all ended is told goodbye (GOAWAY) once it
    has had none for ``idle_timeout_s``, counted from the end of the last one."""
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    client = RawClient(client_side)
    body = encode_message(pb.JWTSVIDRequest(audience=["a"]).SerializeToString())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_in_memory, server_side, FakeBackend(snapshot(cas, 1)), stats)
        await client.flush()  # the preface and SETTINGS
        await trio.sleep(100)  # an idle period is counted from the end of the last call
        stream_id = client.call("/SpiffeWorkloadAPI/FetchJWTSVID", body=body)
        await client.flush()
        assert (await client.wait_status(stream_id))[0] is Status.OK
        ended = trio.current_time()
        await client.wait_closed()
        closed = trio.current_time()
    assert closed - ended == pytest.approx(300, abs=1)
    assert client.terminated, "closed without a GOAWAY"
    assert stats.connections_dropped == 0


async def test_silent_peer_is_dropped_after_the_request_timeout(autojump_clock, cas):
    server_side, _client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    ended_at = await _serve_in_memory(server_side, FakeBackend(snapshot(cas, 1)), stats)
    assert ended_at == pytest.approx(10.0)
    assert stats.connections_dropped == 1


async def _call_in_memory(cas, **call):
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    client = RawClient(client_side)
    stream_id = client.call(**call)
    await client.flush()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_in_memory, server_side, FakeBackend(snapshot(cas, 1)), stats)
        status = await client.wait_status(stream_id)
        nursery.cancel_scope.cancel()
    return status, trio.current_time()


async def test_request_message_must_arrive_within_the_request_timeout(autojump_clock, cas):
    (status, _), ended = await _call_in_memory(cas, body=b"", end=False)
    assert status is Status.DEADLINE_EXCEEDED
    assert ended == pytest.approx(10.0)


async def test_client_deadline_ends_the_stream(autojump_clock, cas):
    (status, _), ended = await _call_in_memory(cas, extra=[(b"grpc-timeout", b"2S")])
    assert status is Status.DEADLINE_EXCEEDED
    assert ended == pytest.approx(2.0)


# ---------------------------------------------------------------------------
# (6) Tally's own client.


async def test_own_client_fetches_and_parses(agent, cas):
    context = await fetch_x509(endpoint_socket_of(agent.uri))
    svid = context.default_svid
    assert svid.spiffe_id == SPIFFE_ID
    assert svid.leaf.serial_number == 1001
    assert svid.private_key.public_key() == svid.leaf.public_key()
    assert set(context.bundles) == {"example.org", "other.org"}
    assert context.bundles["other.org"] == (cas["other.org"].cert,)
    assert agent.backend.peers[0].pid == os.getpid()


async def test_own_client_watches_rotation_and_revocation(agent, cas):
    async with watch_x509(endpoint_socket_of(f"unix:{agent.path}")) as updates:
        assert (await anext(updates)).default_svid.leaf.serial_number == 1001
        agent.backend.publish(snapshot(cas, serial=1002))
        assert (await anext(updates)).default_svid.leaf.serial_number == 1002
        agent.backend.revoke()
        with pytest.raises(WorkloadApiError) as info:
            await anext(updates)
    assert info.value.status is Status.PERMISSION_DENIED


async def test_own_client_reports_permission_denied(agent):
    agent.backend.deny = True
    with pytest.raises(WorkloadApiError) as info:
        await fetch_x509(agent.path)
    assert info.value.status is Status.PERMISSION_DENIED
    assert info.value.message == "no identity issued"


async def test_own_client_reports_a_missing_socket(sock_dir):
    with pytest.raises(WorkloadApiError) as info:
        await fetch_x509(sock_dir / "absent.sock")
    assert info.value.status is Status.UNAVAILABLE
    assert "absent.sock" in info.value.message


async def test_own_client_times_out(autojump_clock, sock_dir):
    listener = await open_unix_listener(sock_dir / "mute.sock", 0o600)  # accepts, never answers
    with pytest.raises(WorkloadApiError) as info:
        await fetch_x509(sock_dir / "mute.sock", timeout_s=3)
    assert info.value.status is Status.DEADLINE_EXCEEDED
    await listener.aclose()


# ---------------------------------------------------------------------------
# Drain (rule 8): every call ends with UNAVAILABLE trailers, then the server returns.


async def test_drain_ends_streams_cleanly_and_closes_idle_connections(nursery, sock_dir, cas):
    backend = FakeBackend(snapshot(cas, serial=1001))
    path = sock_dir / "agent.sock"
    listener = await open_unix_listener(path, 0o666)
    drain, returned = trio.Event(), trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_workload_api(listener, backend, drain=drain, task_status=task_status)
        returned.set()

    stats = await nursery.start(serve)
    agent = Agent(path, backend, stats)
    idle = await agent.raw()  # a connection with no call open
    command = [sys.executable, "-m", "tests.e2e.spiffe_probe", "stream", str(path)]
    process = await trio.lowlevel.open_process(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    assert process.stdout is not None
    try:
        lines = _lines(process.stdout)
        with trio.fail_after(10):
            assert json.loads(await anext(lines)) == {"svids": 1}
        drain.set()
        with trio.fail_after(5):
            end = json.loads(await anext(lines))
            await idle.wait_closed()
            await returned.wait()
        await lines.aclose()
    finally:
        process.kill()
        await process.wait()
        await idle.stream.aclose()
    assert end == {"end": "UNAVAILABLE", "details": "the agent is shutting down"}
    assert idle.terminated, "the idle connection was closed without a GOAWAY"
    assert stats.requests[("FetchX509SVID", "UNAVAILABLE")] == 1
    assert stats.connections_open == 0
