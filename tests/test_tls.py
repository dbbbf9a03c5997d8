"""Tests for tally.tls (contexts, verify, stream): trio's conformance suite, mTLS verdicts, resumption, interop.

Certificates are minted here with plain ``cryptography`` (EC P-256 root -> SPIFFE
leaf), from real now truncated to whole seconds, because OpenSSL checks validity
against the real clock.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tally.tls.contexts import TLSContext, client_context, server_context
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected, TLSError

# -- throwaway PKI -------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.cert]


def make_root(name: str = "test root") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(
    root: Issued,
    uri: str = "spiffe://example.org/x",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tally test")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=1))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
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
        .sign(root.key, hashes.SHA256())
    )
    return Issued(cert, key)


def spiffe_id(chain: list[x509.Certificate]) -> str:
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)[0]


@dataclass(frozen=True)
class PKI:
    root: Issued
    server: Issued
    client: Issued

    def server_ctx(self, **kw) -> TLSContext:
        kw.setdefault("roots", [self.root.cert])
        kw.setdefault("verifier", spiffe_id)
        return server_context(self.server.chain, self.server.key, **kw)

    def client_ctx(self, **kw) -> TLSContext:
        kw.setdefault("roots", [self.root.cert])
        kw.setdefault("chain", self.client.chain)
        kw.setdefault("key", self.client.key)
        kw.setdefault("verifier", spiffe_id)
        return client_context(**kw)


def make_pki() -> PKI:
    root = make_root()
    return PKI(
        root,
        make_leaf(root, "spiffe://example.org/server"),
        make_leaf(root, "spiffe://example.org/client"),
    )


@pytest.fixture(scope="module")
def pki() -> PKI:
    return make_pki()


_OPEN_SOCKETS: list[socket.socket] = []


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected stream sockets (TLS runs on real sockets only), closed after the test."""
    a, b = socket.socketpair()
    _OPEN_SOCKETS.extend((a, b))
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


@pytest.fixture(autouse=True)
def _close_socket_pairs():
    yield
    while _OPEN_SOCKETS:
        _OPEN_SOCKETS.pop().close()


def tls_pair(
    client_ctx: TLSContext,
    server_ctx: TLSContext,
    transports: tuple[trio.SocketStream, trio.SocketStream] | None = None,
) -> tuple[TLSStream, TLSStream]:
    c, s = transports or socket_pair()
    return TLSStream(c, client_ctx, server_side=False), TLSStream(s, server_ctx, server_side=True)


async def handshake_both(client: TLSStream, server: TLSStream) -> dict[str, BaseException]:
    """Handshake both ends; returns the exception each side raised, if any."""
    errors: dict[str, BaseException] = {}

    async def run(name: str, stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
        except Exception as exc:
            errors[name] = exc
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "client", client)
        nursery.start_soon(run, "server", server)
    return errors


# -- smoke -------------------------------------------------------------------------------


async def test_mutual_tls_round_trip_reports_identities(pki):
    client, server = tls_pair(pki.client_ctx(), pki.server_ctx())
    assert await handshake_both(client, server) == {}
    assert server.peer_identity == "spiffe://example.org/client"
    assert client.peer_identity == "spiffe://example.org/server"
    assert server.peer_chain == [pki.client.cert]
    assert client.peer_chain == [pki.server.cert]
    assert client.version == server.version == "TLSv1.3"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"ping")
        assert await server.receive_some() == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


# -- trio's stream conformance suite ---------------------------------------------------


async def test_conforms_to_trio_half_closeable_stream(pki):
    client_ctx, server_ctx = pki.client_ctx(), pki.server_ctx()

    async def stream_maker():
        return tls_pair(client_ctx, server_ctx)

    # No clogged variant: a socket always buffers, and a TLS send cancelled while
    # the socket is full breaks the stream on purpose (OpenSSL holds half a record).
    await trio.testing.check_half_closeable_stream(stream_maker, None)


# -- verdicts ----------------------------------------------------------------------------


async def test_client_from_another_root_is_refused_as_untrusted(pki):
    stranger = make_root("stranger")
    leaf = make_leaf(stranger)
    client_ctx = pki.client_ctx(chain=leaf.chain, key=leaf.key)
    client, server = tls_pair(client_ctx, pki.server_ctx())
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == "untrusted"
    assert server.peer_identity is None


async def test_verifier_refusal_fails_the_handshake(pki):
    seen = []

    def deny(chain):
        seen.append(chain)
        raise PeerRejected("not_allowed", f"{spiffe_id(chain)} may not connect")

    client, server = tls_pair(pki.client_ctx(), pki.server_ctx(verifier=deny))
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == "not_allowed"
    assert str(errors["server"]) == "spiffe://example.org/client may not connect"
    # The verifier saw the chain OpenSSL built: our leaf, then the trusted root.
    assert seen == [[pki.client.cert, pki.root.cert]]
    # In TLS 1.3 the client finished first; it learns of the refusal on its first read.
    if "client" not in errors:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, TLSError)


async def test_client_verifier_refusal_fails_the_client_handshake(pki):
    def deny(chain):
        raise PeerRejected("not_allowed", "wrong server")

    client, server = tls_pair(pki.client_ctx(verifier=deny), pki.server_ctx())
    errors = await handshake_both(client, server)
    assert isinstance(errors["client"], PeerRejected)
    assert errors["client"].reason == "not_allowed"
    assert isinstance(errors["server"], TLSError)


@pytest.mark.parametrize(
    ("shift", "reason"),
    [
        ({"not_after": -dt.timedelta(minutes=1)}, "expired"),
        ({"not_before": dt.timedelta(minutes=10)}, "not_yet_valid"),
    ],
)
async def test_client_cert_outside_its_validity_is_refused(pki, shift, reason):
    now = _now()
    times = {k: now + v for k, v in shift.items()}
    if "not_after" in times:
        times["not_before"] = now - dt.timedelta(hours=1)
    else:
        times["not_after"] = now + dt.timedelta(hours=1)
    leaf = make_leaf(pki.root, **times)
    client, server = tls_pair(pki.client_ctx(chain=leaf.chain, key=leaf.key), pki.server_ctx())
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == reason


async def test_server_from_unknown_root_is_refused_by_the_client(pki):
    stranger = make_root("stranger")
    client, server = tls_pair(pki.client_ctx(roots=[stranger.cert]), pki.server_ctx())
    errors = await handshake_both(client, server)
    assert isinstance(errors["client"], PeerRejected)
    assert errors["client"].reason == "untrusted"
    assert isinstance(errors["server"], TLSError)


async def test_required_client_cert_missing_is_refused(pki):
    client, server = tls_pair(pki.client_ctx(chain=(), key=None), pki.server_ctx())
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == "no_certificate"


async def test_optional_client_auth_accepts_anonymous_and_verifies_presented(pki):
    server_ctx = pki.server_ctx(client_auth="optional")
    client, server = tls_pair(pki.client_ctx(chain=(), key=None), server_ctx)
    assert await handshake_both(client, server) == {}
    assert server.peer_identity is None
    assert server.peer_chain == []
    client, server = tls_pair(pki.client_ctx(), server_ctx)
    assert await handshake_both(client, server) == {}
    assert server.peer_identity == "spiffe://example.org/client"


async def test_client_auth_none_never_asks(pki):
    server_ctx = server_context(pki.server.chain, pki.server.key, client_auth="none")
    client, server = tls_pair(pki.client_ctx(), server_ctx)
    assert await handshake_both(client, server) == {}
    assert server.peer_chain == []
    assert client.peer_identity == "spiffe://example.org/server"


async def test_crashing_verifier_refuses_and_logs(pki, caplog):
    def broken(chain):
        raise KeyError("secret detail")

    client, server = tls_pair(pki.client_ctx(), pki.server_ctx(verifier=broken))
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == "verifier_error"
    assert "secret detail" not in str(errors["server"])
    assert any(r.name == "tally.tls" and r.exc_info for r in caplog.records)


async def test_operations_after_a_failed_handshake_report_broken(pki):
    client, server = tls_pair(pki.client_ctx(chain=(), key=None), pki.server_ctx())
    errors = await handshake_both(client, server)
    assert "server" in errors
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")  # handshake_both closed it
    # An implicit handshake (inside receive_some) reports the Stream way, with the cause.
    fresh_client, fresh_server = tls_pair(pki.client_ctx(chain=(), key=None), pki.server_ctx())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fresh_client.do_handshake)
        with pytest.raises(trio.BrokenResourceError) as info:
            await fresh_server.receive_some()
    assert isinstance(info.value.__cause__, PeerRejected)
    with pytest.raises(trio.BrokenResourceError):
        await fresh_server.do_handshake()


async def test_cancelled_handshake_leaves_the_stream_broken(pki, autojump_clock):
    client, server = tls_pair(pki.client_ctx(), pki.server_ctx())
    with trio.move_on_after(1):
        await server.do_handshake()  # nobody is talking to us
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()
    await client.aclose()


# -- contexts ----------------------------------------------------------------------------


def test_context_construction_rejects_inconsistent_input(pki):
    other = make_leaf(pki.root)
    with pytest.raises(ValueError, match="does not match"):
        server_context(pki.server.chain, other.key, roots=[pki.root.cert])
    with pytest.raises(ValueError, match="needs at least one root"):
        server_context(pki.server.chain, pki.server.key)
    with pytest.raises(ValueError, match="client_auth must be"):
        server_context(pki.server.chain, pki.server.key, client_auth="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        server_context([], pki.server.key, client_auth="none")
    with pytest.raises(ValueError, match="without its private key"):
        client_context(roots=[pki.root.cert], chain=pki.client.chain)
    with pytest.raises(ValueError, match="without a certificate chain"):
        client_context(roots=[pki.root.cert], key=pki.client.key)
    with pytest.raises(ValueError, match="server stream needs a server context"):
        TLSStream(socket_pair()[0], pki.client_ctx(), server_side=True)
    with pytest.raises(TypeError, match=r"trio\.SocketStream"):
        TLSStream(trio.testing.memory_stream_pair()[0], pki.client_ctx(), server_side=False)  # type: ignore[arg-type]


async def test_hot_swap_new_handshakes_use_the_new_context_old_ones_keep_going(pki):
    rotated = make_leaf(pki.root, "spiffe://example.org/server")
    current = pki.server_ctx()
    old_client, old_server = tls_pair(pki.client_ctx(), current)
    assert await handshake_both(old_client, old_server) == {}
    current = server_context(rotated.chain, rotated.key, roots=[pki.root.cert])
    new_client, new_server = tls_pair(pki.client_ctx(), current)
    assert await handshake_both(new_client, new_server) == {}
    assert new_client.peer_chain == [rotated.cert]
    await old_client.send_all(b"still here")
    assert await old_server.receive_some() == b"still here"
    assert old_client.peer_chain == [pki.server.cert]


# -- resumption --------------------------------------------------------------------------


async def exchange(client: TLSStream, server: TLSStream) -> None:
    """Handshake, one round trip (which delivers the session ticket), close."""
    assert await handshake_both(client, server) == {}
    await server.send_all(b"hello")
    assert await client.receive_some() == b"hello"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_client_resumes_and_both_sides_take_the_remembered_verdict(pki):
    calls = {"client": 0, "server": 0}

    def counting(side):
        def verify(chain):
            calls[side] += 1
            assert chain[-1] == pki.root.cert
            return spiffe_id(chain)

        return verify

    client_ctx = pki.client_ctx(verifier=counting("client"))
    server_ctx = pki.server_ctx(verifier=counting("server"))
    first = tls_pair(client_ctx, server_ctx)
    await exchange(*first)
    assert not first[0].resumed
    client, server = tls_pair(client_ctx, server_ctx)
    assert await handshake_both(client, server) == {}
    assert client.resumed and server.resumed
    # Judged once per context and leaf: the resumed handshake reuses the verdict.
    assert calls == {"client": 1, "server": 1}
    assert server.peer_identity == "spiffe://example.org/client"
    assert client.peer_identity == "spiffe://example.org/server"
    assert server.peer_chain == [pki.client.cert]
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_a_peers_connections_share_its_certificates_and_keep_no_others(pki):
    """Memory per parked connection: full handshakes from the same peer hold one set of
    certificate objects (the context's), and the verification state lets go of its own."""
    server_ctx = pki.server_ctx()
    streams = []
    for _ in range(2):  # a new client context each time: full handshakes, no resumption
        client, server = tls_pair(pki.client_ctx(), server_ctx)
        assert await handshake_both(client, server) == {}
        assert not server.resumed
        streams.append(server)
    first, second = (s.peer_chain for s in streams)
    assert first == second == [pki.client.cert]
    assert all(a is b for a, b in zip(first, second, strict=True))
    for server in streams:
        assert server._check.by_depth == {} and server._check.chain is None
        assert server.peer_identity == "spiffe://example.org/client"


async def test_resumed_peer_without_a_remembered_verdict_is_judged_again(pki):
    verdicts = []

    def verify(chain):
        verdicts.append(spiffe_id(chain))
        if len(verdicts) > 1:
            raise PeerRejected("not_allowed", verdicts[-1])
        return verdicts[-1]

    client_ctx, server_ctx = pki.client_ctx(), pki.server_ctx(verifier=verify)
    await exchange(*tls_pair(client_ctx, server_ctx))
    server_ctx._verified.clear()  # as when the verdict was evicted or ran out
    client, server = tls_pair(client_ctx, server_ctx)
    errors = await handshake_both(client, server)
    assert isinstance(errors["server"], PeerRejected)
    assert errors["server"].reason == "not_allowed"
    assert server.resumed


def test_a_remembered_verdict_ends_with_the_earliest_expiry_on_the_chain(pki):
    now = _now()
    short = make_leaf(pki.root, not_before=now - dt.timedelta(hours=1), not_after=now)
    ctx = pki.server_ctx()
    der = short.cert.public_bytes(serialization.Encoding.DER)
    ctx._remember_verified(der, [short.cert], "id", [short.cert, pki.root.cert])
    assert ctx._recall_verified(der) is None  # its leaf has expired: judge again
    good = pki.client.cert.public_bytes(serialization.Encoding.DER)
    ctx._remember_verified(good, [pki.client.cert], "id", [pki.client.cert, pki.root.cert])
    assert ctx._recall_verified(good).identity == "id"


def test_resumption_recheck_refuses_a_certificate_that_expired_since(pki):
    # What a resumed handshake runs instead of OpenSSL's callback: the stored chain
    # is checked at the current time, so a session cannot outlive its certificate.
    now = _now()
    old = make_leaf(
        pki.root, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(seconds=1)
    )
    with pytest.raises(PeerRejected) as info:
        pki.server_ctx()._reverify(old.cert, [])
    assert info.value.reason == "expired"
    stranger = make_leaf(make_root("stranger"))
    with pytest.raises(PeerRejected) as info:
        pki.server_ctx()._reverify(stranger.cert, [])
    assert info.value.reason == "untrusted"
    chain, identity = pki.server_ctx()._reverify(pki.client.cert, [])
    assert chain == [pki.client.cert, pki.root.cert]
    assert identity == "spiffe://example.org/client"


async def test_sessions_do_not_cross_contexts(pki):
    server_ctx = pki.server_ctx()
    await exchange(*tls_pair(pki.client_ctx(), server_ctx))
    client, server = tls_pair(pki.client_ctx(), server_ctx)
    assert await handshake_both(client, server) == {}
    assert not client.resumed and not server.resumed
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


# -- real sockets: duplex, interop -------------------------------------------------------


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    return client, server


async def test_full_duplex_over_tcp_from_two_tasks_per_end(pki):
    client, server = tls_pair(pki.client_ctx(), pki.server_ctx(), await tcp_pair())
    size = 8 << 20
    up, down = bytes(range(256)) * (size // 256), bytes(reversed(range(256))) * (size // 256)

    async def pump_out(stream, data):
        view = memoryview(data)
        for i in range(0, len(view), 100_000):
            await stream.send_all(view[i : i + 100_000])

    async def pump_in(stream, expected):
        got = bytearray()
        while len(got) < len(expected):
            chunk = await stream.receive_some()
            assert chunk
            got += chunk
        assert got == expected

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_out, client, up)
            nursery.start_soon(pump_out, server, down)
            nursery.start_soon(pump_in, server, up)
            nursery.start_soon(pump_in, client, down)
    await client.aclose()
    await server.aclose()


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def stdlib_client_context(pki: PKI, tmp_path, *, tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, not a host name
    ctx.load_verify_locations(cadata=pem(pki.root.cert))
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.load_cert_chain(*key_files(pki.client, tmp_path / "client"))
    return ctx


def key_files(issued: Issued, stem: Path) -> tuple[Path, Path]:
    """``issued`` as PEM files for the stdlib, which loads keys only from files (a
    throwaway test key is fine on disk): the certificate and the key paths."""
    cert_file, key_file = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_file.write_text(pem(issued.cert))
    key_file.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def serve_one(server_ctx: TLSContext, handle, task_status=trio.TASK_STATUS_IGNORED):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    task_status.started(listener.socket.getsockname()[1])
    async with listener:
        raw = await listener.accept()
    stream = TLSStream(raw, server_ctx, server_side=True)
    async with stream:
        await handle(stream)


async def test_stdlib_ssl_client_interoperates(pki, tmp_path):
    ctx = stdlib_client_context(pki, tmp_path)
    seen = {}

    async def echo(stream):
        with trio.fail_after(10):
            await stream.do_handshake()
            seen["identity"] = stream.peer_identity
            data = await stream.receive_some()
            await stream.send_all(data.upper())
            assert await stream.receive_some() == b""

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as conn:
                assert conn.version() == "TLSv1.3"
                conn.sendall(b"interop")
                reply = conn.recv(100)
                der = conn.getpeercert(binary_form=True)
                assert der is not None
                cert = x509.load_der_x509_certificate(der)
                conn.unwrap()
        return reply, cert

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_one, pki.server_ctx(), echo)
        reply, cert = await trio.to_thread.run_sync(client, port)
    assert reply == b"INTEROP"
    assert cert == pki.server.cert
    assert seen["identity"] == "spiffe://example.org/client"


def key_share_groups(client_hello: bytes) -> list[int]:
    """The groups a ClientHello (one TLS record) sends key shares for."""
    body = client_hello[5 + 4 :]  # record header, handshake header
    at = 2 + 32  # legacy_version, random
    at += 1 + body[at]  # legacy_session_id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
    at += 1 + body[at]  # legacy_compression_methods
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    while at < end:
        kind, size = (
            int.from_bytes(body[at : at + 2], "big"),
            int.from_bytes(body[at + 2 : at + 4], "big"),
        )
        if kind == 51:  # key_share: a list of (group, key_exchange)
            shares, groups = body[at + 6 : at + 4 + size], []
            while shares:
                groups.append(int.from_bytes(shares[:2], "big"))
                shares = shares[4 + int.from_bytes(shares[2:4], "big") :]
            return groups
        at += 4 + size
    raise AssertionError("no key_share extension")


def test_a_client_sends_one_key_share_the_post_quantum_hybrid(pki):
    conn = SSL.Connection(pki.client_ctx()._ssl, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    assert key_share_groups(conn.bio_read(1 << 16)) == [0x11EC]  # X25519MLKEM768


async def test_tally_peers_agree_on_aes128_gcm_and_the_hybrid(pki):
    client, server = tls_pair(pki.client_ctx(), pki.server_ctx())
    assert await handshake_both(client, server) == {}
    for end in (client, server):
        assert end._conn.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
        assert end._conn.get_group_name() == "X25519MLKEM768"


async def test_a_server_without_the_hybrid_gets_x25519_after_a_retry(pki, tmp_path):
    """The system's OpenSSL 3.0, under the stdlib, has no ML-KEM: it asks for X25519."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*key_files(pki.server, tmp_path / "server"))
    listener = socket.create_server(("127.0.0.1", 0))
    _OPEN_SOCKETS.append(listener)

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            conn.sendall(conn.recv(100).upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, serve)
        transport = await trio.open_tcp_stream(*listener.getsockname())
        client = TLSStream(transport, pki.client_ctx(), server_side=False)
        with trio.fail_after(10):
            await client.send_all(b"retry")
            assert await client.receive_some() == b"RETRY"
        assert client._conn.get_group_name() == "x25519"
        assert client.peer_identity == "spiffe://example.org/server"
        await client.aclose()


async def test_tls12_only_client_is_refused(pki, tmp_path):
    ctx = stdlib_client_context(pki, tmp_path, tls12_only=True)
    outcome = {}

    async def expect_failure(stream):
        with trio.fail_after(10), pytest.raises(TLSError) as info:
            await stream.do_handshake()
        outcome["server"] = str(info.value)

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_one, pki.server_ctx(), expect_failure)
        await trio.to_thread.run_sync(client, port)
    assert "version" in outcome["server"] or "protocol" in outcome["server"]


# -- property: a peer's garbage fails the handshake with our errors only -------------------


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=400), max_size=4), tls_like=st.booleans())
def test_garbage_fails_a_server_handshake_only_with_tls_errors(pki, chunks, tls_like):
    if tls_like and chunks:  # a TLS handshake record header, so OpenSSL parses further
        chunks[0] = b"\x16\x03\x01" + len(chunks[0]).to_bytes(2, "big") + chunks[0]

    async def main():
        client, transport = socket_pair()
        server = TLSStream(transport, pki.server_ctx(), server_side=True)
        for chunk in chunks:
            await client.send_all(chunk)
        await client.send_eof()
        with pytest.raises((TLSError, trio.BrokenResourceError)):
            await server.do_handshake()
        await server.aclose()

    trio.run(main)
