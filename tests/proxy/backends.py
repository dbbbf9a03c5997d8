"""Tiny services for the proxy to front: an HTTP/1.1 server on h11 and a TCP echo, in threads.

Both run on blocking sockets in daemon threads so that they are plainly
independent of the trio code under test.  The HTTP service records every
request it saw (path and headers), which is how the tests check what the
proxy passed on.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import h11

PATTERN = bytes(range(256)) * 256  # 64 KiB


def blob(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class _Server:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_safely, args=(conn,), daemon=True).start()

    def _serve_safely(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.serve(conn)
            except (OSError, h11.ProtocolError):
                pass

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class EchoServer(_Server):
    """Echoes bytes until the peer half-closes, then half-closes too."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        self.connections += 1
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


class HttpServer(_Server):
    """/blob?size=N[&chunked=1] sends N bytes; /slow?until=EPOCH answers then; anything
    else answers JSON with the request's headers and the SHA-256 and length of its body.
    ``hangup=1`` anywhere in the path closes the connection after the answer."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.connections = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        self.connections += 1
        h = h11.Connection(h11.SERVER)
        while True:
            request = self._next(h, conn)
            if not isinstance(request, h11.Request):
                return
            seen = Seen(
                request.method.decode(),
                request.target.decode(),
                [(k.decode(), v.decode()) for k, v in request.headers],
            )
            self.seen.append(seen)
            digest = hashlib.sha256()
            length = 0
            while True:
                event = self._next(h, conn)
                if isinstance(event, h11.Data):
                    digest.update(event.data)
                    length += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            self._respond(h, conn, seen, digest.hexdigest(), length)
            if "hangup=1" in seen.path:  # as a keep-alive timeout does: close, unannounced
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            h.start_next_cycle()

    @staticmethod
    def _next(h: h11.Connection, conn: socket.socket) -> object:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(conn.recv(65536))

    def _respond(
        self, h: h11.Connection, conn: socket.socket, seen: Seen, digest: str, length: int
    ) -> None:
        url = urlsplit(seen.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/blob":
            size = int(query["size"])
            chunked = query.get("chunked") == "1"
            headers = (
                [("transfer-encoding", "chunked")] if chunked else [("content-length", str(size))]
            )
            conn.sendall(h.send(h11.Response(status_code=200, headers=headers)))
            # Chunk by chunk (each the start of PATTERN, as blob() is): a 1 GiB body
            # must start at once, not after seconds spent building it in memory.
            for start in range(0, size, len(PATTERN)):
                chunk = PATTERN[: min(len(PATTERN), size - start)]
                conn.sendall(h.send(h11.Data(data=chunk)))
            conn.sendall(h.send(h11.EndOfMessage()))
            return
        if url.path == "/slow":
            time.sleep(max(0.0, float(query["until"]) - time.time()))
        body = json.dumps(
            {"sha256": digest, "length": length, "headers": seen.headers, "path": seen.path}
        ).encode()
        conn.sendall(
            h.send(
                h11.Response(
                    status_code=int(query.get("status", "200")),
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
            )
        )
        conn.sendall(h.send(h11.Data(data=body)))
        conn.sendall(h.send(h11.EndOfMessage()))
