"""py-spiffe's JWT client in a process of its own (its protobuf module must not share a
descriptor pool with Tally's; spiffe-spec.md pitfall 1).

    python -m tests.e2e.jwt_probe SOCKET OPS_JSON
    python -m tests.e2e.jwt_probe SOCKET stream SECONDS UPDATES

OPS_JSON is a list of operations run in order in one process (starting Python and
py-spiffe is most of the cost), each printing one JSON line:

    {"op": "fetch", "aud": ["a"], "spiffe_id": "..."?}   fetch_jwt_svid, then py-spiffe's
                                                          own parse_and_validate on it
    {"op": "bundles"}                                     fetch_jwt_bundles
    {"op": "validate", "aud": "a", "token": "..." | "token_of": N}
                                                          validate_jwt_svid (N: the index
                                                          of an earlier fetch)
    {"op": "source", "aud": "a"}                          JwtSource

``stream`` prints the kids of each FetchJWTBundles message until UPDATES arrived or
SECONDS passed.  A client error is printed as {"error": ...}.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from spiffe import JwtSource, JwtSvid, SpiffeId, WorkloadApiClient


def kids(bundle_set) -> dict:
    return {str(b.trust_domain): sorted(b.jwt_authorities) for b in bundle_set.bundles}


def run(client: WorkloadApiClient, address: str, op: dict, done: list[dict]) -> dict:
    if op["op"] == "fetch":
        subject = SpiffeId(op["spiffe_id"]) if op.get("spiffe_id") else None
        svid = client.fetch_jwt_svid(audience=set(op["aud"]), subject=subject)
        bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        JwtSvid.parse_and_validate(svid.token, bundle, set(op["aud"]))
        return {
            "spiffe_id": str(svid.spiffe_id),
            "token": svid.token,
            "audience": sorted(svid.audience),
            "expiry": svid.expiry,
            "validated_locally": True,
        }
    if op["op"] == "bundles":
        return {"kids": kids(client.fetch_jwt_bundles())}
    if op["op"] == "validate":
        token = op["token"] if "token" in op else done[op["token_of"]]["token"]
        return {"spiffe_id": str(client.validate_jwt_svid(token, op["aud"]).spiffe_id)}
    with JwtSource(socket_path=address, timeout_in_seconds=10) as source:
        svid = source.fetch_svid(audience={op["aud"]})
        bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        return {
            "spiffe_id": str(svid.spiffe_id),
            "token": svid.token,
            "kids": sorted(bundle.jwt_authorities) if bundle else [],
        }


def stream(client: WorkloadApiClient, seconds: float, updates: int) -> None:
    lock = threading.Lock()
    seen: list[dict] = []
    enough = threading.Event()

    def report(bundle_set) -> None:
        with lock:
            seen.append(kids(bundle_set))
            print(json.dumps({"at": time.time(), "kids": seen[-1]}), flush=True)
            if len(seen) >= updates:
                enough.set()

    handle = client.stream_jwt_bundles(report, lambda exc: None)
    enough.wait(seconds)
    handle.cancel()


def main() -> int:
    address = f"unix://{sys.argv[1]}"
    with WorkloadApiClient(socket_path=address, default_timeout=10) as client:
        if sys.argv[2] == "stream":
            stream(client, float(sys.argv[3]), int(sys.argv[4]))
            return 0
        done: list[dict] = []
        for op in json.loads(sys.argv[2]):
            try:
                done.append(run(client, address, op, done))
            except Exception as exc:  # the test reads the error text
                done.append({"error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(done[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
