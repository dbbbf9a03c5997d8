"""JWT-SVIDs end to end: a real CA and agent, py-spiffe's JWT client in its own
process, and PyJWT (which no one here wrote) on the published JWKS."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jwt as pyjwt
import pytest
import trio

from ca.cli import call
from tally.app.launch import SECRET_SHAPE, run_cli
from tally.wire import workload_client as wl
from tests.e2e.conftest import CA, ENGINES, make_ca, new_datastore, start_agent
from tests.e2e.mesh import start_proxy

UID = os.geteuid()
ISSUER = "https://oidc.example.org"
WEB = "spiffe://example.org/web"
OPS = "spiffe://example.org/ops"
ROOT = Path(__file__).parents[2]


def probe(socket: str, *args: str, timeout: float = 60) -> list[dict]:
    """tests/e2e/jwt_probe.py: py-spiffe in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.e2e.jwt_probe", socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def batch(socket: str, *ops: object) -> list[dict]:
    return probe(socket, json.dumps(list(ops)))


def fetch_token(socket: str, audience: str) -> str:
    """A JWT-SVID through our own Workload API client (in process, no py-spiffe)."""
    return trio.run(wl.fetch_jwt_svids, Path(socket), [audience])[0].token


def unsigned(claims: dict, header: dict) -> str:
    part = lambda obj: pyjwt.utils.base64url_encode(json.dumps(obj).encode()).decode()  # noqa: E731
    return f"{part(header)}.{part(claims)}."


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, ca_engine: str, request: pytest.FixtureRequest):
    base = tmp_path_factory.mktemp("jwt")
    ca = make_ca(
        base,
        "--jwt-propagation",
        "2s",
        "--default-jwt-ttl",
        "60s",
        "--oidc-listen",
        "127.0.0.1:0",
        "--oidc-issuer",
        ISSUER,
        datastore=new_datastore(ca_engine, request)(),
    )
    agent = start_agent(ca, base)
    ca.json(
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        agent.spiffe_id,
        "--selector",
        f"unix:uid:{UID}",
    )
    deadline = time.monotonic() + 15
    while True:  # until the entry has reached the agent
        try:
            fetch_token(agent.socket, "warmup")
            break
        except wl.WorkloadApiError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    yield ca, agent
    agent.daemon.stop()
    ca.daemon.stop()


@pytest.fixture(scope="module")
def seen(mesh):
    """What py-spiffe's JWT client gets from the agent: one process, every call."""
    ca, agent = mesh
    minted = mint(ca, OPS, "reports")["token"]
    none = unsigned(
        {"sub": WEB, "aud": ["reports"], "exp": int(time.time()) + 60},
        {"alg": "none", "kid": "x"},
    )
    ops = {
        "fetch": {"op": "fetch", "aud": ["reports"]},
        "again": {"op": "fetch", "aud": ["reports"]},
        "by_id": {"op": "fetch", "aud": ["reports"], "spiffe_id": WEB},
        "other_id": {"op": "fetch", "aud": ["reports"], "spiffe_id": "spiffe://example.org/nope"},
        "valid": {"op": "validate", "aud": "reports", "token_of": 0},
        "wrong_aud": {"op": "validate", "aud": "billing", "token_of": 0},
        "alg_none": {"op": "validate", "aud": "reports", "token": none},
        "minted": {"op": "validate", "aud": "reports", "token": minted},
        "bundles": {"op": "bundles"},
        "source": {"op": "source", "aud": "reports"},
    }
    return dict(zip(ops, batch(agent.socket, *ops.values()), strict=True))


def oidc(ca: CA) -> str:
    return ca.daemon.events("ca.started")[-1]["oidc"]


def get(url: str) -> tuple[dict, dict]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def admin(ca: CA, method: str, target: str, body: object | None = None):
    """The admin API in process (the CLI's own `call`), where a test needs no CLI output:
    starting a `tally` process per call is most of an e2e test's time."""
    return call(ca.admin_socket, method, target, body)


def mint(ca: CA, spiffe_id: str, audience: str) -> dict:
    return admin(ca, "POST", "/v1/jwt/mint", {"spiffe_id": spiffe_id, "audience": audience})


def jwks(ca: CA) -> dict:
    return admin(ca, "GET", "/v1/bundle?format=spiffe")


def pyjwt_validate(ca: CA, token: str, audience: str) -> dict:
    keys = pyjwt.PyJWKSet.from_dict(
        {"keys": [k for k in jwks(ca)["keys"] if k.get("use") == "jwt-svid"]}
    )
    kid = pyjwt.get_unverified_header(token)["kid"]
    return pyjwt.decode(token, keys[kid].key, algorithms=["ES256", "RS256"], audience=audience)


def test_py_spiffe_fetches_a_token_that_pyjwt_validates(mesh, seen):
    ca, _ = mesh
    out = seen["fetch"]
    assert out["spiffe_id"] == WEB, out
    assert out["audience"] == ["reports"] and out["validated_locally"]
    claims = pyjwt_validate(ca, out["token"], "reports")
    assert claims["sub"] == WEB and claims["iss"] == ISSUER
    assert claims["exp"] - claims["iat"] == 60
    # cached: a second fetch within half-life gets the same token
    assert seen["again"]["token"] == out["token"]
    # ... and issuance is audited, sampled, without the token
    records = admin(ca, "GET", f"/v1/audit?event=jwt.issued&spiffe_id={WEB}")["records"]
    assert len(records) == 2  # "warmup" and "reports"
    assert all(out["token"] not in json.dumps(r) for r in records)


def test_fetch_with_a_spiffe_id_and_permission_denied(seen):
    assert seen["by_id"]["spiffe_id"] == WEB
    assert "PERMISSION_DENIED" in seen["other_id"]["error"]


def test_validate_jwt_svid_accepts_good_and_refuses_hostile_tokens(seen):
    assert seen["valid"] == {"spiffe_id": WEB}
    assert "INVALID_ARGUMENT" in seen["wrong_aud"]["error"]
    assert "wrong_audience" in seen["wrong_aud"]["error"]
    assert "alg_not_allowed" in seen["alg_none"]["error"]
    # An operator's token, minted at the CA, validates at the agent too.
    assert seen["minted"] == {"spiffe_id": OPS}


def test_jwt_source_and_bundles(mesh, seen):
    ca, _ = mesh
    health = admin(ca, "GET", "/v1/health")
    assert health["jwt_signing_key"]["alg"] == "ES256" and health["jwt_keys_published"] >= 1
    assert seen["source"]["spiffe_id"] == WEB
    published = {k["kid"] for k in jwks(ca)["keys"] if k.get("use") == "jwt-svid"}
    assert set(seen["source"]["kids"]) == published
    assert seen["bundles"]["kids"] == {"example.org": sorted(published)}


def test_oidc_discovery_serves_public_keys_that_pyjwt_uses(mesh):
    ca, agent = mesh
    doc, headers = get(f"http://{oidc(ca)}/.well-known/openid-configuration")
    assert doc["issuer"] == ISSUER and doc["jwks_uri"] == f"{ISSUER}/keys"
    assert "max-age" in headers["Cache-Control"]
    path = urllib.parse.urlsplit(doc["jwks_uri"]).path
    keys, headers = get(f"http://{oidc(ca)}{path}")
    assert "max-age" in headers["Cache-Control"]
    for key in keys["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key), key
        assert key["use"] == "sig" and key["kid"]
    token = fetch_token(agent.socket, "reports")
    client = pyjwt.PyJWKClient(f"http://{oidc(ca)}{path}")
    claims = pyjwt.decode(
        token,
        client.get_signing_key_from_jwt(token).key,
        algorithms=doc["id_token_signing_alg_values_supported"],
        audience="reports",
        issuer=ISSUER,
    )
    assert claims["sub"] == "spiffe://example.org/web"


def test_bundle_stream_is_pushed_on_rotation_and_the_new_key_signs_after(mesh):
    ca, agent = mesh
    # A relying party that has already cached the keys, before the rotation.  PyJWKClient
    # refetches on an unknown kid at most every cooldown_duration (30 s by default, well
    # inside the default jwt_propagation of 300 s); this test's propagation is 2 s.
    relying = pyjwt.PyJWKClient(f"http://{oidc(ca)}/keys", lifespan=60, cooldown_duration=1)
    relying.get_jwk_set()
    before = {k["kid"] for k in jwks(ca)["keys"] if k.get("use") == "jwt-svid"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.jwt_probe", agent.socket, "stream", "20", "2"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())  # the stream is open: now rotate
    rotated = admin(ca, "POST", "/v1/rotate", {"jwt": True})
    assert rotated["rotated"] == "jwt"
    # a JWT key event is anchored like any key event (the chain head signed)
    deadline = time.monotonic() + 5  # the log reader thread may trail the answer
    while not any(a.get("reason") == "key_event" for a in ca.daemon.events("audit.anchor")):
        assert time.monotonic() < deadline, ca.daemon.events("audit.anchor")
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=30)
    updates = [first["kids"]["example.org"]]
    updates += [json.loads(line)["kids"]["example.org"] for line in out.splitlines()]
    assert set(updates[0]) == before
    new = set(updates[-1]) - before
    assert len(new) == 1, updates  # published (pushed) before it signs
    # after the propagation window the new key signs, and the old one is still published
    (new_kid,) = new
    deadline = time.monotonic() + 15
    while True:
        minted = mint(ca, OPS, "x")
        if minted["kid"] == new_kid:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert before <= {k["kid"] for k in jwks(ca)["keys"] if k.get("use") == "jwt-svid"}
    assert pyjwt_validate(ca, minted["token"], "x")["sub"] == "spiffe://example.org/ops"
    # Discovery alone: the relying party finds the new kid by refetching the keys.
    key = relying.get_signing_key_from_jwt(minted["token"]).key
    claims = pyjwt.decode(minted["token"], key, algorithms=["ES256"], audience="x", issuer=ISSUER)
    assert claims["sub"] == "spiffe://example.org/ops"


# -- bearer tokens through the proxies ------------------------------------------------


class TokenOnlyService(http.server.BaseHTTPRequestHandler):
    """A service that understands bearer tokens and nothing else: it validates them with
    PyJWT against the CA's published keys."""

    keys: pyjwt.PyJWKSet

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization", "")
        try:
            token = auth.removeprefix("Bearer ")
            kid = pyjwt.get_unverified_header(token)["kid"]
            claims = pyjwt.decode(
                token, self.keys[kid].key, algorithms=["ES256"], audience="reports"
            )
            status, body = 200, json.dumps({"sub": claims["sub"]}).encode()
        except Exception as exc:
            status, body = 401, str(type(exc).__name__).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def proxies(mesh):
    ca, agent = mesh
    TokenOnlyService.keys = pyjwt.PyJWKSet.from_dict(
        {"keys": [k for k in jwks(ca)["keys"] if k.get("use") == "jwt-svid"]}
    )
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenOnlyService)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    backend = f"127.0.0.1:{service.server_address[1]}"
    common = ["--http", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    common += ["--workload-socket", agent.socket]
    server = start_proxy(
        "jwt-server",
        ["server", *common, "--target", backend, "--allow-id", WEB, "--require-jwt", "reports"],
    )
    lb = start_proxy(
        "jwt-lb-server",
        [
            "server",
            *common,
            "--target",
            backend,
            "--allow-id",
            WEB,
            "--require-jwt",
            "reports",
            "--no-client-cert",
        ],
    )
    client = start_proxy(
        "jwt-client",
        [
            "client",
            *common,
            "--target",
            server.listen,
            "--expect-id",
            WEB,
            "--inject-jwt",
            "reports",
        ],
    )
    yield server, lb, client
    for p in (client, lb, server):
        p.daemon.stop()
    service.shutdown()
    service.server_close()


def get_via(address: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{address}/", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def tls_get(ca: CA, address: str, token: str | None) -> tuple[int, dict]:
    """Straight to the --no-client-cert listener: TLS without a client certificate."""
    ctx = ssl.create_default_context(cadata=admin(ca, "GET", "/v1/bundle")["bundle"])
    ctx.check_hostname = False
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    conn.request("GET", "/", headers={"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders())


def test_client_proxy_injects_a_token_the_bearer_only_service_accepts(proxies):
    _, _, client = proxies
    status, body = get_via(client.listen)
    assert (status, json.loads(body)) == (200, {"sub": WEB})
    # the app's own Authorization is replaced, not forwarded
    status, body = get_via(client.listen, {"Authorization": "Bearer not-a-token"})
    assert (status, json.loads(body)) == (200, {"sub": WEB})


def test_server_proxy_without_client_certs_requires_a_valid_token(mesh, proxies):
    ca, agent = mesh
    _, lb, _ = proxies
    token = fetch_token(agent.socket, "reports")
    assert tls_get(ca, lb.listen, token)[0] == 200
    other = mint(ca, OPS, "reports")
    _head, body, _sig = token.split(".")
    none = pyjwt.utils.base64url_encode(b'{"alg":"none","kid":"x"}').decode() + f".{body}."
    wrong_aud = fetch_token(agent.socket, "billing")
    cases = {
        None: "missing_token",
        none: "alg_not_allowed",
        wrong_aud: "wrong_audience",
        other["token"]: "not_allowed",
    }
    for bad, reason in cases.items():
        status, headers = tls_get(ca, lb.listen, bad)
        assert status == 401, reason
        assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
        denied = lb.daemon.wait_for("peer.denied", count=list(cases).index(bad) + 1)
        assert denied["reason"] == reason
    for p in proxies:
        assert not any(token in line or other["token"] in line for line in p.daemon.raw)


def test_no_token_in_any_log(mesh, proxies):
    ca, agent = mesh
    for daemon in (ca.daemon, agent.daemon, *(p.daemon for p in proxies)):
        assert not [line for line in daemon.raw if SECRET_SHAPE.search(line)], daemon.name


def test_agent_cli_fetches_and_validates_and_ca_cli_mints_audited(mesh):
    ca, agent = mesh
    out = run_cli(
        "agent",
        "api",
        "fetch-jwt",
        "--audience",
        "reports",
        "--socket",
        agent.socket,
        "--output",
        "json",
    )
    assert out.returncode == 0, out.stderr
    token = json.loads(out.stdout)["svids"][0]["token"]
    bad = run_cli(
        "agent", "api", "validate-jwt", "--audience", "billing", token, "--socket", agent.socket
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "wrong_audience" in bad.stderr
    assert token not in bad.stderr and "Traceback" not in bad.stderr
    minted = ca.cli(
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/batch",
        "--audience",
        "vault",
        "--ttl",
        "2m",
    ).stdout.strip()
    claims = pyjwt_validate(ca, minted, "vault")
    assert claims["exp"] - claims["iat"] == 120
    records = admin(ca, "GET", "/v1/audit?event=jwt.issued&spiffe_id=spiffe://example.org/batch")[
        "records"
    ]
    assert [r["detail"]["kind"] for r in records] == ["mint"]
    assert admin(ca, "GET", "/v1/audit/verify")["ok"]
