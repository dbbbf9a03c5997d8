"""The docs in docs/ checked against the code, so they cannot drift from it.

- docs/configuration.md is generated from the settings schemas; it must equal
  what `docs/generate.py` renders now.
- Every ``tally ...`` command shown in a shell block of the docs (and the README)
  must parse with the real `tally` parser, and a daemon command must also pass
  the real config loader.
- docs/metrics.md must list exactly the metric families each daemon exports:
  a real CA, agent and proxy are started and their ``/metrics`` scraped once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
import urllib.request
from pathlib import Path

import pytest

import agent.cli
import ca.cli
import proxy.cli
from agent.settings import AgentSettings
from ca.cli import call
from ca.settings import CASettings
from proxy.settings import ClientSettings, ServerSettings
from tally.app.cli import build_parser
from tally.app.launch import Daemon
from tally.ops.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TD = "example.org"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


# -- configuration reference ------------------------------------------------------------


def test_configuration_reference_is_generated_from_the_schemas():
    gen = _generator()
    committed = (DOCS / "configuration.md").read_text()
    assert committed == gen.render(), (
        f"docs/configuration.md is out of date with the settings schemas; "
        f"regenerate it with: {gen.COMMAND}"
    )


def test_configuration_reference_names_every_setting():
    text = (DOCS / "configuration.md").read_text()
    for schema in (CASettings, AgentSettings, ServerSettings, ClientSettings):
        for name in (f.name for f in schema.__dataclass_fields__.values()):
            assert f"| `{name}` |" in text, f"{schema.__name__}.{name} missing"


# -- commands shown in the docs ---------------------------------------------------------

SCHEMAS = {
    ca.cli.cmd_run: CASettings,
    agent.cli.cmd_run: AgentSettings,
    proxy.cli.cmd_server: ServerSettings,
    proxy.cli.cmd_client: ClientSettings,
}
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


def shown_commands(path: Path) -> list[str]:
    """Each ``tally`` command line in the file's ```sh blocks, continuation lines joined."""
    commands = []
    for block in SHELL_BLOCK.findall(path.read_text()):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("tally "):
                commands.append(line)
    return commands


def command_words(command: str) -> list[str]:
    """The words of a shell command line up to its first redirection, pipe or list operator."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if set(word) <= set("();<>|&"):
            break
        words.append(word)
    return words


DOC_FILES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
COMMANDS = [(p.name, c) for p in DOC_FILES for c in shown_commands(p)]


def test_the_docs_show_commands():
    guide = [c for name, c in COMMANDS if name == "operators-guide.md"]
    assert len(guide) >= 20, guide


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_shown_command_is_real(doc, command):
    argv = command_words(command)[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        problem = err.getvalue().strip().splitlines()[-1:]
        pytest.fail(f"{doc}: `{command}` does not parse: {' '.join(problem)}")
    assert hasattr(args, "func"), f"{doc}: `{command}` is not a complete command"
    schema = SCHEMAS.get(args.func)
    if schema is not None and getattr(args, "config", None) is None:
        try:
            load(schema, args, env={})
        except ConfigError as exc:
            pytest.fail(f"{doc}: `{command}` would not start: {exc}")


# -- metrics ------------------------------------------------------------------------------

METRIC_ROW = re.compile(r"^\| `(tally_[a-z0-9_]+)` \| (counter|gauge|info|histogram) \|", re.M)
EXPOSED_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)


def documented_metrics() -> dict[str, set[tuple[str, str]]]:
    """daemon -> {(scraped name, scraped type)} from the tables of docs/metrics.md."""
    out: dict[str, set[tuple[str, str]]] = {"ca": set(), "agent": set(), "proxy": set()}
    for name, kind in METRIC_ROW.findall((DOCS / "metrics.md").read_text()):
        daemon = name.split("_")[1]
        # The text format has no info type: an info metric is a gauge named *_info.
        out[daemon].add((name, "gauge" if kind == "info" else kind))
    return out


def scrape(address: str) -> set[tuple[str, str]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return set(EXPOSED_TYPE.findall(text))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Start a CA, an agent attested to it and a server proxy; scrape each once."""
    base = tmp_path_factory.mktemp("docs")
    admin = str(base / "admin.sock")
    daemons: list[Daemon] = []

    def start(role: str, args: list[str], event: str) -> dict:
        daemon = Daemon(role, args)
        daemons.append(daemon)
        return daemon.start(event)

    try:
        ca_up = start(
            "ca",
            ["ca", "run", "--trust-domain", TD, "--data-dir", str(base / "ca"),
             "--listen", "127.0.0.1:0", "--admin-socket", admin, "--metrics", "127.0.0.1:0"],
            "ca.started",
        )  # fmt: skip
        token = call(admin, "POST", "/v1/tokens", {})["token"]
        bundle = call(admin, "GET", "/v1/bundle")["bundle"]
        (base / "bundle.pem").write_text(bundle)
        agent_up = start(
            "agent",
            ["agent", "run", "--trust-domain", TD, "--server", ca_up["listen"],
             "--trust-bundle", str(base / "bundle.pem"), "--data-dir", str(base / "agent"),
             "--socket", str(base / "agent.sock"), "--metrics", "127.0.0.1:0",
             "--join-token", token],
            "agent.started",
        )  # fmt: skip
        minted = call(admin, "POST", "/v1/x509/mint", {"spiffe_id": f"spiffe://{TD}/web"})
        (base / "svid.pem").write_text(minted["cert_chain"])
        fd = os.open(base / "key.pem", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(minted["private_key"])
        proxy_up = start(
            "proxy",
            ["proxy", "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9",
             "--cert", str(base / "svid.pem"), "--key", str(base / "key.pem"),
             "--bundle", str(base / "bundle.pem"), "--allow-trust-domain", TD,
             "--metrics", "127.0.0.1:0"],
            "proxy.started",
        )  # fmt: skip
        yield {
            "ca": scrape(ca_up["metrics"]),
            "agent": scrape(agent_up["metrics"]),
            "proxy": scrape(proxy_up["metrics"]),
        }
    finally:
        for daemon in reversed(daemons):
            if daemon.name == "ca":
                # A graceful stop waits out the agent's open long poll (5 s drain);
                # this test is about metric names, so do not spend that time.
                daemon.kill()
            else:
                daemon.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("daemon", ["ca", "agent", "proxy"])
def test_metrics_doc_lists_what_each_daemon_exports(exported, daemon):
    documented = documented_metrics()[daemon]
    real = exported[daemon]
    assert real, f"the {daemon} exported no metrics"
    assert documented == real, (
        f"docs/metrics.md disagrees with the {daemon}'s /metrics: "
        f"undocumented {sorted(real - documented)}, not exported {sorted(documented - real)}"
    )


def test_metrics_doc_rows_parse():
    """The table parser above sees every row, so a misspelt row cannot hide."""
    text = (DOCS / "metrics.md").read_text()
    rows = re.findall(r"^\| `tally_[a-z0-9_]+` \|", text, re.M)
    assert len(rows) == sum(len(v) for v in documented_metrics().values())
