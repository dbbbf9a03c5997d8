"""A py-spiffe client in a process of its own (py-spiffe's protobuf module must not
share a descriptor pool with Tally's; spiffe-spec.md pitfall 1).

    python -m tests.e2e.spiffe_probe fetch SOCKET [--uid N]
    python -m tests.e2e.spiffe_probe source SOCKET SECONDS [--uid N]
    python -m tests.e2e.spiffe_probe stream SOCKET

``stream`` holds one FetchX509SVID stream on py-spiffe's own gRPC stub and,
when it ends, prints the status code and details the client saw: a clean end
carries the server's trailers, a reset only grpc's own words.

Prints one JSON object per line.  With --uid the process drops to that uid/gid
after importing everything, so the agent attests it as that user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from spiffe import WorkloadApiClient, X509Source


def drop(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def svid_json(svid) -> dict:
    leaf = svid.leaf
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(leaf.serial_number, "x"),
        "not_before": leaf.not_valid_before_utc.timestamp(),
        "not_after": leaf.not_valid_after_utc.timestamp(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fetch", "source", "stream"))
    parser.add_argument("socket")
    parser.add_argument("seconds", nargs="?", type=float, default=0)
    parser.add_argument("--uid", type=int)
    args = parser.parse_args()
    drop(args.uid)
    address = f"unix://{args.socket}"
    if args.mode == "fetch":
        try:
            with WorkloadApiClient(socket_path=address, default_timeout=10) as client:
                ctx = client.fetch_x509_context()
                bundles = {
                    str(b.trust_domain): len(b.x509_authorities)
                    for b in ctx.x509_bundle_set.bundles
                }
                print(
                    json.dumps(
                        {"svids": [svid_json(s) for s in ctx.x509_svids], "bundles": bundles}
                    )
                )
        except Exception as exc:  # the test reads the error text
            print(json.dumps({"error": str(exc)}))
        return 0
    if args.mode == "stream":
        return stream(address)
    seen = threading.Event()
    lock = threading.Lock()

    def report(ctx) -> None:
        with lock:
            print(json.dumps({"at": time.time(), **svid_json(ctx.default_svid)}), flush=True)
        seen.set()

    with X509Source(socket_path=address, timeout_in_seconds=10) as source:
        report(source.get_x509_context())
        source.subscribe_for_updates(lambda: report(source.get_x509_context()))
        time.sleep(args.seconds)
    return 0


def stream(address: str) -> int:
    import grpc
    from spiffe._proto import workload_pb2

    with WorkloadApiClient(socket_path=address, default_timeout=10) as client:
        # The public API folds every stream end into one error string; the stub keeps
        # the status details, which is what tells a clean end from a reset.
        stub = client._spiffe_workload_api_stub
        try:
            for response in stub.FetchX509SVID(workload_pb2.X509SVIDRequest()):
                print(json.dumps({"svids": len(response.svids)}), flush=True)
            print(json.dumps({"end": "OK", "details": ""}), flush=True)
        except grpc.RpcError as exc:
            print(json.dumps({"end": exc.code().name, "details": exc.details()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
