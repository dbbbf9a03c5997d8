"""The CA API's JSON: request bodies in as typed values, answers out as JSON objects.

Rules:

1. This module knows the wire (``docs/ca-api.md``) and nothing of policy:
   it checks that a body has the shape a call needs (types, SPIFFE ID and
   selector syntax, DNS names, hints) and refuses one that does not with the
   same `Denied` the authority uses, so every refusal leaves by one door.
   Whether a valid value is allowed (its trust domain, a TTL's limits, a
   token's or an agent's state) is `ca.authority`'s to decide.
2. Where the authority reads a field itself, after checks that must come
   first (a join token, a CSR), a field that is not a string is passed as
   ``None`` and the authority refuses it in its turn.
3. Answers are built here from the authority's dataclasses and the store's
   records, key by key, so the JSON stays what the documentation says
   whatever those classes grow.
4. No I/O: plain functions over decoded JSON.
"""

from __future__ import annotations

import re

from ca.audit import AuditRecord, VerifyResult
from ca.authority import (
    KEEP,
    AgentEntries,
    Attested,
    Authority,
    Denied,
    EntryPatch,
    EntrySpec,
    Issued,
    IssuedJwt,
    Minted,
    NewToken,
    SignRequest,
    bad_token_ttl,
    bad_ttl,
    iso,
)
from ca.leaves import NotSigned
from ca.store import AgentRecord, EntryRecord
from tally.spiffe import pem
from tally.spiffe.bundle import Bundle
from tally.spiffe.selectors import Selector, SelectorError
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError
from tally.wire import http

Json = dict[str, object]

MAX_BATCH = 1000
_HINT_MAX = 1024
_DNS_RE = re.compile(
    r"(?=.{1,253}$)(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)

# -- requests ---------------------------------------------------------------------------


def body_object(req: http.Request) -> Json:
    """A request's JSON body, which must be an object; no body reads as ``{}``."""
    if not req.body:
        return {}
    try:
        value = req.json()
    except http.HttpError as exc:
        raise Denied(400, "bad_json", exc.message) from exc
    if not isinstance(value, dict):
        raise Denied(400, "bad_json", "request body must be a JSON object")
    return value


def parse_id(raw: object, what: str = "spiffe_id") -> SpiffeId:
    if not isinstance(raw, str):
        raise Denied(400, "bad_request", f"{what} must be a string")
    try:
        return SpiffeId.parse(raw)
    except SpiffeIdError as exc:
        raise Denied(400, "bad_spiffe_id", str(exc)) from exc


def text_or_none(raw: object) -> str | None:
    """A field the authority reads itself (a join token, a CSR): ``None`` if not a string."""
    return raw if isinstance(raw, str) else None


def _seconds(raw: object) -> int | None:
    """A whole number of seconds (a JSON ``true`` is not one); ``None`` for anything else."""
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def svid_ttl(raw: object) -> int | None:
    """An SVID TTL in seconds; ``None`` when absent or null (the CA's default)."""
    if raw is None:
        return None
    ttl = _seconds(raw)
    if ttl is None:
        raise bad_ttl()
    return ttl


def token_ttl(raw: object) -> int | None:
    """A join token TTL in seconds; ``None`` when absent or null (the CA's default)."""
    if raw is None:
        return None
    ttl = _seconds(raw)
    if ttl is None:
        raise bad_token_ttl()
    return ttl


def token_spiffe_id(raw: object) -> SpiffeId | None:
    """The agent ID a join token is for; ``None`` lets the CA derive one."""
    return None if raw is None else parse_id(raw)


def dns_names(raw: object) -> tuple[str, ...]:
    """DNS SANs from a request body: a list of lowercase names, duplicates dropped."""
    raw = raw or []
    if not isinstance(raw, list) or not all(
        isinstance(d, str) and _DNS_RE.fullmatch(d) for d in raw
    ):
        raise Denied(400, "bad_dns_name", "dns_names must be a list of lowercase DNS names")
    return tuple(dict.fromkeys(raw))


def _selectors(raw: object) -> tuple[Selector, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise Denied(
            400, "bad_selectors", "selectors must be a non-empty list of 'type:value' strings"
        )
    try:
        return tuple(Selector.parse(s) for s in raw)
    except SelectorError as exc:
        raise Denied(400, "bad_selectors", str(exc)) from exc


def _hint(raw: object) -> str:
    hint = raw or ""
    if not isinstance(hint, str) or len(hint.encode()) > _HINT_MAX or not hint.isprintable():
        raise Denied(400, "bad_hint", "hint must be printable text of at most 1024 bytes")
    return hint


def _entry_ttl(body: Json) -> int | None:
    return None if body["ttl"] is None else svid_ttl(body["ttl"])


def entry_spec(body: Json) -> EntrySpec:
    """``POST /v1/entries``: ``spiffe_id``, ``parent_id`` and ``selectors`` are required."""
    return EntrySpec(
        spiffe_id=parse_id(body.get("spiffe_id")),
        parent_id=parse_id(body.get("parent_id"), "parent_id"),
        selectors=_selectors(body.get("selectors")),
        ttl=_entry_ttl(body) if "ttl" in body else None,
        dns_names=dns_names(body["dns_names"]) if "dns_names" in body else (),
        hint=_hint(body["hint"]) if "hint" in body else "",
    )


def entry_patch(body: Json) -> EntryPatch:
    """``PATCH /v1/entries/<id>``: the fields present change; a null ``ttl`` clears it."""
    return EntryPatch(
        spiffe_id=parse_id(body["spiffe_id"]) if "spiffe_id" in body else KEEP,
        parent_id=parse_id(body["parent_id"], "parent_id") if "parent_id" in body else KEEP,
        selectors=_selectors(body["selectors"]) if "selectors" in body else KEEP,
        ttl=_entry_ttl(body) if "ttl" in body else KEEP,
        dns_names=dns_names(body["dns_names"]) if "dns_names" in body else KEEP,
        hint=_hint(body["hint"]) if "hint" in body else KEEP,
    )


def sign_requests(raw: object) -> list[SignRequest]:
    """``POST /v1/svids``: ``csrs`` is a list of 1 to `MAX_BATCH` ``{entry_id, csr}``."""
    if not isinstance(raw, list) or not raw or len(raw) > MAX_BATCH:
        raise Denied(400, "bad_request", "csrs must be a list of 1 to 1000 requests")
    requests = []
    for item in raw:
        if not isinstance(item, dict):
            raise Denied(400, "bad_request", "each request must be an object with entry_id and csr")
        entry_id, csr = item.get("entry_id"), item.get("csr")
        requests.append(SignRequest(text_or_none(entry_id), text_or_none(csr)))
    return requests


# -- answers ----------------------------------------------------------------------------


def svid_json(issued: Issued) -> Json:
    return {
        "spiffe_id": str(issued.spiffe_id),
        "serial": issued.serial,
        "not_after": iso(issued.not_after),
        "cert_chain": issued.chain_pem.decode(),
    }


def bundle_json(bundle: Bundle) -> Json:
    return {"bundle": bundle.to_pem().decode(), "bundle_sequence": bundle.sequence}


def audience(raw: object) -> tuple[str, ...]:
    """A JWT-SVID's audience: a string or a list of strings (their limits are policy)."""
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw):
        return tuple(raw)
    raise Denied(400, "bad_audience", "audience must be a string or a list of strings")


def jwt_bundle_json(authority: Authority) -> Json:
    """The JWT keys beside the X.509 bundle in ``/v1/bundle`` (one sequence for both)."""
    return {"jwt_bundle": authority.jwt_bundle().to_jwks().decode()}


def jwt_json(issued: IssuedJwt) -> Json:
    return {
        "spiffe_id": str(issued.spiffe_id),
        "token": issued.token,
        "audience": list(issued.audience),
        "expires_at": issued.expires_at,
        "kid": issued.kid,
    }


def attested_json(attested: Attested) -> Json:
    return {**svid_json(attested.svid), **bundle_json(attested.bundle)}


def minted_json(minted: Minted) -> Json:
    return {
        **svid_json(minted.svid),
        "private_key": pem.key_to_pem(minted.private_key).decode(),
        **bundle_json(minted.bundle),
    }


def token_json(token: NewToken) -> Json:
    return {
        "token": token.token,
        "token_id": token.token_id,
        "spiffe_id": str(token.spiffe_id),
        "expires_at": iso(token.expires_at),
    }


def signed_json(raw: object, results: list[Issued | NotSigned]) -> Json:
    """The answer to a batch whose ``csrs`` were ``raw``: each item names the entry_id it
    was sent with (even one that is not a string) and holds an SVID or why not."""
    assert isinstance(raw, list)
    svids: list[Json] = []
    for item, result in zip(raw, results, strict=True):
        entry_id = item.get("entry_id")
        if isinstance(result, NotSigned):
            svids.append({"entry_id": entry_id, "error": result.code, "message": result.message})
        else:
            svids.append({"entry_id": entry_id, **svid_json(result)})
    return {"svids": svids}


def entry_json(entry: EntryRecord) -> Json:
    return {
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": list(entry.selectors),
        "ttl": entry.ttl,
        "dns_names": list(entry.dns_names),
        "hint": entry.hint,
        "revision": entry.revision,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
    }


def entries_json(entries: list[EntryRecord]) -> Json:
    return {"entries": [entry_json(e) for e in entries]}


def agent_entries_json(view: AgentEntries) -> Json:
    return {"revision": view.revision, "entries": [entry_json(e) for e in view.entries]}


def agent_json(agent: AgentRecord) -> Json:
    return {
        "spiffe_id": agent.spiffe_id,
        "status": agent.status,
        "token_id": agent.token_id,
        "serial": agent.serial,
        "not_after": agent.not_after,
        "attested_at": agent.attested_at,
        "updated_at": agent.updated_at,
    }


def audit_json(records: list[AuditRecord]) -> Json:
    return {
        "records": [
            {
                "seq": r.seq,
                "ts": r.ts,
                "actor": r.actor,
                "event": r.event,
                "spiffe_id": r.spiffe_id,
                "serial": r.serial,
                "detail": dict(r.detail),
                "hash": r.hash,
            }
            for r in records
        ]
    }


def verify_json(result: VerifyResult) -> Json:
    return {
        "ok": result.ok,
        "records": result.records,
        "bad_seq": result.bad_seq,
        "problem": result.problem,
    }
