"""A spiffe-tls (`spiffetls`) peer in a process of its own, fed by a Tally agent.

    python -m tests.e2e.spiffe_tls_peer client SOCKET SPIFFE_ID ADDRESS SERVER_ID
    python -m tests.e2e.spiffe_tls_peer server SOCKET SPIFFE_ID

Both take their SVID (the one named SPIFFE_ID) and bundle from an `X509Source`
on the agent's Workload API socket; py-spiffe's protobuf module must not share
a process with Tally's (spiffe-spec.md pitfall 1).  Like a Tally daemon, the
peer writes one JSON object per line on stderr with an ``event`` key, so that
`tally.app.launch.Daemon` reads it and tests wait on its events:

- ``peer.started`` once the source is ready, with its SVID's ``serial`` (the
  server adds ``listen``);
- client: ``request`` for each request, a new `spiffetls.dial` each time with
  the server's ID authorized, ``ok`` and the serials (hex) of both leaves the
  handshake used, or the ``error``; it runs until SIGTERM;
- server: ``served`` for each answered request (``serial`` presented, the
  source's ``current`` serial, the client's ``peer_id``), ``handshake.failed``
  with OpenSSL's reason; the answer is ``hello <path> from spiffe-tls``;
- ``source.updated`` with the new serial when the agent pushes an SVID, and
  ``log`` for each warning or error py-spiffe or spiffe-tls logs (the client
  reports each distinct message once, since it repeats one per connection ever
  dialled: see below).

What the library does with a rotation (spiffe-tls 0.4.0 on pyOpenSSL 26):
every `dial` and `listen` builds a new pyOpenSSL `Context` from the source's
SVID at that moment and subscribes it to the source's updates.  pyOpenSSL 26
refuses to change a `Context` that has made a connection, so each update
callback fails (logged by py-spiffe, then ignored).  A client still presents
the current SVID on each new dial; a listener keeps presenting the SVID it
started with.

Every wait has a deadline: the client arms an interval timer around each
request, the server runs its connections non-blocking with a deadline each.
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

# As the suite's pytest config: any warning is an error, except these four, which
# spiffe-tls 0.4.0 itself triggers: it hands pyOpenSSL X509 and PKey objects to a
# Context (use_certificate, add_extra_chain_cert, use_privatekey), deprecated by
# pyOpenSSL 26, and reads X509Source.svid and .bundles, deprecated by py-spiffe 0.3.2.
warnings.simplefilter("error")
for _message in (
    "Passing pyOpenSSL X509 objects is deprecated",
    "Passing pyOpenSSL PKey objects is deprecated",
    "X509Source.svid is deprecated",
    "X509Source.bundles is deprecated",
):
    warnings.filterwarnings("ignore", message=_message, category=DeprecationWarning)

from cryptography import x509  # noqa: E402
from OpenSSL import SSL  # noqa: E402
from spiffe import SpiffeId, X509Source  # noqa: E402
from spiffe.svid.x509_svid import X509Svid  # noqa: E402
from spiffetls import ListenOptions, ServerTlsMode, dial, listen  # noqa: E402
from spiffetls.tlsconfig.authorize import authorize_any, authorize_id  # noqa: E402

REQUEST_TIMEOUT = 10.0
PACE = 0.02
"""Seconds between the client's requests, so two shared cores keep up with the daemons."""

_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _out:
        print(
            json.dumps({"event": event, "ts": time.time(), **fields}), file=sys.stderr, flush=True
        )


class Logged(logging.Handler):
    """py-spiffe's and spiffe-tls's warnings and errors as ``log`` events."""

    def __init__(self, once: bool) -> None:
        super().__init__(logging.WARNING)
        self.once = once
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:200]
        if not self.once or message not in self.seen:
            self.seen.add(message)
            emit("log", logger=record.name, level=record.levelname, message=message)


def hex_serial(cert: Any) -> str:
    return format(cert.serial_number, "x") if cert is not None else ""


def current(source: X509Source) -> str:
    """The serial of the SVID the source holds now."""
    return hex_serial(source.get_x509_context().default_svid.leaf)


def open_source(socket: str, spiffe_id: str) -> X509Source:
    def pick(svids: list[X509Svid]) -> X509Svid:
        return next(s for s in svids if str(s.spiffe_id) == spiffe_id)

    source = X509Source(
        socket_path=f"unix://{socket}", timeout_in_seconds=REQUEST_TIMEOUT, svid_picker=pick
    )
    source.subscribe_for_updates(lambda: emit("source.updated", serial=current(source)))
    return source


# -- client --------------------------------------------------------------------------------


def _alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError(f"no answer within {REQUEST_TIMEOUT}s")


def request(source: X509Source, address: str, server_id: SpiffeId, path: str) -> dict[str, Any]:
    """One request on a new connection; what it saw, or raises."""
    conn = dial(address, source, authorize_fn=authorize_id(server_id))
    try:
        own = hex_serial(conn.get_certificate(as_cryptography=True))
        peer = hex_serial(conn.get_peer_certificate(as_cryptography=True))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        conn.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") or not body.startswith(f"hello {path}".encode()):
        raise ValueError(f"bad answer: {answer[:120]!r}")
    return {"own_serial": own, "peer_serial": peer}


def run_client(source: X509Source, address: str, server_id: str) -> None:
    signal.signal(signal.SIGALRM, _alarm)
    expected = SpiffeId(server_id)
    emit("peer.started", serial=current(source))
    i = 0
    while True:
        path = f"/spiffe-tls/{i}"
        signal.setitimer(signal.ITIMER_REAL, REQUEST_TIMEOUT)
        try:
            seen = request(source, address, expected, path)
        except Exception as exc:  # every failure is reported, none ends the run
            emit("request", i=i, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            emit("request", i=i, ok=True, **seen)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        i += 1
        time.sleep(PACE)


# -- server --------------------------------------------------------------------------------

T = TypeVar("T")


def before(deadline: float, conn: SSL.Connection, step: Callable[[], T]) -> T:
    """Run one non-blocking OpenSSL step to completion, waiting on the socket up to deadline."""
    while True:
        want: tuple[list[SSL.Connection], list[SSL.Connection]]
        try:
            return step()
        except SSL.WantReadError:
            want = ([conn], [])
        except SSL.WantWriteError:
            want = ([], [conn])
        if not any(select.select(*want, [], max(0.0, deadline - time.monotonic()))):
            raise TimeoutError(f"no progress within {REQUEST_TIMEOUT}s")


def serve_one(source: X509Source, conn: SSL.Connection) -> None:
    deadline = time.monotonic() + REQUEST_TIMEOUT
    try:
        conn.setblocking(False)
        try:
            before(deadline, conn, conn.do_handshake)
        except (SSL.Error, OSError, TimeoutError) as exc:
            emit("handshake.failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = before(deadline, conn, lambda: conn.recv(65536))
            if not chunk:
                return
            head += chunk
        path = head.split(b" ", 2)[1].decode()
        body = f"hello {path} from spiffe-tls".encode()
        before(
            deadline,
            conn,
            lambda: conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            ),
        )
        peer = conn.get_peer_certificate(as_cryptography=True)
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName) if peer else None
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier) if san else []
        emit(
            "served",
            path=path,
            serial=hex_serial(conn.get_certificate(as_cryptography=True)),
            current=current(source),
            peer_id=uris[0] if uris else "",
        )
        before(deadline, conn, conn.shutdown)
    except (SSL.Error, OSError, TimeoutError) as exc:
        emit("connection.failed", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        conn.close()


def run_server(source: X509Source) -> None:
    listener = listen(
        "127.0.0.1:0",
        source,
        ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_any(), backlog=64),
    )
    host, port = listener.getsockname()
    emit("peer.started", listen=f"{host}:{port}", serial=current(source))
    while True:
        conn, _addr = listener.accept()
        threading.Thread(target=serve_one, args=(source, conn), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("client", "server"))
    parser.add_argument("socket")
    parser.add_argument("spiffe_id")
    parser.add_argument("address", nargs="?")
    parser.add_argument("server_id", nargs="?")
    args = parser.parse_args()
    handler = Logged(once=args.mode == "client")
    logging.getLogger("spiffe").addHandler(handler)
    logging.getLogger("spiffetls").addHandler(handler)
    source = open_source(args.socket, args.spiffe_id)
    if args.mode == "client":
        if args.address is None or args.server_id is None:
            parser.error("client needs ADDRESS and SERVER_ID")
        run_client(source, args.address, args.server_id)
    else:
        run_server(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
