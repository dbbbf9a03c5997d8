"""Private keys and join token secrets never leave through logs, metrics or CLI output.

Theory: logs and metrics are shipped, indexed and read far more widely than
key files, so one key or token written there is leaked.  A whole mesh runs
here at debug level (CA, agent, a proxy on the Workload API, the CLI doing
its everyday work, a bad guess at a token), everything it printed is
collected, and every private key that exists (CA keys, the agent's key, the
workload key the proxy holds, a minted key) and every token secret is looked
for in it, in every encoding a careless line could use: PEM lines, base64 of
the DER (also unwrapped or URL-safe), hex of the private number, and any
32-character window of those.  The search is shown to work on the key files
themselves, and on the one output that must carry a secret: `tally ca token
create` prints the token it made, by design.

Key files are 0600 in 0700 directories.  The CA's refusal of a readable key
is tests/e2e/test_ca.py (test_refuses_to_start_with_a_readable_key); the agent
key's mode after a restart is test_sigkill_restart_needs_no_token there.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import ssl
import stat
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tally.app.launch import Daemon, run_cli
from tests.e2e.conftest import CA, Agent

WINDOW = 24  # characters: 18 bytes of a private number are never a coincidence


def key_needles(pem: bytes) -> set[str]:
    """Windows onto every encoding of a key's private number a careless line might carry.

    Only the private number counts: the rest of the DER (curve, public point)
    is also in every certificate of that key, which is public.
    """
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    raw = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    forms = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()]
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        at = der.index(raw)
        # Base64 characters that encode bytes of the private number and nothing else.
        first, last = -(-at // 3) * 4, (at + len(raw)) // 3 * 4
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.append(encode(der).decode()[first:last])
    needles: set[str] = set()
    for form in forms:
        assert len(form) >= WINDOW
        needles.update(form[i : i + WINDOW] for i in range(0, len(form) - WINDOW + 1, 2))
    return needles


def private_pem(path: Path) -> bytes:
    data = path.read_bytes()
    start = data.index(b"-----BEGIN PRIVATE KEY-----")
    end = data.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----")
    return data[start:end]


def unwrapped(text: str) -> str:
    """PEM lines joined again, also where JSON escaped the line breaks."""
    return "".join(text.replace("\\n", "").replace("\\r", "").split())


def leaks(texts: dict[str, str], needles: set[str]) -> list[str]:
    return [name for name, text in texts.items() if any(n in unwrapped(text) for n in needles)]


def http_get(address: str, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def touch_proxy(proxy_listen: str, minted: Path, bundle: Path) -> None:
    """One admitted and one refused handshake, so the proxy logs connections."""
    host, port = proxy_listen.rsplit(":", 1)
    for cert in (minted, None):
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(cert / "svid.pem", cert / "key.pem")
        try:
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"hello")
                    tls.recv(1)
        except (OSError, ssl.SSLError):
            pass  # refused or no backend: either way the proxy has a story to log


def test_no_key_or_token_secret_in_logs_metrics_or_cli_output(
    ca_factory, agent_factory, tmp_path: Path
):
    ca: CA = ca_factory("--log-level", "debug")
    agent: Agent = agent_factory(ca, "node-1", "--log-level", "debug")
    cli: dict[str, str] = {}

    def run(name: str, *args: str) -> str:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        cli[name] = result.stdout + result.stderr
        return result.stdout

    admin = ("--admin-socket", ca.admin_socket)
    made = run("token create", "ca", "token", "create", *admin)
    token = made.split("Token: ", 1)[1].split()[0]
    agent_token = agent.daemon.args[agent.daemon.args.index("--join-token") + 1]
    run(
        "entry create",
        "ca", "entry", "create", "--spiffe-id", "spiffe://example.org/web",
        "--parent-id", agent.spiffe_id, "--selector", f"unix:uid:{os.geteuid()}", *admin,
    )  # fmt: skip
    minted = tmp_path / "minted"
    minted.mkdir()
    run("x509 mint", "ca", "x509", "mint", "--spiffe-id", "spiffe://example.org/m",
        "--out", str(minted), *admin)  # fmt: skip
    run("x509 mint json", "ca", "x509", "mint", "--spiffe-id", "spiffe://example.org/m",
        "--out", str(minted), "--output", "json", *admin)  # fmt: skip
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    proxy = Daemon(
        "proxy",
        ["proxy", "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9",
         "--workload-socket", agent.socket, "--allow-trust-domain", "example.org",
         "--metrics", "127.0.0.1:0", "--log-level", "debug"],
    )  # fmt: skip
    started = proxy.start("proxy.started", timeout=60)
    try:
        run("api fetch", "agent", "api", "fetch", "--socket", agent.socket, "--write",
            str(fetched))  # fmt: skip
        run("api fetch json", "agent", "api", "fetch", "--socket", agent.socket,
            "--output", "json")  # fmt: skip
        touch_proxy(started["listen"], minted, minted / "bundle.pem")
        guess = f"{token.split('.')[0]}.{secrets.token_urlsafe(32)}"
        bad = run_cli(
            "agent", "run", "--trust-domain", "example.org", "--server", ca.listen,
            "--trust-bundle", str(minted / "bundle.pem"), "--data-dir", str(tmp_path / "guess"),
            "--socket", str(tmp_path / "guess.sock"), "--join-token", guess,
        )  # fmt: skip
        assert bad.returncode == 1
        cli["bad guess"] = bad.stdout + bad.stderr
        for name, args in {
            "entry list": ("entry", "list"),
            "agent list": ("agent", "list"),
            "agent show": ("agent", "show", agent.spiffe_id),
            "bundle show": ("bundle", "show"),
            "audit list": ("audit", "list", "--limit", "5000"),
            "audit json": ("audit", "list", "--limit", "5000", "--output", "json"),
            "audit verify": ("audit", "verify"),
            "health": ("health", "--output", "json"),
        }.items():
            run(name, "ca", *args, *admin)
        metrics = {
            "ca metrics": http_get(ca.metrics, "/metrics"),
            "agent metrics": http_get(agent.metrics, "/metrics"),
            "proxy metrics": http_get(started["metrics"], "/metrics"),
            "ca readyz": http_get(ca.metrics, "/readyz"),
            "agent readyz": http_get(agent.metrics, "/readyz"),
            "proxy readyz": http_get(started["metrics"], "/readyz"),
        }
    finally:
        proxy.stop()
    agent.daemon.stop()
    ca.daemon.stop()
    logs = {
        "ca log": "".join(ca.daemon.raw),
        "agent log": "".join(agent.daemon.raw),
        "proxy log": "".join(proxy.raw),
    }
    assert all(logs.values()) and "workload" in logs["agent log"]

    keys = {
        **{f"CA key {p.name}": p for p in (ca.data_dir / "keys").glob("*.pem")},
        "agent key": agent.data_dir / "agent_svid.pem",
        "workload key (the proxy's)": fetched / "key.pem",
        "minted key": minted / "key.pem",
    }
    assert len(keys) >= 5  # a root and an intermediate at least
    outputs = {**logs, **metrics, **{k: v for k, v in cli.items() if k != "token create"}}
    for what, path in keys.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, what
        needles = key_needles(private_pem(path))
        assert leaks({"the key file": path.read_text()}, needles)  # the search finds it
        assert leaks(outputs, needles) == [], f"{what} leaked"
    for directory in (ca.data_dir, ca.data_dir / "keys", agent.data_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    # The one output that must carry a secret: the token it was asked to make.
    assert token.split(".")[1] in cli["token create"]
    for secret in (token, agent_token, guess):
        needle = {secret.split(".")[1]}
        assert leaks(outputs, needle) == [], f"token secret {secret.split('.')[0]} leaked"
    # The token ids are there: the audit trail still names what was tried.
    assert guess.split(".")[0] in cli["audit json"]


def test_group_readable_keys_stop_both_daemons_until_fixed(ca_factory, agent_factory):
    """0644 on a CA key is tested in tests/e2e; here group-only and world-only bits, both
    daemons, and the control: the same files at 0600 start again."""
    ca: CA = ca_factory()
    agent: Agent = agent_factory(ca)
    agent.daemon.stop()
    ca.daemon.stop()
    key = next((ca.data_dir / "keys").glob("*.pem"))
    os.chmod(key, 0o640)
    result = run_cli(*ca.daemon.args)
    plain = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert result.returncode == 1 and len(plain) == 1
    assert str(key) in plain[0] and "0640" in plain[0]
    os.chmod(key, 0o600)
    ca.start_again()
    own = agent.data_dir / "agent_svid.pem"
    os.chmod(own, 0o604)
    result = run_cli(*agent.args)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert str(own) in result.stderr and "readable by group or others" in result.stderr
    os.chmod(own, 0o600)
    agent.start()
    assert agent.daemon.events("agent.resumed")
