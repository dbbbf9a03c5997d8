"""py-spiffe's JWT client in a process of its own (its protobuf module must not share a
descriptor pool with Tally's; spiffe-spec.md pitfall 1).

    python -m tests.e2e.jwt_probe fetch SOCKET AUDIENCE [--spiffe-id ID]
    python -m tests.e2e.jwt_probe bundles SOCKET
    python -m tests.e2e.jwt_probe validate SOCKET AUDIENCE TOKEN
    python -m tests.e2e.jwt_probe source SOCKET AUDIENCE
    python -m tests.e2e.jwt_probe stream SOCKET SECONDS

Prints one JSON object per line; a client error is printed as {"error": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient


def kids(bundle_set) -> dict:
    return {str(b.trust_domain): sorted(b.jwt_authorities) for b in bundle_set.bundles}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fetch", "bundles", "validate", "source", "stream"))
    parser.add_argument("socket")
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--spiffe-id")
    args = parser.parse_args()
    address = f"unix://{args.socket}"
    try:
        if args.mode == "source":
            with JwtSource(socket_path=address, timeout_in_seconds=10) as source:
                svid = source.fetch_svid(audience={args.rest[0]})
                bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
                print(
                    json.dumps(
                        {
                            "spiffe_id": str(svid.spiffe_id),
                            "token": svid.token,
                            "kids": sorted(bundle.jwt_authorities) if bundle else [],
                        }
                    )
                )
            return 0
        with WorkloadApiClient(socket_path=address, default_timeout=10) as client:
            if args.mode == "fetch":
                subject = SpiffeId(args.spiffe_id) if args.spiffe_id else None
                svid = client.fetch_jwt_svid(audience=set(args.rest), subject=subject)
                out = {
                    "spiffe_id": str(svid.spiffe_id),
                    "token": svid.token,
                    "audience": sorted(svid.audience),
                    "expiry": svid.expiry,
                }
                # py-spiffe's own validation against the bundles it fetched
                bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                    TrustDomain(str(svid.spiffe_id.trust_domain))
                )
                from spiffe import JwtSvid

                assert bundle is not None
                JwtSvid.parse_and_validate(svid.token, bundle, set(args.rest))
                out["validated_locally"] = True
                print(json.dumps(out))
            elif args.mode == "bundles":
                print(json.dumps({"kids": kids(client.fetch_jwt_bundles())}))
            elif args.mode == "validate":
                audience, token = args.rest
                svid = client.validate_jwt_svid(token, audience)
                print(json.dumps({"spiffe_id": str(svid.spiffe_id)}))
            else:
                lock = threading.Lock()

                def report(bundle_set) -> None:
                    with lock:
                        print(json.dumps({"at": time.time(), "kids": kids(bundle_set)}), flush=True)

                handle = client.stream_jwt_bundles(report, lambda exc: None)
                time.sleep(float(args.rest[0]))
                handle.cancel()
    except Exception as exc:  # the test reads the error text
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
