"""Remediation hooks: declarations, payloads, the outbox, and the dispatcher in virtual time.

The transports are tested for real at the end (a process, a local HTTP receiver); the
dispatcher tests replace only the transport, the one boundary outside Tally.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import itertools
import json
import logging
import math
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from agent.settings import AgentSettings
from ca.settings import CASettings
from proxy.settings import ClientSettings, ServerSettings
from tally.ops.config import ConfigError, Table, add_arguments, dump_toml, load, setting
from tally.ops.health import ReadyWatch, watch_ready
from tally.ops.hook_rules import (
    COALESCED,
    DROPPED,
    QUEUED,
    Event,
    HookError,
    HookSpec,
    Outbox,
    check_hooks,
    event_of,
    parse_hooks,
    payload,
)
from tally.ops.hooks import DeliveryError, Hooks, deliver
from tally.ops.logs import get_logger, setup_logging

events = st.sampled_from(["rotation.failed", "svid.expired", "peer.denied", "audit.broken"])
argv = st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4)


# -- declarations -----------------------------------------------------------------------------


@given(st.lists(events, min_size=1, max_size=4), argv, st.integers(0, 9), st.integers(1, 500))
def test_a_command_hook_reads_back_as_declared(on, command, retries, queue):
    (spec,) = parse_hooks([{"on": on, "command": command, "retries": retries, "queue": queue}])
    assert spec.on == frozenset(on) and spec.command == tuple(command)
    assert (spec.retries, spec.queue, spec.url) == (retries, queue, None)


@given(
    st.sampled_from(["127.0.0.1", "127.9.8.7", "[::1]", "localhost"]),
    st.integers(1, 65535),
    st.sampled_from(["", "/", "/hook", "/a/b?x=1"]),
)
def test_plain_http_is_accepted_to_loopback(host, port, path):
    url = f"http://{host}:{port}{path}"
    assert parse_hooks([{"on": ["svid.expired"], "url": url}])[0].url == url


@given(st.sampled_from(["10.0.0.1", "example.com", "[2001:db8::1]", "0.0.0.0"]))
def test_plain_http_elsewhere_is_refused_naming_the_hook(host):
    with pytest.raises(HookError, match=r"^hooks\[0\]\.url: plain http is only allowed"):
        parse_hooks([{"on": ["svid.expired"], "url": f"http://{host}/x"}])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"on": ["a"]}, r"hooks\[1\]: give exactly one of 'command'"),
        ({"on": ["a"], "command": ["x"], "url": "https://h/"}, "exactly one"),
        ({"on": [], "command": ["x"]}, r"hooks\[1\]\.on: expected a non-empty array"),
        ({"on": ["hook.failed"], "command": ["x"]}, "cannot trigger hooks"),
        ({"on": ["a"], "command": "rm -rf /"}, r"\.command: expected a non-empty array"),
        ({"on": ["a"], "url": "ftp://h/"}, r"\.url: expected https://HOST/PATH"),
        ({"on": ["a"], "url": "https://h:99999/"}, r"\.url: not a URL"),
        ({"on": ["a"], "command": ["x"], "timeout": 0}, r"\.timeout: must be at least 0.1"),
        ({"on": ["a"], "command": ["x"], "timeout": float("inf")}, r"\.timeout: .* and finite"),
        ({"on": ["a"], "command": ["x"], "coalesce": float("nan")}, r"\.coalesce: .* and finite"),
        ({"on": ["a"], "command": ["x"], "retries": True}, r"\.retries: expected an integer"),
        ({"on": ["a"], "command": ["x"], "ca_file": "/r.pem"}, "only an https url"),
        ({"on": ["a"], "command": ["x"], "shell": True}, r"unknown key 'shell'"),
    ],
)
def test_bad_declarations_are_one_line_errors(table, message):
    good = {"on": ["svid.expired"], "command": ["true"]}
    with pytest.raises(ConfigError, match=message) as info:
        check_hooks([good, table])
    assert str(info.value).startswith("setting 'hooks': hooks[1]")
    assert "\n" not in str(info.value)


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
hook_keys = st.sampled_from(["on", "command", "url", "ca_file", "timeout", "retries", "queue"])


@given(st.dictionaries(hook_keys | st.text(max_size=8), anything, max_size=6))
def test_any_table_is_a_hook_or_a_hook_error_never_a_crash(table):
    try:
        (spec,) = parse_hooks([table])
    except HookError as exc:
        assert str(exc).startswith("hooks[0]") and "\n" not in str(exc)
    else:
        assert (spec.command is None) != (spec.url is None) and spec.on
        assert all(math.isfinite(v) for v in (spec.timeout, spec.coalesce))


def test_a_url_is_described_without_its_path_or_credentials():
    spec = parse_hooks([{"on": ["a"], "url": "https://u:pw@pager.example:8443/T0KEN?k=v"}])[0]
    assert spec.describe() == "url https://pager.example:8443"


# -- payloads ---------------------------------------------------------------------------------


def test_a_payload_names_daemon_identity_reason_and_action_and_no_secret():
    fields = {
        "spiffe_id": "spiffe://example.org/web",
        "reason": "unreachable",
        "token": "s3cret-join-token",
        "error": "-----BEGIN PRIVATE KEY-----\nMIIE...",
    }
    doc = payload("agent", "node-1", event_of("svid.expired", "T", fields, "spiffe://x/a"), 2)
    assert doc["daemon"] == "agent" and doc["host"] == "node-1"
    assert doc["identity"] == "spiffe://example.org/web"
    assert doc["reason"] == "unreachable" and doc["repeats"] == 2
    assert "expired" in doc["action"]
    text = json.dumps(doc)
    assert "s3cret" not in text and "BEGIN PRIVATE" not in text


def test_without_an_identity_field_the_payload_names_the_daemon_itself():
    ev = event_of("audit.broken", "T", {"problem": "record 3 was altered"}, "spiffe://td/tally/ca")
    assert ev.identity == "spiffe://td/tally/ca" and ev.reason == "audit.broken"


# -- the outbox ------------------------------------------------------------------------------

keys = st.tuples(events, st.sampled_from(["spiffe://t/a", "spiffe://t/b", None]))
steps = st.lists(
    st.one_of(st.tuples(st.just("offer"), keys), st.tuples(st.just("take"), st.none())),
    max_size=80,
)


@given(steps, st.integers(1, 5), st.sampled_from([0.0, 5.0, 1000.0]), st.integers(0, 3))
def test_outbox_is_bounded_coalesces_and_loses_nothing_silently(script, capacity, window, tick):
    box = Outbox(capacity, window)
    now = 0.0
    outcomes = {QUEUED: 0, COALESCED: 0, DROPPED: 0}
    delivered_with_repeats = 0
    last_taken: dict[tuple, float] = {}
    for op, arg in script:
        now += tick
        if op == "offer":
            name, ident = arg
            outcomes[box.offer(Event(name, "T", ident, "r", {}), now)] += 1
        else:
            item = box.take(now)
            if item is not None:
                key = item.event.key
                assert key not in last_taken or now - last_taken[key] >= window
                last_taken[key] = now
                delivered_with_repeats += 1 + item.repeats
        assert len(box) <= capacity
        pending = [p.event.key for p in box._queue]
        assert len(pending) == len(set(pending))  # one waiting item per kind of trouble
    # every event offered is queued, folded into another, or counted as dropped ...
    offered = sum(1 for op, _ in script if op == "offer")
    assert sum(outcomes.values()) == offered
    # ... and every queued or folded one is delivered, still waiting, or still held back
    waiting = sum(1 + p.repeats for p in box._queue)
    assert delivered_with_repeats + waiting + box.held() <= outcomes[QUEUED] + outcomes[COALESCED]
    if window == 0:  # no window: nothing is held back, so the count is exact
        assert delivered_with_repeats + waiting == outcomes[QUEUED] + outcomes[COALESCED]


@given(st.integers(2, 200))
def test_a_burst_of_one_trouble_is_one_delivery(n):
    box = Outbox(4, 300)
    ev = Event("rotation.failed", "T", "spiffe://t/a", "unreachable", {})
    assert [box.offer(ev, 0) for _ in range(n)].count(QUEUED) == 1
    item = box.take(0)
    assert item is not None and item.repeats == n - 1 and box.take(0) is None


# -- the dispatcher, in virtual time ------------------------------------------------------------


def hook(*on: str, **kw: object) -> HookSpec:
    return parse_hooks([{"on": list(on), "command": ["unused"], **kw}])[0]


@pytest.fixture
def quiet_logs():
    setup_logging("info", stream=io.StringIO())
    yield
    setup_logging("info")


async def test_a_hook_that_hangs_never_moves_rotation_timing(autojump_clock, quiet_logs):
    hung: list[float] = []

    async def hang(spec: HookSpec, body: bytes) -> None:
        hung.append(trio.current_time())
        await trio.sleep_forever()

    hooks = Hooks("agent", [hook("rotation.failed", timeout=30, retries=5, queue=2)], send=hang)
    hooks._now = trio.current_time
    log = get_logger("tally.agent.rotation")
    ticks: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        start = trio.current_time()
        for i in range(100):  # a renewal loop failing every 7 s, with many identities
            await trio.sleep(7)
            ticks.append(trio.current_time() - start)
            log.warning("rotation.failed", spiffe_id=f"spiffe://t/w{i}", reason="unreachable")
        nursery.cancel_scope.cancel()
    assert ticks == [7.0 * (i + 1) for i in range(100)]  # to the virtual microsecond
    assert hung  # the hook was tried, and hung, and timed out, again and again
    assert hooks.counts["dropped"] > 0 and hooks.counts["queued"] <= 2 + len(hung)
    assert hooks.counts["failed"] >= 1 and hooks.counts["retried"] >= 5


async def test_overflow_is_counted_and_a_burst_is_coalesced(autojump_clock, quiet_logs):
    bodies: list[dict] = []
    gate = trio.Event()

    async def slow(spec: HookSpec, body: bytes) -> None:
        await gate.wait()
        bodies.append(json.loads(body))

    hooks = Hooks("proxy", [hook("peer.denied", queue=3)], send=slow)
    hooks._now = trio.current_time
    log = get_logger("tally.proxy")
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        for _ in range(50):
            log.warning("peer.denied", peer_id="spiffe://t/same", reason="stale_certificate")
        await trio.sleep(1)  # the worker takes the first one and waits on the gate
        for i in range(10):
            log.warning("peer.denied", peer_id=f"spiffe://t/p{i}", reason="not_allowed")
        gate.set()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert bodies[0]["identity"] == "spiffe://t/same" and bodies[0]["repeats"] == 49
    assert [b["identity"] for b in bodies[1:]] == [
        "spiffe://t/p0",
        "spiffe://t/p1",
        "spiffe://t/p2",
    ]
    assert hooks.counts == {"queued": 4, "coalesced": 49, "dropped": 7, "delivered": 4}
    family = next(iter(hooks.metrics("tally_proxy")))
    assert {s.labels["outcome"]: s.value for s in family.samples}["dropped"] == 7


async def test_retries_back_off_with_jitter_then_give_up(autojump_clock, quiet_logs):
    tries: list[float] = []

    async def failing(spec: HookSpec, body: bytes) -> None:
        tries.append(trio.current_time())
        raise DeliveryError("the webhook answered 503")

    hooks = Hooks("ca", [hook("audit.broken", retries=4)], send=failing)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        get_logger("tally.ca").error("audit.broken", problem="record 3 was altered")
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert len(tries) == 5
    for i, gap in enumerate(gaps):  # full jitter in the upper half of a doubling ceiling
        assert 2**i / 2 <= gap <= 2**i
    assert hooks.counts["failed"] == 1 and hooks.counts["retried"] == 4


async def test_a_transport_that_crashes_is_a_failed_delivery_not_a_dead_daemon(
    autojump_clock, quiet_logs
):
    async def broken(spec: HookSpec, body: bytes) -> None:
        raise RuntimeError("bug")

    hooks = Hooks("proxy", [hook("peer.denied", retries=1)], send=broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        get_logger("tally.proxy").warning("peer.denied", reason="expired")
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert hooks.counts["failed"] == 1


async def test_sighup_swaps_hooks_and_keeps_unchanged_ones(autojump_clock, quiet_logs):
    got: list[str] = []

    async def record(spec: HookSpec, body: bytes) -> None:
        got.append(f"{sorted(spec.on)[0]}:{json.loads(body)['event']}")

    a, b = hook("svid.expired"), hook("ready.lost")
    hooks = Hooks("agent", [a], send=record)
    log = get_logger("tally.agent")
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.run)
        log.warning("ready.lost", why="x")  # nobody listens yet
        hooks.update([a, b])
        await trio.sleep(0.1)
        log.warning("ready.lost", why="x")
        log.warning("svid.expired", spiffe_id="spiffe://t/w")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sorted(got) == ["ready.lost:ready.lost", "svid.expired:svid.expired"]


def test_the_sink_leaves_the_root_logger_when_hooks_stop():
    before = list(logging.getLogger().handlers)

    async def main() -> None:
        with trio.move_on_after(0.01):
            await Hooks("ca", []).run()

    trio.run(main)
    assert logging.getLogger().handlers == before


# -- the real transports ----------------------------------------------------------------------


def test_a_command_gets_the_event_on_stdin_without_tally_secrets(tmp_path, monkeypatch):
    out = tmp_path / "got.json"
    monkeypatch.setenv("TALLY_JOIN_TOKEN", "s3cret")
    script = (
        "import json, os, sys; doc = json.load(sys.stdin); "
        "doc['env'] = sorted(k for k in os.environ if k.startswith('TALLY_')); "
        f"open({str(out)!r}, 'w').write(json.dumps(doc))"
    )
    spec = parse_hooks([{"on": ["svid.expired"], "command": [sys.executable, "-c", script]}])[0]
    body = json.dumps({"event": "svid.expired"}).encode()
    trio.run(deliver, spec, body)
    assert json.loads(out.read_text()) == {"event": "svid.expired", "env": []}
    failing = parse_hooks([{"on": ["a"], "command": [sys.executable, "-c", "exit(3)"]}])[0]
    with pytest.raises(DeliveryError, match="exited with status 3"):
        trio.run(deliver, failing, body)
    missing = parse_hooks([{"on": ["a"], "command": ["/nonexistent/pager"]}])[0]
    with pytest.raises(DeliveryError, match="cannot run /nonexistent/pager"):
        trio.run(deliver, missing, body)


class Receiver(BaseHTTPRequestHandler):
    got: list[tuple[str, bytes]] = []
    status = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.got.append((self.path, body))
        self.send_response(Receiver.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_a_webhook_gets_a_post_and_a_refusal_is_a_failure():
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/page?team=ops"
        spec = parse_hooks([{"on": ["a"], "url": url}])[0]
        trio.run(deliver, spec, b'{"event":"a"}')
        assert Receiver.got[-1] == ("/page?team=ops", b'{"event":"a"}')
        Receiver.status = 500
        with pytest.raises(DeliveryError, match="answered 500"):
            trio.run(deliver, spec, b"{}")
    finally:
        Receiver.status = 204
        server.shutdown()
        server.server_close()


def test_an_unverifiable_https_webhook_is_refused():
    server = HTTPServer(("127.0.0.1", 0), Receiver)  # speaks no TLS at all
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = parse_hooks([{"on": ["a"], "url": f"https://127.0.0.1:{server.server_port}/"}])
        with pytest.raises(DeliveryError, match=r"POST to https://127.0.0.1"):
            trio.run(deliver, spec[0], b"{}")
    finally:
        server.shutdown()
        server.server_close()


# -- the config kind the hooks use ------------------------------------------------------------

toml_scalars = st.one_of(
    st.text(max_size=8), st.integers(-(2**40), 2**40), st.booleans(), st.lists(st.text(max_size=5))
)
tables = st.lists(
    st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,6}", fullmatch=True), toml_scalars, max_size=4),
    max_size=3,
)


@dataclass(frozen=True)
class WithTables:
    hooks: list[Table] = setting([], flag="--hook", help="tables")


@given(tables)
def test_tables_round_trip_through_the_file_and_the_flag(tmp_path_factory, value):
    cfg = WithTables(hooks=value)
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(dump_toml(cfg))
    parser = argparse.ArgumentParser()
    add_arguments(parser, WithTables)
    assert load(WithTables, parser.parse_args(["--config", str(path)]), env={}) == cfg
    inline = [dump_toml(WithTables(hooks=[t])).split("= [", 1)[1].rsplit("]", 1)[0] for t in value]
    flags = [arg for text in inline for arg in ("--hook", text)]
    assert load(WithTables, parser.parse_args(flags), env={}) == cfg


def test_a_single_table_where_an_array_is_expected_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[hooks]\non = ["a"]\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser, WithTables)
    with pytest.raises(ConfigError, match=r"key 'hooks': expected an array of tables"):
        load(WithTables, parser.parse_args(["--config", str(path)]), env={})


# -- the deploy/ sample ------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize(
    ("sample", "schema"),
    [
        ("ca.toml", CASettings),
        ("agent.toml", AgentSettings),
        ("proxy-web.toml", ServerSettings),
        ("proxy-billing.toml", ClientSettings),
    ],
)
def test_the_sample_hooks_load_into_every_daemon(tmp_path, sample, schema):
    path = tmp_path / sample
    snippet = (DEPLOY / "hooks" / "hooks.toml").read_text()
    path.write_text((DEPLOY / "config" / sample).read_text() + "\n" + snippet)
    parser = argparse.ArgumentParser()
    add_arguments(parser, schema)
    cfg = load(schema, parser.parse_args(["--config", str(path)]), env={})
    pager, dashboard = check_hooks(cfg.hooks)
    assert pager.command is not None and pager.command[1].endswith("/page-webhook.py")
    assert "rotation.failed" in pager.on and dashboard.url is not None


def test_the_sample_pager_script_posts_an_alert(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url_file = tmp_path / "pager-url"
        url_file.write_text(f"http://127.0.0.1:{server.server_port}/v2/enqueue?key=R0UT1NG\n")
        event = payload(
            "agent",
            "node-1",
            event_of("svid.expired", "T", {"spiffe_id": "spiffe://t/web"}, None),
            3,
        )
        script = DEPLOY / "hooks" / "page-webhook.py"
        args = [sys.executable, str(script), "--url-file", str(url_file)]
        done = subprocess.run(args, input=json.dumps(event).encode(), capture_output=True)
        assert done.returncode == 0, done.stderr
        path, body = Receiver.got[-1]
        assert path == "/v2/enqueue?key=R0UT1NG"
        alert = json.loads(body)
        assert alert["severity"] == "critical"
        assert alert["summary"].startswith("tally agent on node-1: svid.expired for spiffe://t/web")
        assert "3 more" in alert["summary"] and alert["runbook"] == event["action"]
        url_file.write_text("http://127.0.0.1:1/closed\n")
        done = subprocess.run(args, input=json.dumps(event).encode(), capture_output=True)
        assert done.returncode == 1 and b"R0UT1NG" not in done.stderr
    finally:
        server.shutdown()
        server.server_close()


# -- ready.lost, the readiness event hooks can subscribe to ---------------------------------


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 4))
def test_ready_lost_and_regained_alternate_and_need_a_first_ready(samples, grace):
    watch = ReadyWatch(grace)
    said = [e for e in (watch.observe(ok) for ok in samples) if e is not None]
    assert all(a != b for a, b in itertools.pairwise(said))  # lost, regained, lost, ...
    assert not said or said[0] == "ready.lost"
    first_ready = samples.index(True) if True in samples else len(samples)
    # lost is said exactly when `grace` misses in a row follow some ready sample
    run, expected_lost = 0, 0
    lost = False
    for ok in samples[first_ready:]:
        run = 0 if ok else run + 1
        if ok:
            lost = False
        elif run >= grace and not lost:
            lost, expected_lost = True, expected_lost + 1
    assert said.count("ready.lost") == expected_lost


async def test_watch_ready_logs_a_loss_after_two_seconds(autojump_clock):
    out = io.StringIO()
    setup_logging("info", stream=out)
    state = {"ok": True}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(watch_ready, lambda: (state["ok"], "why"), every=1.0))
            await trio.sleep(5.5)
            state["ok"] = False
            await trio.sleep(3)
            state["ok"] = True
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    finally:
        setup_logging("info")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["event"], d["why"]) for d in lines] == [
        ("ready.lost", "why"),
        ("ready.regained", "why"),
    ]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system root trusts: the receiver's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hook receiver")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "receiver.pem", tmp_path / "receiver-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_an_https_webhook_is_verified_against_its_ca_file(tmp_path):
    cert, key = _self_signed(tmp_path)
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_port}/secure"
    try:
        trusted = check_hooks([{"on": ["a"], "url": url, "ca_file": str(cert)}])[0]
        trio.run(deliver, trusted, b'{"event":"a"}')
        assert Receiver.got[-1] == ("/secure", b'{"event":"a"}')
        system_roots = check_hooks([{"on": ["a"], "url": url}])[0]
        with pytest.raises(DeliveryError, match="certificate verify failed"):
            trio.run(deliver, system_roots, b"{}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_ca_file_is_said_at_load_time(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"^setting 'hooks': hooks\[0\]\.ca_file .*no such file$"):
        check_hooks([{"on": ["a"], "url": "https://h/", "ca_file": str(missing)}])
