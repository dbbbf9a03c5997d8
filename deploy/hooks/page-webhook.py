#!/usr/bin/env python3
"""Page an on-call rotation through a generic incoming webhook, from a Tally hook.

Tally runs this with one event as JSON on stdin (see docs/operators-guide.md,
"Remediation hooks"): daemon, host, event, identity, reason, action, repeats,
detail.  It turns that into the small alert document most paging services
accept on a generic webhook (summary, severity, dedup key, source, details)
and POSTs it.  A non-zero exit makes Tally retry with backoff, so this script
does not retry itself.

The webhook URL is read from a file (``--url-file``, default
/etc/tally/pager-url, mode 0600 and owned by the daemon's user) rather than
given in the TOML: paging services put their routing key in the URL, and a
config file is copied and shown more widely than a secret should be.

Standard library only, so it runs with the interpreter Tally is installed with.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

# Events after which something has already stopped working: wake someone up.
CRITICAL = frozenset({"svid.expired", "audit.broken", "agent.evicted"})


def alert(event: dict) -> dict:
    """The pager's document for one Tally hook payload."""
    name = event.get("event", "unknown")
    who = event.get("identity") or "(no identity)"
    repeats = event.get("repeats", 0)
    again = f" (and {repeats} more like it)" if repeats else ""
    return {
        "summary": f"tally {event.get('daemon')} on {event.get('host')}: {name} for {who}: "
        f"{event.get('reason')}{again}",
        "severity": "critical" if name in CRITICAL else "warning",
        "source": event.get("host"),
        # One incident per kind of trouble: the pager folds repeats, as Tally does.
        "dedup_key": f"tally/{event.get('daemon')}/{name}/{who}/{event.get('reason')}",
        "runbook": event.get("action"),
        "details": event,
    }


def allowed(url: str) -> bool:
    """Tally's rule for webhooks: https (verified against the system roots), or plain
    http to a loopback address where no network can read or change it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url-file", default="/etc/tally/pager-url")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    try:
        with open(args.url_file, encoding="utf-8") as f:
            url = f.read().strip()
    except OSError as exc:
        print(f"page-webhook: cannot read {args.url_file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        event = json.load(sys.stdin)
    except ValueError as exc:
        print(f"page-webhook: stdin is not a Tally event: {exc}", file=sys.stderr)
        return 2
    if not allowed(url):
        print(
            f"page-webhook: {args.url_file}: expected an https:// URL "
            "(plain http only to a loopback address)",
            file=sys.stderr,
        )
        return 2
    body = json.dumps(alert(event)).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by allowed()
        url, data=body, method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:  # noqa: S310
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        # The URL is not printed: it holds the routing key.
        print(f"page-webhook: the pager did not take the alert: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
