"""The two HTTP front doors of the CA: the agent API (mTLS) and the admin API (Unix socket).

Rules:

1. Handlers read the request through `ca.messages`, hand the decision to
   `Authority` in the store's worker thread (a batch of CSRs in two steps, planned
   and then recorded there, signed between in `ca.signing_pool`), answer with
   `ca.messages`' JSON, and turn `Denied` into a JSON error with a stable ``code``.  Nothing here
   decides who may do what, except which door a request came through: the
   agent door knows the caller only by the SPIFFE ID its verified certificate
   carries; the admin door only by the uid the kernel reports for the
   socket's peer.
2. Long polls (``wait``) are bounded (at most `MAX_WAIT` seconds) and are
   woken by the change feed (`ca.feed`), so a new entry or bundle reaches a
   waiting agent at once instead of on the next poll, and a change wakes only
   the agents it concerns: a renewal its own agent, an entry change the
   agents it moves in or out of, a bundle change every parked poll once.
6. ``/v1/entries?delta=1`` is the delta sync (`Authority.entries_since`):
   answers are pages of at most `ENTRY_PAGE` entries, changes since the
   revision the agent holds, or the whole set again when the change log no
   longer reaches back that far.
3. The wire format is documented in ``docs/ca-api.md``; keep them in step.
4. Refusals on the agent door that say something about the peer rather than
   the request (no certificate at all, an agent SVID that has been replaced)
   are reported through ``on_denied``, like the server's handshake refusals:
   one ``peer.denied`` line and one count by reason each.
5. A caller or a target that is refused is refused before anything is said
   about the rest of the body: an agent's batch of CSRs is read after the
   agent is judged, an entry's changes after the entry is found.
7. **One parked poll per agent.**  ``/v1/entries?bundle=<sequence>`` also
   ends when the bundle's sequence is not ``<sequence>`` and then carries the
   bundle (as ``/v1/bundle`` has it), so an agent parks this one poll and not
   a second for the bundle: 10,000 agents hold 10,000 connections, not 20,000.
   Hearing of the bundle costs no datastore hop (it is in memory).  The
   server wakes every parked entries poll once on a bundle change;
   ``/v1/bundle?wait=`` stays, for agents that predate this and for tools.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ca import messages
from ca.anchor import Anchor, AnchorError, AnchorKey, anchor_from
from ca.audit import Seen, VerifyResult
from ca.authority import ENTRY_PAGE, AgentStatus, Authority, Denied, EntrySync, SignPlan
from ca.cluster import Membership
from ca.engines import StoreUnavailable
from ca.feed import BUNDLE, ChangeFeed, concerned_agents
from ca.keys import CAKeyError
from ca.signing_pool import SigningPool
from ca.store import AgentRecord, EntryRecord
from tally.spiffe.jwt import with_jwt_keys
from tally.spiffe.spiffeid import SpiffeId
from tally.wire import http

T = TypeVar("T")

# reason, detail, the SPIFFE ID the certificate claimed, the peer's address
DeniedHook = Callable[[str, str, SpiffeId | None, str], None]
# Denial codes that describe the peer, and the peer.denied reason each is logged under.
_PEER_REASONS = {"no_client_certificate": "no_certificate", "stale_svid": "stale_svid"}


class RunSync(Protocol):
    """Runs a blocking call in the store's worker thread."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


UNAVAILABLE = Denied(
    503,
    "datastore_unavailable",
    "this CA server cannot reach its datastore and signs nothing; try another server",
    retry_after=2,
)
"""What an agent hears while the database is away: nothing signed, nothing unrecorded."""
MAX_WAIT = 55.0
MAX_BATCH = 1000
"""Most entries one ``POST /v1/entries/batch`` creates."""


def _error(exc: Denied) -> http.Response:
    body = http.Response.json({"error": exc.message, "code": exc.code}, status=exc.status)
    if exc.retry_after is None:
        return body
    return http.Response(body.status, body.body, headers=(("Retry-After", str(exc.retry_after)),))


def _wait_param(req: http.Request) -> float:
    raw = req.query.get("wait", "0")
    try:
        value = float(raw)
    except ValueError:
        raise Denied(400, "bad_request", "wait must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise Denied(400, "bad_request", "wait must be a number of seconds")
    return min(value, MAX_WAIT)


def entry_sync_json(page: EntrySync) -> dict[str, object]:
    """The wire form of one page of the delta sync (``docs/ca-api.md``)."""
    body: dict[str, object] = {
        "revision": page.revision,
        "full": page.full,
        "entries": [messages.entry_json(e) for e in page.entries],
        "deleted": list(page.deleted),
        "more": page.more,
    }
    if page.cursor is not None:
        body["cursor"] = page.cursor
    return body


def _int_param(req: http.Request, name: str, default: int = -1) -> int:
    raw = req.query.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise Denied(400, "bad_request", f"{name} must be an integer") from None
    if not -(2**63) <= value < 2**63:  # what SQLite can hold
        raise Denied(400, "bad_request", f"{name} must fit in 64 bits")
    return value


@dataclass(frozen=True)
class AgentPeer:
    """Who is calling on the agent API: a verified agent SVID, or nobody yet."""

    spiffe_id: SpiffeId | None
    serial: str | None
    address: str


class AgentApi:
    def __init__(
        self,
        authority: Authority,
        run: RunSync,
        entries: ChangeFeed,
        bundle: ChangeFeed,
        on_denied: DeniedHook = lambda reason, detail, peer_id, address: None,
        overloaded: Callable[[], int | None] = lambda: None,
        signing: SigningPool | None = None,
    ) -> None:
        self.signing = SigningPool(0) if signing is None else signing
        self.overloaded = overloaded
        self.refused_overloaded = 0
        self.authority = authority
        self.run = run
        self.entries = entries
        self.bundle = bundle
        self.on_denied = on_denied

    async def handle(self, peer: AgentPeer, req: http.Request) -> http.Response:
        try:
            return await self._route(peer, req)
        except StoreUnavailable:
            return _error(UNAVAILABLE)
        except Denied as exc:
            reason = _PEER_REASONS.get(exc.code)
            if reason is not None:
                shown = f" with serial {peer.serial}" if peer.serial is not None else ""
                detail = f"{req.method} {req.path}{shown}: {exc.message}"
                self.on_denied(reason, detail, peer.spiffe_id, peer.address)
            return _error(exc)

    def _agent(self, peer: AgentPeer) -> tuple[SpiffeId, str]:
        if peer.spiffe_id is None or peer.serial is None:
            raise Denied(401, "no_client_certificate", "this call needs the agent's SVID (mTLS)")
        return peer.spiffe_id, peer.serial

    async def _route(self, peer: AgentPeer, req: http.Request) -> http.Response:
        a = self.authority
        J = http.Response.json
        route = (req.method, req.path)
        if route != ("GET", "/v1/bundle") and (wait := self.overloaded()) is not None:
            # Admission control (`ca.throttle.overload_retry_after`): the bundle is
            # served from memory, everything else would queue for the datastore.
            self.refused_overloaded += 1
            raise Denied(429, "overloaded", f"the CA is busy; retry in {wait}s", retry_after=wait)
        if route == ("POST", "/v1/attest"):
            body = messages.body_object(req)
            token = messages.text_or_none(body.get("token"))
            csr = messages.text_or_none(body.get("csr"))
            attested = await self.run(lambda: a.attest(token, csr, peer.address))
            return J(messages.attested_json(attested))
        if route == ("GET", "/v1/bundle"):
            since = _int_param(req, "since")

            async def bundle_changed() -> bool:
                return (a.keys.bundle is not None) and a.keys.bundle.sequence != since

            await self.bundle.wait_until(BUNDLE, bundle_changed, _wait_param(req))
            return J({**messages.bundle_json(a.bundle()), **messages.jwt_bundle_json(a)})
        agent_id, serial = self._agent(peer)
        if route == ("POST", "/v1/agent/renew"):
            csr = messages.text_or_none(messages.body_object(req).get("csr"))
            issued = await self.run(lambda: a.renew_agent(agent_id, serial, csr))
            # Ends the agent's own long poll (see below) while its certificate is still
            # accepted as the previous one; no other agent's poll hears of it.
            self.entries.wake([str(agent_id)], "renewal")
            return J(messages.svid_json(issued))
        if route == ("GET", "/v1/entries"):
            since = _int_param(req, "since")
            delta = req.query.get("delta") == "1"
            after = req.query.get("after", "")
            limit = _int_param(req, "limit", ENTRY_PAGE)
            aid = str(agent_id)
            first = [True]
            checked_at = [since]  # the committed revision when the last check began
            # The bundle rides on the entries poll (rule 7): one parked poll per agent.
            bundle_since = _int_param(req, "bundle") if "bundle" in req.query else None

            def bundle_news() -> dict[str, object]:
                """The bundle, when the agent asked with a sequence that is no longer it."""
                current = a.keys.bundle
                if bundle_since is None or current is None or current.sequence == bundle_since:
                    return {}
                return {**messages.bundle_json(a.bundle()), **messages.jwt_bundle_json(a)}

            def changed() -> bool:
                # Read before the query, in the one thread that commits: every change up to
                # it is seen by the query; one after it has a later revision.
                checked_at[0] = a.store.committed_entries_revision
                if first[0]:  # the agent is judged in the same worker hop as the first check
                    first[0] = False
                    agent: AgentRecord | None = a.check_agent(agent_id, serial)
                else:
                    agent = a.store.get_agent(aid)
                # An eviction or ban ends the wait too, so the agent hears of it at once.
                # So does a renewal: the answer is judged on this call's certificate, which
                # must not be two renewals old by then.
                current = agent is not None and agent.status == "active" and agent.serial == serial
                return a.store.entries_changed_for(aid, since) or not current

            async def entries_changed() -> bool:
                if bundle_news():  # in memory: no datastore hop to hear of a new bundle
                    return True
                return await self.run(changed)

            told = (since, serial, bundle_since) if delta and since >= 0 and not after else None
            quiet = await self.entries.wait_until(aid, entries_changed, _wait_param(req), told)
            if delta and quiet:
                # Nothing for this agent since the last check (it would have woken us), so
                # it stands at the revision committed when that check began: no datastore
                # hop to say so.  Not the latest: a change committed since then may not
                # have woken us yet (its wake-up follows its commit).
                now_at = max(since, checked_at[0])
                self.entries.note_quiet(aid, (now_at, serial, bundle_since))  # feed rule 4
                return J(entry_sync_json(EntrySync(now_at, False, (), (), False)))
            if delta:
                page = await self.run(
                    lambda: a.entries_since(agent_id, serial, since, after, limit)
                )
                return J({**entry_sync_json(page), **bundle_news()})
            view = await self.run(lambda: a.entries_for(agent_id, serial))
            return J({**messages.agent_entries_json(view), **bundle_news()})
        if route == ("POST", "/v1/svids"):
            csrs = messages.body_object(req).get("csrs")

            def plan() -> SignPlan:
                a.check_agent(agent_id, serial)  # before a word about the CSRs (rule 5)
                return a.plan_batch(agent_id, serial, messages.sign_requests(csrs))

            batch = await self.run(plan)
            signed = await self.signing.sign(batch.signer, batch.jobs)
            results = await self.run(lambda: a.record_batch(batch, signed))
            return J(messages.signed_json(csrs, results))
        if route == ("POST", "/v1/jwt"):
            body = messages.body_object(req)
            entry_id = messages.text_or_none(body.get("entry_id"))
            audience = messages.audience(body.get("audience"))
            svid = await self.run(lambda: a.sign_jwt(agent_id, serial, entry_id, audience))
            return J(messages.jwt_json(svid))
        raise Denied(404, "not_found", f"no such call: {req.method} {req.path}")


class AdminApi:
    def __init__(
        self,
        authority: Authority,
        run: RunSync,
        on_entries_changed: Callable[[Iterable[str], str], object],
        on_keys_changed: Callable[[], Awaitable[None]],
        health: Callable[[], dict[str, object]],
        *,
        anchor_key: AnchorKey | None = None,
        anchor_now: Callable[[str], Awaitable[Anchor | None]] | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.membership = membership
        self.authority = authority
        self.run = run
        self.on_entries_changed = on_entries_changed
        self.on_keys_changed = on_keys_changed
        self.health = health
        self.anchor_key = anchor_key
        self.anchor_now = anchor_now

    async def handle(self, uid: int, req: http.Request) -> http.Response:
        try:
            return await self._route(f"admin:uid={uid}", req)
        except StoreUnavailable as exc:
            return _error(Denied(503, "datastore_unavailable", str(exc), retry_after=2))
        except Denied as exc:
            return _error(exc)

    async def _verify_against(self, body: dict[str, object]) -> dict[str, object]:
        """The chain checked against anchors (`ca.anchor`), each first proven ours."""
        raw = body.get("anchors")
        if not isinstance(raw, list) or not raw:
            raise Denied(400, "bad_request", "anchors must be a non-empty list")
        if self.anchor_key is None:
            raise Denied(409, "no_anchor_key", "this CA has no audit anchor key")
        seen: list[Seen] = []
        for index, obj in enumerate(raw):
            if not isinstance(obj, dict):
                raise Denied(400, "bad_request", f"anchor {index + 1} is not an object")
            try:
                anchor = anchor_from(obj, f"anchor {index + 1}")
            except AnchorError as exc:
                raise Denied(400, "bad_request", str(exc)) from None
            problem = self.anchor_key.problem(anchor, str(self.authority.td))
            if problem is not None:
                return messages.verify_json(VerifyResult(False, 0, anchor.seq, problem))
            seen.append(Seen(anchor.seq, anchor.hash, anchor.at))
        result = await self.run(lambda: self.authority.store.verify_audit(seen))
        return {**messages.verify_json(result), "anchors": len(seen)}

    async def _route(self, actor: str, req: http.Request) -> http.Response:
        a = self.authority
        method, path, q = req.method, req.path, req.query
        J = http.Response.json
        if (method, path) == ("GET", "/v1/health"):
            return J(self.health())
        if (method, path) == ("POST", "/v1/tokens"):
            body = messages.body_object(req)
            sid = messages.token_spiffe_id(body.get("spiffe_id"))
            ttl = messages.token_ttl(body.get("ttl"))
            token = await self.run(lambda: a.create_token(sid, ttl, actor))
            return J(messages.token_json(token))
        if path == "/v1/entries":
            if method == "POST":
                spec = messages.entry_spec(messages.body_object(req))
                created = await self.run(lambda: a.create_entry(spec, actor))
                self.on_entries_changed(concerned_agents(None, created), "entry")
                return J(messages.entry_json(created), status=201)
            if method == "GET":
                entries = await self.run(
                    lambda: a.store.list_entries(
                        spiffe_id=q.get("spiffe_id"), parent_id=q.get("parent_id")
                    )
                )
                return J(messages.entries_json(entries))
        if (method, path) == ("POST", "/v1/entries/batch"):
            items = messages.body_object(req).get("entries")
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
                raise Denied(
                    400, "bad_request", f"entries must be a list of 1 to {MAX_BATCH} entries"
                )
            specs = [messages.entry_spec(i if isinstance(i, dict) else {}) for i in items]
            made = await self.run(lambda: a.create_entries(specs, actor))
            self.on_entries_changed({e.parent_id for e in made}, "entry")
            return J({"entries": [messages.entry_json(e) for e in made]}, status=201)
        if path.startswith("/v1/entries/"):
            entry_id = path.removeprefix("/v1/entries/")
            if method == "GET":
                return J(messages.entry_json(await self.run(lambda: a.get_entry(entry_id))))
            if method == "PATCH":
                body = messages.body_object(req)

                def update() -> tuple[EntryRecord, EntryRecord]:
                    before = a.get_entry(entry_id)  # 404 before a word about the body (rule 5)
                    return before, a.update_entry(entry_id, messages.entry_patch(body), actor)

                before, updated = await self.run(update)
                self.on_entries_changed(concerned_agents(before, updated), "entry")
                return J(messages.entry_json(updated))
            if method == "DELETE":

                def delete() -> EntryRecord:
                    before = a.get_entry(entry_id)
                    a.delete_entry(entry_id, actor)
                    return before

                gone = await self.run(delete)
                self.on_entries_changed(concerned_agents(gone, None), "entry")
                return J({"deleted": entry_id})
        if (method, path) == ("GET", "/v1/agents"):
            agents = await self.run(a.list_agents)
            return J({"agents": [messages.agent_json(agent) for agent in agents]})
        if (method, path) == ("GET", "/v1/agents/show"):
            agent_id = messages.parse_id(q.get("spiffe_id"))
            return J(messages.agent_json(await self.run(lambda: a.get_agent(agent_id))))
        if method == "POST" and path in ("/v1/agents/evict", "/v1/agents/ban"):
            agent_id = messages.parse_id(messages.body_object(req).get("spiffe_id"))
            status: AgentStatus = "evicted" if path.endswith("evict") else "banned"
            agent = await self.run(lambda: a.set_agent_status(agent_id, status, actor))
            self.on_entries_changed([str(agent_id)], status)  # its poll wakes, then refuses it
            return J(messages.agent_json(agent))
        if (method, path) == ("GET", "/v1/bundle"):
            bundle = a.bundle()
            if q.get("format", "pem") == "spiffe":
                jwks = with_jwt_keys(bundle.to_jwks(), a.jwt_bundle())
                return http.Response(200, jwks, content_type="application/json")
            return J(messages.bundle_json(bundle))
        if (method, path) == ("POST", "/v1/x509/mint"):
            body = messages.body_object(req)
            sid = messages.parse_id(body.get("spiffe_id"))
            ttl = messages.svid_ttl(body.get("ttl"))
            dns_names = messages.dns_names(body.get("dns_names"))
            minted = await self.run(lambda: a.mint(sid, ttl, dns_names, actor))
            return J(messages.minted_json(minted))
        if (method, path) == ("POST", "/v1/rotate"):
            body = messages.body_object(req)
            root = bool(body.get("root"))
            if body.get("jwt") and a.jwt_keys is not None:
                jwt_keys = a.jwt_keys
                try:
                    jwt_step = await self.run(lambda: jwt_keys.rotate(actor))
                except CAKeyError as exc:
                    raise Denied(409, "cannot_rotate", str(exc)) from exc
                await self.on_keys_changed()
                return J(
                    {"rotated": "jwt", "reason": jwt_step.reason, "jwt_keys": jwt_keys.summaries()}
                )
            try:
                step = await self.run(
                    lambda: a.keys.rotate_root(actor) if root else a.keys.rotate_intermediate(actor)
                )
            except CAKeyError as exc:
                raise Denied(409, "cannot_rotate", str(exc)) from exc
            await self.on_keys_changed()
            return J(
                {
                    "rotated": "root" if root else "intermediate",
                    "reason": step.reason,
                    "keys": a.keys.key_summaries(),
                }
            )
        if path.startswith("/v1/servers"):
            return await self._servers(actor, req)
        if (method, path) == ("GET", "/v1/keys"):
            summaries = [] if a.jwt_keys is None else a.jwt_keys.summaries()
            return J({"keys": a.keys.key_summaries(), "jwt_keys": summaries})
        if (method, path) == ("POST", "/v1/jwt/mint"):
            body = messages.body_object(req)
            jwt_id = messages.parse_id(body.get("spiffe_id"))
            audience = messages.audience(body.get("audience"))
            jwt_ttl = messages.svid_ttl(body.get("ttl"))
            minted_jwt = await self.run(lambda: a.mint_jwt(jwt_id, audience, jwt_ttl, actor))
            return J(messages.jwt_json(minted_jwt))
        if (method, path) == ("GET", "/v1/audit"):
            limit = _int_param(req, "limit")
            records = await self.run(
                lambda: a.store.audit_records(
                    since_ts=q.get("since"),
                    spiffe_id=q.get("spiffe_id"),
                    event=q.get("event"),
                    limit=limit if limit > 0 else 1000,
                )
            )
            return J(messages.audit_json(records))
        if (method, path) == ("GET", "/v1/audit/verify"):
            return J(messages.verify_json(await self.run(a.store.verify_audit)))
        if (method, path) == ("POST", "/v1/audit/verify"):
            return J(await self._verify_against(messages.body_object(req)))
        if (method, path) == ("GET", "/v1/audit/anchor") and self.anchor_now is not None:
            anchor = await self.anchor_now("requested")
            if anchor is None:
                raise Denied(409, "empty_log", "the audit log has no records to anchor yet")
            return J(anchor.to_json())
        raise Denied(404, "not_found", f"no such call: {method} {path}")

    async def _servers(self, actor: str, req: http.Request) -> http.Response:
        """CA servers sharing a PostgreSQL datastore (`ca.cluster.Membership`)."""
        members = self.membership
        if members is None:
            raise Denied(
                409,
                "single_server",
                "this CA keeps its state in SQLite: one server; move to PostgreSQL with"
                " `tally ca datastore migrate` to run several",
            )
        route = (req.method, req.path)
        if route == ("GET", "/v1/servers"):
            return http.Response.json({"servers": await self.run(members.list)})
        if route in (("POST", "/v1/servers/approve"), ("POST", "/v1/servers/remove")):
            sid = messages.text_or_none(messages.body_object(req).get("id"))
            if not sid:
                raise Denied(400, "bad_request", "id names a CA server (tally ca server list)")
            approve = route[1].endswith("approve")
            try:
                await self.run(
                    lambda: members.approve(sid, actor) if approve else members.remove(sid, actor)
                )
            except LookupError as exc:
                raise Denied(404, "not_found", str(exc).strip("'\"")) from None
            return http.Response.json({"servers": await self.run(members.list)})
        raise Denied(404, "not_found", f"no such call: {req.method} {req.path}")
