"""`--workers N`: real supervisor and worker processes sharing one listener.

What a single proxy promises must hold for the whole: every worker serves
(the kernel spreads connections over them), every worker rotates, SIGHUP
reloads and SIGTERM drains every worker, and the probes speak for all of
them.  The pure parts (the shares of --max-connections, the merged metrics)
are checked directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from contextlib import ExitStack
from urllib.error import HTTPError
from urllib.request import urlopen

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.daemon import WorkerSlot
from proxy.workers import merge_metrics
from tally.app.launch import Daemon, tally_argv
from tests.e2e.conftest import start_agent
from tests.proxy.conftest import Running, client_context, tls_connect, wait_until
from tests.proxy.inprocess import server_settings
from tests.proxy.test_e2e_ops import echo_once, replace_files, served_serial


@given(st.integers(1, 100_000), st.integers(1, 64))
def test_worker_shares_of_max_connections_add_up_exactly(total, count):
    shares = [WorkerSlot(i, count).share(total) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_merged_metrics_label_every_sample_with_its_worker():
    one = (
        "# HELP tally_proxy_connections_total Connections.\n"
        "# TYPE tally_proxy_connections_total counter\n"
        "tally_proxy_connections_total 3.0\n"
        '# TYPE tally_proxy_svid_info gauge\ntally_proxy_svid_info{serial="a b}"} 1.0\n'
    )
    two = one.replace("3.0", "4.0")
    merged = merge_metrics([(0, one), (1, two)])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("tally_proxy_connections_total", (("worker", "0"),))] == 3
    assert samples[("tally_proxy_connections_total", (("worker", "1"),))] == 4
    assert samples[("tally_proxy_svid_info", (("serial", "a b}"), ("worker", "1")))] == 1
    assert merged.count("# TYPE tally_proxy_connections_total") == 1


def by_worker(proxy: Running, name: str) -> dict[str, float]:
    """A metric's value per worker, from the supervisor's /metrics."""
    with urlopen(f"http://{proxy.metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and "worker" in s.labels:
                values[s.labels["worker"]] = values.get(s.labels["worker"], 0.0) + s.value
    return values


def test_bad_worker_counts_are_one_line_errors(certs):
    for bad in ("0", "lots", "-2"):
        argv = tally_argv(
            "proxy", "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
            "--allow-id", "spiffe://example.org/web", *certs["api"].files(), "--workers", bad,
        )  # fmt: skip
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "workers" in lines[0] and repr(bad) in lines[0], done.stderr


def test_two_workers_share_the_port_rotate_reload_and_drain(
    start_proxy, certs, echo_backend, tmp_path
):
    live = tmp_path / "live"
    live.mkdir()
    replace_files(certs["api"].dir, live)
    config = tmp_path / "proxy.toml"
    config.write_text('allow_id = ["spiffe://example.org/web"]\nmax_connections = 101\n')
    proxy = start_proxy(
        "server", "--workers", "2", "--config", str(config), "--target", echo_backend.address,
        "--drain-timeout", "20s",
        "--cert", str(live / "svid.pem"), "--key", str(live / "key.pem"),
        "--bundle", str(live / "bundle.pem"),
    )  # fmt: skip
    assert proxy.daemon.events("proxy.started")[0]["workers"] == 2
    with urlopen(f"http://{proxy.metrics}/readyz", timeout=5) as resp:
        assert resp.read().decode().startswith("ready: 2 workers ready")
    ctx = client_context(certs["web"], certs["web"].bundle)

    # Spread: the kernel hashes connections over both workers' sockets.
    with ExitStack() as open_now:
        for i in range(24):
            sock = open_now.enter_context(tls_connect(proxy.port, ctx))
            assert echo_once(sock, b"%d" % i) == b"%d" % i
        per_worker = by_worker(proxy, "tally_proxy_connections_total")
        assert set(per_worker) == {"0", "1"} and sum(per_worker.values()) == 24
        assert all(n > 0 for n in per_worker.values()), per_worker

    # Rotation: each worker watches the files and swaps in the new SVID.
    replace_files(certs["api2"].dir, live)
    rotated = proxy.daemon.wait_for("svid.rotated", timeout=10, count=2)
    assert rotated["serial"] == certs["api2"].serial
    wait_until(
        lambda: by_worker(proxy, "tally_proxy_rotations_total") == {"0": 1.0, "1": 1.0},
        what="both workers to count their rotation",
    )
    assert {served_serial(proxy.port, ctx) for _ in range(12)} == {certs["api2"].serial}

    # Reload: SIGHUP reaches every worker, each with its exact share of the limit.
    config.write_text('allow_id = ["spiffe://example.org/web"]\nmax_connections = 7\n')
    with tls_connect(proxy.port, ctx) as established:
        assert echo_once(established, b"before") == b"before"
        proxy.daemon.signal(signal.SIGHUP)
        proxy.daemon.wait_for("config.reloaded", timeout=10, count=2)
        shares = sorted(e["max_connections"] for e in proxy.daemon.events("config.reloaded"))
        assert shares == [7, 7]  # the setting as read; each worker then takes 4 or 3
        assert echo_once(established, b"after") == b"after"

        # Drain: SIGTERM reaches every worker; established connections finish.
        proxy.daemon.signal(signal.SIGTERM)
        proxy.daemon.wait_for("proxy.draining", timeout=10, count=3)  # supervisor and workers

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                return False
            return False

        wait_until(refused, what="every worker's listener to close")
        try:
            with urlopen(f"http://{proxy.metrics}/readyz", timeout=5):
                raise AssertionError("ready while draining")
        except HTTPError as exc:
            assert exc.code == 503 and b"draining" in exc.read()
        assert echo_once(established, b"still here") == b"still here"
    assert proxy.daemon.proc is not None and proxy.daemon.proc.wait(20) == 0
    assert len(proxy.daemon.events("proxy.worker_stopped")) == 2
    assert proxy.daemon.events("proxy.stopped")


def test_every_worker_rotates_on_the_workload_api_stream(
    start_proxy, cas, certs, echo_backend, tmp_path
):
    ca = cas["example.org"]
    agent = start_agent(ca, tmp_path, "workers-node")
    try:
        entry = ca.json(
            "entry", "create", "--spiffe-id", "spiffe://example.org/api-workers",
            "--parent-id", agent.spiffe_id, "--selector", f"unix:uid:{os.geteuid()}",
            "--ttl", "1h",
        )  # fmt: skip
        proxy = start_proxy(
            "server", "--workers", "2", "--workload-socket", agent.socket,
            "--target", echo_backend.address, "--allow-id", "spiffe://example.org/web",
        )  # fmt: skip
        ctx = client_context(certs["web"], certs["web"].bundle)
        first = served_serial(proxy.port, ctx)
        # A new SVID from the agent reaches both workers, each on its own stream.
        ca.json("entry", "update", entry["id"], "--ttl", "50m")
        rotated = proxy.daemon.wait_for("svid.rotated", timeout=20, count=2)
        serials = {e["serial"] for e in proxy.daemon.events("svid.rotated")}
        assert serials == {rotated["serial"]} and rotated["old_serial"] == first
        wait_until(
            lambda: by_worker(proxy, "tally_proxy_rotations_total") == {"0": 1.0, "1": 1.0},
            what="both workers to count their rotation",
        )
        assert {served_serial(proxy.port, ctx) for _ in range(12)} == {rotated["serial"]}
    finally:
        agent.daemon.stop()


def test_workers_share_an_inherited_unix_listener_and_the_supervisor_removes_it(
    certs, echo_backend, tmp_path
):
    path = tmp_path / "proxy.sock"
    daemon = Daemon(
        "proxy-unix",
        [
            "proxy", "server", "--workers", "2", "--listen", str(path),
            "--metrics", "127.0.0.1:0", "--target", echo_backend.address,
            "--allow-id", "spiffe://example.org/web", *certs["api"].files(),
        ],
    )  # fmt: skip
    started = daemon.start("proxy.started")
    try:
        proxy = Running(daemon, started["listen"], started["metrics"])
        ctx = client_context(certs["web"], certs["web"].bundle)
        for i in range(10):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(10)
            raw.connect(str(path))
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                assert echo_once(sock, b"%d" % i) == b"%d" % i
        assert sum(by_worker(proxy, "tally_proxy_connections_total").values()) == 10
        assert len(daemon.events("proxy.worker_started")) == 2  # they log to the same stderr
    finally:
        daemon.stop()
    assert not path.exists()


def test_auto_is_one_worker_per_usable_cpu():
    assert server_settings(workers="auto").worker_count() == len(os.sched_getaffinity(0))
    assert server_settings(workers=" 3 ").worker_count() == 3


def test_bad_identity_files_end_the_start_with_one_line_not_one_per_worker(tmp_path):
    argv = tally_argv(
        "proxy", "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
        "--allow-id", "spiffe://example.org/web", "--workers", "2",
        "--cert", str(tmp_path / "no.pem"), "--key", str(tmp_path / "no.key"),
        "--bundle", str(tmp_path / "no.bundle"),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no.pem" in lines[0], done.stderr
