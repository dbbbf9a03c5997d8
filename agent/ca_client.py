"""The agent's side of the CA API: attestation, renewal, entries, signing, bundle.

Rules:

1. The CA is trusted only through the bundle the agent holds, and only as
   ``spiffe://<td>/tally/ca``: a certificate for any other SPIFFE ID, even one
   from our own CA, is refused.  That is what stops a stolen workload SVID from
   impersonating the CA to an agent.
2. Attestation is the one call made without a client certificate; everything
   after it presents the agent SVID (mutual TLS).
3. Kept-alive connections, pooled, carry the calls: the parked entries poll
   holds one (it also brings the bundle: ``ca.api`` rule 7), a call takes an
   idle one or opens one.  A connection idle for `CALL_IDLE_CLOSE` is closed
   (`CAClient.close_idle`): renewals are minutes apart, so between them an
   agent holds one connection to the CA, its poll's, and a fleet of N agents
   costs the CA N descriptors, not 3 N.  When the agent's identity or the
   bundle changes, connections are dropped and the next call handshakes with
   a new context, so a rotated agent SVID is used at once.
4. Errors come out as `CAError` with the CA's stable ``code`` (``evicted``,
   ``attestation_failed``, ...) or ``unreachable``, so callers decide on codes,
   never on message text.
5. **Several CA servers** (`CAServers`): each agent starts on a server picked
   at random, so a fleet spreads over them, and stays there while it answers.
   A call that fails because of the *server* (unreachable, timed out, 5xx,
   ``datastore_unavailable``) is sent at once to the next server it has not
   tried (one not resting if it can: in a rolling restart the only other server
   may still rest from its own restart, and is then the best there is), and the
   failed one rests for a jittered, doubling while (1 s up to
   30 s) before it is tried again; each move is one ``ca.failover`` line.  An
   answer about the *request* (evicted, bad CSR, 429 overloaded) is the same
   from every server and is not retried elsewhere.  A renewal the dead server
   committed but never answered is safe to repeat: the CA accepts the agent's
   previous SVID once more.
6. ``stale_svid`` is fatal to an agent (`agent.renewal.FATAL_CODES`), unless the
   call went out under an identity the agent has since replaced: a poll parked
   before a renewal whose first answer was lost (two serials in one step) wakes
   to a CA that no longer takes the SVID it presented.  That call is sent again,
   once, under the current SVID; a stale answer to the current SVID stands.
7. **Waiting in the CA's line is not a failure.**  In a herd the CA takes first
   contacts in arrival order and keeps a connection's place for up to a minute
   before its handshake (`ca.first_contact`), then closes it unshaken.  So a new
   connection's handshake may take `LINE_WAIT_S`, apart from the call's own
   deadline (``ca_timeout``), which starts once the connection is up; the TCP
   connect keeps ``ca_timeout``, since a server that is down refuses it or never
   answers it.  An agent that gave up after ``ca_timeout`` could give up after its
   turn had come, leaving the CA work it had begun for nothing, and come back at
   the end of the line: 10,000 agents restarting at once made 5.6 connections each,
   and not all were fresh after 300 s (`bench.fleet`).  The cost: a CA that accepts
   connections and never answers them holds an agent `LINE_WAIT_S` before it fails
   over.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.renewal import STALE, EntriesPage
from tally.ops.config import Address
from tally.ops.logs import get_logger
from tally.ops.net import connect
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.tls.contexts import TLSContext, client_context
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected
from tally.wire import http

CA_PATH = ("tally", "ca")
log = get_logger("tally.agent")
FAILOVER_CODES = frozenset({"unreachable", "datastore_unavailable", "bad_response"})
REST_FIRST = 1.0
REST_CAP = 30.0
CALL_IDLE_CLOSE = 5.0
"""Seconds a pooled connection may sit unused before it is closed (rule 3)."""


class CAServers:
    """The CA servers an agent may call: which one it uses now, and which are resting.

    ``clock`` is trio's by default, so the rest periods run on a test's autojump
    clock like every other wait of the agent.
    """

    def __init__(
        self,
        servers: Sequence[Address],
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not servers:
            raise ValueError("at least one CA server")
        self.servers = tuple(servers)
        self.rng = rng or random.Random()
        self.clock: Callable[[], float] = clock or trio.current_time
        self.current = self.rng.randrange(len(self.servers))  # spread the fleet (rule 5)
        self._rest_until = [0.0] * len(self.servers)
        self._failures = [0] * len(self.servers)

    def resting(self, i: int) -> bool:
        return self.clock() < self._rest_until[i]

    def rest_left(self, i: int) -> float:
        return max(0.0, self._rest_until[i] - self.clock())

    def pick(self, tried: Collection[int] = ()) -> int:
        """The server to call now: the current one unless it rests, else the next that
        does not, else (all resting) the one whose rest ends first.  A call that has
        ``tried`` some servers takes one it has not tried, resting or not, while there
        is one: a rest keeps calls off a server while another answers, and one that
        just failed does not."""
        n = len(self.servers)
        left = [i for i in range(n) if i not in tried] or list(range(n))
        for offset in range(n):
            i = (self.current + offset) % n
            if i in left and not self.resting(i):
                self.current = i
                return i
        self.current = min(left, key=lambda i: self._rest_until[i])
        return self.current

    def failed(self, i: int) -> float:
        """Rest server ``i``: 1 s, 2 s, 4 s ... up to 30 s, each times 0.5 to 1.5."""
        self._failures[i] += 1
        base = min(REST_CAP, REST_FIRST * 2.0 ** min(self._failures[i] - 1, 16))
        rest = base * (0.5 + self.rng.random())
        self._rest_until[i] = self.clock() + rest
        return rest

    def succeeded(self, i: int) -> None:
        self._failures[i] = 0
        self._rest_until[i] = 0.0


class CAError(Exception):
    """A refused or failed CA call; ``retry_after`` is the CA's ``Retry-After`` in
    seconds when it said how long to stay away (429 when it is overloaded)."""

    def __init__(
        self, code: str, message: str, status: int = 0, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delay form only), bounded to an hour."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not seconds >= 0:  # also NaN
        return None
    return min(seconds, 3600.0)


@dataclass(frozen=True)
class Issued:
    spiffe_id: str
    serial: str
    chain: tuple[x509.Certificate, ...]


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR carries only the public key; the CA decides everything else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


LINE_WAIT_S = 75.0
"""Longest a new connection's handshake may take (rule 7): more than the CA's longest
wait for a turn (`ca.server.FIRST_CONTACT_WAIT_S`, 60 s) and its handshake deadline
after it (``handshake_timeout``, 10 s), so that it is the CA that ends a wait."""


def _issued(data: dict[str, Any]) -> Issued:
    chain = tuple(pem.chain_from_pem(str(data["cert_chain"]).encode()))
    return Issued(str(data["spiffe_id"]), str(data["serial"]), chain)


class CAClient:
    """Calls to the CA, each on a kept-alive connection of its own.

    The agent's loops run at once (the entries long poll, signing, renewal), so
    connections are pooled: a call takes an idle one or opens one, and gives it
    back when done; `close_idle` closes those left unused (rule 3).  A new
    identity or bundle bumps the generation, and connections from an older
    generation are closed instead of reused.
    """

    def __init__(
        self,
        server: Address | Sequence[Address] | CAServers,
        trust_domain: TrustDomain,
        roots: Sequence[x509.Certificate],
        *,
        timeout: float = 15,
    ) -> None:
        if isinstance(server, CAServers):
            self.servers = server
        else:
            self.servers = CAServers([server] if isinstance(server, Address) else server)
        self.td = trust_domain
        self.ca_id = SpiffeId.from_parts(trust_domain, *CA_PATH)
        self.timeout = timeout
        self._roots = tuple(roots)
        self._identity: tuple[tuple[x509.Certificate, ...], ec.EllipticCurvePrivateKey] | None = (
            None
        )
        self._generation = 0
        self._ctx: TLSContext | None = None
        self._idle: list[tuple[int, int, http.HttpClient, float]] = []
        """(generation, server, connection, trio time it was given back)."""
        self._retired: list[http.HttpClient] = []
        self._returned = trio.Event()

    def set_roots(self, roots: Sequence[x509.Certificate]) -> None:
        if tuple(roots) != self._roots:
            self._roots = tuple(roots)
            self._new_generation()

    def set_identity(
        self, chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey
    ) -> None:
        self._identity = (tuple(chain), key)
        self._new_generation()

    def clear_identity(self) -> None:
        """Back to server-authenticated TLS only, for a fresh attestation."""
        self._identity = None
        self._new_generation()

    def _new_generation(self) -> None:
        # Synchronous callers cannot await a close; the next call closes them.
        self._generation += 1
        self._ctx = None
        self._retired.extend(client for _, _, client, _ in self._idle)
        self._idle.clear()

    @property
    def pooled(self) -> int:
        """Connections open and idle in the pool now (rule 3)."""
        return len(self._idle)

    @property
    def server(self) -> Address:
        """The CA server calls go to now."""
        return self.servers.servers[self.servers.current]

    def _verify_ca(self, chain: list[x509.Certificate]) -> object:
        try:
            sid = x509profile.validate_leaf(chain[0])
        except x509profile.ProfileError as exc:
            raise PeerRejected(exc.reason, str(exc)) from exc
        if sid != self.ca_id:
            raise PeerRejected("not_allowed", f"expected the CA ({self.ca_id}), got {sid}")
        return sid

    def _context(self) -> TLSContext:
        if self._ctx is None:
            if self._identity is None:
                self._ctx = client_context(roots=self._roots, verifier=self._verify_ca)
            else:
                chain, key = self._identity
                self._ctx = client_context(
                    roots=self._roots, chain=chain, key=key, verifier=self._verify_ca
                )
        return self._ctx

    async def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for client in retired:
            with trio.move_on_after(1):
                await client.aclose()

    async def close_idle(self, after: float = CALL_IDLE_CLOSE) -> None:
        """Close pooled connections unused for ``after`` seconds; runs until cancelled.

        The agent runs it beside its loops (rule 3).  Only idle connections are
        closed: the parked poll's is checked out, and comes back for an instant
        between two polls.
        """
        while True:
            now = trio.current_time()
            fresh = [c for c in self._idle if now - c[3] < after]
            if len(fresh) != len(self._idle):
                self._retired.extend(c[2] for c in self._idle if now - c[3] >= after)
                self._idle[:] = fresh
                await self._close_retired()
                continue
            self._returned = trio.Event()
            if not self._idle:
                await self._returned.wait()
                continue
            await trio.sleep_until(min(c[3] for c in self._idle) + after)

    def _checkout(self, i: int) -> tuple[int, http.HttpClient]:
        keep: list[tuple[int, int, http.HttpClient, float]] = []
        found: http.HttpClient | None = None
        while self._idle:
            generation, where, client, since = self._idle.pop()
            if generation != self._generation:
                self._retired.append(client)
            elif where == i and found is None:
                found = client
            else:
                keep.append((generation, where, client, since))
        self._idle.extend(reversed(keep))
        if found is not None:
            return self._generation, found
        ctx = self._context()
        address = self.servers.servers[i]

        async def open_stream() -> trio.abc.Stream:
            with trio.fail_after(self.timeout):
                raw = await connect(address)
            stream = TLSStream(raw, ctx, server_side=False)
            try:
                with trio.fail_after(LINE_WAIT_S):  # rule 7
                    await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(raw)
                raise
            return stream

        return self._generation, http.HttpClient(open_stream)

    async def _call(
        self, method: str, target: str, body: object | None = None, *, wait: float = 0
    ) -> Any:
        """One call, moved to another CA server when this one fails (rule 5)."""
        servers = self.servers
        tried: set[int] = set()
        resent = False
        while True:
            before = servers.current
            i = servers.pick(tried)
            if i != before:
                # The server this agent used rests after a failure (an earlier call
                # gave up on it): moving on is a failover too, and rule 5 logs each.
                log.warning(
                    "ca.failover",
                    **{"from": str(servers.servers[before]), "to": str(servers.servers[i])},
                    reason="resting",
                    detail=f"CA at {servers.servers[before]} failed a moment ago",
                    rest_seconds=round(servers.rest_left(before), 2),
                )
            sent_under = self._generation
            try:
                data = await self._call_one(i, method, target, body, wait=wait)
            except CAError as exc:
                if exc.code == STALE and sent_under != self._generation and not resent:
                    resent = True  # rule 6: sent under an SVID replaced meanwhile
                    continue
                if exc.code not in FAILOVER_CODES and exc.status < 500:
                    raise
                rest = servers.failed(i)
                tried.add(i)
                nxt = servers.pick(tried)
                if nxt != i:  # the next call goes there, even when this one gives up
                    log.warning(
                        "ca.failover",
                        **{"from": str(servers.servers[i]), "to": str(servers.servers[nxt])},
                        reason=exc.code,
                        detail=exc.message,
                        rest_seconds=round(rest, 2),
                    )
                if nxt in tried:
                    raise
                continue
            servers.succeeded(i)
            return data

    async def _call_one(
        self, i: int, method: str, target: str, body: object | None = None, *, wait: float = 0
    ) -> Any:
        await self._close_retired()
        generation, client = self._checkout(i)
        address = self.servers.servers[i]
        try:
            resp = await client.request(
                method,
                target,
                json_body=body,
                timeout=self.timeout + wait,
                connect_timeout=self.timeout + LINE_WAIT_S,
            )
        except http.HttpClientError as exc:
            self._retired.append(client)
            cause = exc.__cause__
            if isinstance(cause, PeerRejected):
                raise CAError("ca_rejected", f"the CA's certificate was refused: {cause}") from exc
            raise CAError("unreachable", f"CA at {address} unreachable: {exc}") from exc
        except BaseException:
            self._retired.append(client)
            raise
        if generation == self._generation:
            self._idle.append((generation, i, client, trio.current_time()))
            self._returned.set()
        else:
            self._retired.append(client)
        try:
            data = resp.json()
        except ValueError as exc:
            raise CAError(
                "bad_response",
                f"CA answered {resp.status} with a body that is not JSON",
                resp.status,
            ) from exc
        if resp.status >= 400:
            code = str(data.get("code", "error")) if isinstance(data, dict) else "error"
            message = str(data.get("error", "")) if isinstance(data, dict) else ""
            raise CAError(
                code,
                message or f"CA answered {resp.status}",
                resp.status,
                _retry_after(resp.header("retry-after")),
            )
        return data

    async def attest(
        self, token: str, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Issued, bytes, int]:
        data = await self._call("POST", "/v1/attest", {"token": token, "csr": make_csr(key)})
        return _issued(data), str(data["bundle"]).encode(), int(data["bundle_sequence"])

    async def renew(self, key: ec.EllipticCurvePrivateKey) -> Issued:
        return _issued(await self._call("POST", "/v1/agent/renew", {"csr": make_csr(key)}))

    async def entries(self, since: int = -1, wait: float = 0) -> tuple[int, list[dict[str, Any]]]:
        q = urlencode({"since": since, "wait": wait})
        data = await self._call("GET", f"/v1/entries?{q}", wait=wait)
        return int(data["revision"]), list(data["entries"])

    async def entries_sync(
        self,
        since: int = -1,
        wait: float = 0,
        after: str = "",
        limit: int | None = None,
        bundle: int | None = None,
    ) -> EntriesPage:
        """One page of the delta sync (``agent.renewal.EntrySync`` says what to ask).

        With ``bundle`` (the sequence held), the poll also ends on a new bundle and
        the page carries it (`EntriesPage.bundle`; ``ca.api`` rule 7).
        """
        query: dict[str, object] = {"since": since, "wait": wait, "delta": 1}
        if bundle is not None:
            query["bundle"] = bundle
        if after:
            query["after"] = after
        if limit is not None:
            query["limit"] = limit
        data = await self._call("GET", f"/v1/entries?{urlencode(query)}", wait=wait)
        if not isinstance(data, dict):
            raise CAError("bad_response", "the CA's entries answer is not a JSON object")
        try:
            return EntriesPage.from_json(data)
        except (KeyError, ValueError) as exc:
            raise CAError("bad_response", f"the CA's entries answer is malformed: {exc}") from exc

    async def sign(self, requests: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        body = {"csrs": [{"entry_id": entry_id, "csr": csr} for entry_id, csr in requests]}
        data = await self._call("POST", "/v1/svids", body)
        results: list[dict[str, Any]] = []
        for item in data["svids"]:
            if "cert_chain" in item:
                item = {**item, "chain": _issued(item).chain}
            results.append(item)
        return results

    async def jwt(self, entry_id: str, audience: Sequence[str]) -> str:
        """A JWT-SVID for one of this agent's entries; the token is a bearer credential."""
        data = await self._call("POST", "/v1/jwt", {"entry_id": entry_id, "audience": audience})
        return str(data["token"])

    async def aclose(self) -> None:
        self._retired.extend(client for _, _, client, _ in self._idle)
        self._idle.clear()
        await self._close_retired()
