"""deploy/ is checked against the real code, so that no sample or manifest can rot.

Rules:

1. Every TOML sample, in ``deploy/config`` or embedded in a Kubernetes
   ConfigMap, is loaded by the real loader (`tally.ops.config.load`) with the
   schema of the command that reads it, and that command line (a unit's
   ``ExecStart``, a container's arguments) is parsed by the real `tally`
   argument parser. Unknown keys and bad values therefore fail here.
2. Paths agree across files: the directory that systemd or Kubernetes provides
   is the one the config names, the proxy's Workload API socket is the
   agent's, the probe port is the metrics port.
3. The manifests are read by `parse_yaml`, a strict reader for the block-YAML
   subset they are written in (PyYAML is not a dependency). Anything outside
   the subset (anchors, tags, flow collections, plain scalars that YAML 1.1
   and 1.2 read differently such as ``0400``, ``yes`` or ``1.0``) is an error
   rather than a guess, so the reader cannot silently see a manifest
   differently from kubectl.
4. ``systemd-analyze verify`` runs on the units when it is installed; that is
   the one test allowed to skip.
"""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import NoReturn

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent.cli
import ca.cli
import ca.server
import proxy.cli
from agent.settings import AgentSettings
from ca.settings import CASettings
from proxy.settings import ClientSettings, ServerSettings
from tally.app.cli import build_parser
from tally.ops.config import add_arguments, describe, load

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIG = DEPLOY / "config"
SYSTEMD = DEPLOY / "systemd"
KUBE = DEPLOY / "kubernetes"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BINARY = "/opt/tally/bin/tally"
COMMANDS = {
    ca.cli.cmd_run: CASettings,
    agent.cli.cmd_run: AgentSettings,
    proxy.cli.cmd_server: ServerSettings,
    proxy.cli.cmd_client: ClientSettings,
}


def command_schema(argv):
    """Parse a `tally` command line with the real parser; return its args and settings schema."""
    args = build_parser(argv[0]).parse_args(argv)
    return args, COMMANDS[args.func]


def load_file(schema, path, *, args=None, env=None):
    """Load settings the way a daemon does, reading ``path`` as its ``--config``."""
    if args is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser, schema)
        args = parser.parse_args([])
    args = argparse.Namespace(**{**vars(args), "config": str(path)})
    return load(schema, args, env={} if env is None else env)


# -- sample configs ---------------------------------------------------------------------

# Which command reads each sample: the unit tests below confirm it from ExecStart.
SAMPLES = {
    "ca.toml": CASettings,
    "agent.toml": AgentSettings,
    "proxy-web.toml": ServerSettings,
    "proxy-billing.toml": ClientSettings,
}
CLIENT_DROP_IN = "Environment=TALLY_PROXY_MODE=client"


def test_every_sample_is_covered():
    assert sorted(p.name for p in CONFIG.glob("*.toml")) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_loads_with_the_real_loader(name):
    cfg = load_file(SAMPLES[name], CONFIG / name)
    assert isinstance(cfg, SAMPLES[name])
    # Production paths, not a developer's checkout.
    for value in vars(cfg).values():
        if isinstance(value, Path):
            assert str(value).startswith(("/var/lib/tally/", "/run/tally/", "/etc/tally/")), value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_commented_out_settings_are_real_settings(name):
    """``# key = value`` lines are offered as alternatives; each must load too."""
    base = (CONFIG / name).read_text()
    schema = SAMPLES[name]
    known = {s.name for s in describe(schema)}
    offered = re.findall(r"^# ?([a-z_]+) = (.+)$", base, flags=re.MULTILINE)
    for key, value in offered:
        assert key in known, f"{name}: commented-out key {key!r} is not a setting"
        tomllib.loads(f"{key} = {value}")  # valid TOML on its own


def test_samples_hold_no_secrets():
    data = tomllib.loads((CONFIG / "agent.toml").read_text())
    assert "join_token" not in data


def test_agent_env_file_sets_the_variable_the_loader_reads():
    lines = [
        line
        for line in (CONFIG / "agent.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = dict(line.split("=", 1) for line in lines)
    assert list(env) == ["TALLY_JOIN_TOKEN"]
    assert env["TALLY_JOIN_TOKEN"] == "", "the sample must not carry a token"
    # The empty placeholder counts as unset; a filled-in one is the agent's join token.
    assert load_file(AgentSettings, CONFIG / "agent.toml", env=env).join_token is None
    filled = {"TALLY_JOIN_TOKEN": "5f2c9a"}
    assert load_file(AgentSettings, CONFIG / "agent.toml", env=filled).join_token == "5f2c9a"


def test_daemons_on_one_host_use_distinct_metrics_ports():
    ports = [load_file(schema, CONFIG / n).metrics.port for n, schema in SAMPLES.items()]
    assert len(set(ports)) == len(ports)


def test_proxy_samples_use_the_agent_socket():
    agent_socket = load_file(AgentSettings, CONFIG / "agent.toml").socket
    for name, schema in SAMPLES.items():
        if name.startswith("proxy-"):
            cfg = load_file(schema, CONFIG / name)
            assert cfg.workload_socket == f"unix://{agent_socket}"


# -- systemd units ----------------------------------------------------------------------


def parse_unit(text):
    """Sections of a unit file as lists of (key, value); keys may repeat, as in systemd."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    logical = ""
    for raw in text.splitlines():
        line = logical + raw.strip()
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        logical = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = line[1:-1]
            assert current not in sections, f"section {current} twice"
            sections[current] = []
            continue
        assert current is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def one(section, key):
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def timespan(text):
    m = re.fullmatch(r"([0-9]+)(s|min)", text)
    assert m, f"unexpected time span {text!r}"
    return int(m[1]) * (60 if m[2] == "min" else 1)


UNITS = ["tally-ca.service", "tally-agent.service", "tally-proxy@.service"]


def unit(name):
    return parse_unit((SYSTEMD / name).read_text())


def test_every_unit_is_covered():
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == sorted(UNITS)


def exec_start(service, instance=None, mode=None):
    """The unit's command line with its specifier and variable filled in."""
    argv = shlex.split(one(service, "ExecStart"))
    env = dict(v.split("=", 1) for k, v in service if k == "Environment")
    if mode is not None:
        env["TALLY_PROXY_MODE"] = mode
    out = []
    for word in argv:
        word = word.replace("%i", instance or "%i")
        for name, value in env.items():
            word = word.replace("${" + name + "}", value)
        assert "$" not in word and "%" not in word, word
        out.append(word)
    return out


def unit_config(service, instance=None, mode=None):
    """Run the unit's ExecStart through the real parser and load the sample it names."""
    argv = exec_start(service, instance, mode)
    assert argv[0] == BINARY
    args, schema = command_schema(argv[1:])
    path = PurePosixPath(args.config)
    assert path.parent == PurePosixPath("/etc/tally"), path
    return schema, load_file(schema, CONFIG / path.name, args=args)


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_sandboxed_and_restarts(name):
    u = unit(name)
    s = u["Service"]
    assert one(s, "Type") == "exec"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "User") not in ("root", "0")
    assert one(s, "NoNewPrivileges") == "yes"
    assert one(s, "ProtectSystem") == "strict"
    assert one(s, "PrivateTmp") == "yes"
    assert one(s, "UMask") == "0077"
    assert one(s, "RuntimeDirectory").startswith("tally/")
    assert one(s, "KillSignal") == "SIGTERM"
    assert one(u["Install"], "WantedBy") == "multi-user.target"
    # All three daemons reload their configuration on SIGHUP.
    reloads = [v for k, v in s if k == "ExecReload"]
    assert reloads == ["/bin/kill -HUP $MAINPID"]


def test_ca_unit_matches_its_config():
    s = unit("tally-ca.service")["Service"]
    schema, cfg = unit_config(s)
    assert schema is CASettings
    assert cfg.data_dir == Path("/var/lib") / one(s, "StateDirectory")
    assert one(s, "StateDirectoryMode") == "0700"
    assert cfg.admin_socket.parent == Path("/run") / one(s, "RuntimeDirectory")
    assert one(s, "RuntimeDirectoryMode") == "0700"
    assert one(s, "CapabilityBoundingSet") == ""
    assert timespan(one(s, "TimeoutStopSec")) > ca.server.DRAIN_SECONDS


def test_agent_unit_matches_its_config():
    s = unit("tally-agent.service")["Service"]
    schema, cfg = unit_config(s)
    assert schema is AgentSettings
    assert cfg.data_dir == Path("/var/lib") / one(s, "StateDirectory")
    assert one(s, "StateDirectoryMode") == "0700"
    assert cfg.socket.parent == Path("/run") / one(s, "RuntimeDirectory")
    # Workloads of every user must reach the socket.
    assert one(s, "RuntimeDirectoryMode") == "0755"
    # The join token comes from the environment file, never from the command line.
    assert one(s, "EnvironmentFile").lstrip("-") == "/etc/tally/agent.env"
    assert "--join-token" not in one(s, "ExecStart")
    assert one(s, "AmbientCapabilities") == one(s, "CapabilityBoundingSet") == "CAP_SYS_PTRACE"
    # Each of these would hide callers from the agent or remap their uids.
    keys = {k for k, _ in s}
    assert not keys & {"ProtectProc", "PrivateUsers", "PrivatePIDs", "ProcSubset"}


def proxy_instances():
    """(instance, mode) for every proxy sample; client mode is set by the drop-in it quotes."""
    out = []
    for path in sorted(CONFIG.glob("proxy-*.toml")):
        instance = path.stem.removeprefix("proxy-")
        out.append((instance, "client" if CLIENT_DROP_IN in path.read_text() else None))
    return out


@pytest.mark.parametrize(("instance", "mode"), proxy_instances())
def test_proxy_unit_runs_every_sample(instance, mode):
    s = unit("tally-proxy@.service")["Service"]
    schema, cfg = unit_config(s, instance, mode)
    assert schema is SAMPLES[f"proxy-{instance}.toml"]
    assert one(s, "User").replace("%i", instance) == f"tally-proxy-{instance}"
    assert one(s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # systemd must not kill the proxy while it is still draining.
    assert timespan(one(s, "TimeoutStopSec")) > cfg.drain_timeout


def test_proxy_unit_defaults_to_server_mode():
    s = unit("tally-proxy@.service")["Service"]
    assert exec_start(s, "web")[1:3] == ["proxy", "server"]
    assert exec_start(s, "web", "client")[1:3] == ["proxy", "client"]


def test_sysusers_declares_the_unit_users():
    declared = set()
    for line in (SYSTEMD / "tally.sysusers.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            kind, name, *_ = shlex.split(line)
            assert kind == "u"
            declared.add(name)
    users = {one(unit(n)["Service"], "User") for n in UNITS if "@" not in n}
    assert declared == users


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_accepts_the_units(tmp_path):
    # verify insists that ExecStart exists; any executable will do.
    names = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(BINARY, sys.executable)
        target = name.replace("@.", "@web.")
        (tmp_path / name).write_text(text)
        (tmp_path / target).write_text(text)
        names.append(target)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys and bad values are only warnings: any output fails.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    version = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    if int(version.split()[1]) < 250:  # no offline security review before systemd 250
        return
    for name in names:
        review = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--no-pager", name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", review.stdout)
        assert m, review.stdout + review.stderr
        assert float(m[1]) <= 2.5, f"{name}: exposure {m[1]}"


# -- container image --------------------------------------------------------------------


def dockerfile_stages():
    """Instructions of each build stage as (INSTRUCTION, arguments)."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        logical += raw.strip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.partition(" ")
        logical = ""
        if word.upper() == "FROM":
            stages.append([])
        assert stages, "an instruction before FROM"
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def image_entrypoint():
    (entry,) = [json.loads(a) for i, a in dockerfile_stages()[-1] if i == "ENTRYPOINT"]
    return entry


def test_image_runs_tally_as_a_non_root_user():
    stages = dockerfile_stages()
    for stage in stages:
        assert stage[0] == ("FROM", stage[0][1])
        assert stage[0][1].split()[0] == "python:3.11-slim"
    final = stages[-1]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1] == "10001:10001"  # the uid the CA pod's volume is given to (fsGroup)
    assert image_entrypoint() == ["tally"]
    assert "tally" in PYPROJECT["project"]["scripts"]


def test_image_copies_every_package_and_nothing_else():
    copied: set[str] = set()
    for instruction, args in dockerfile_stages()[0]:
        if instruction == "COPY":
            *sources, dest = args.split()
            # Into the same place under WORKDIR, where setuptools looks for them.
            assert dest == (sources[0] if sources[0].endswith("/") else "./"), args
            copied.update(s.rstrip("/") for s in sources)
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert copied == packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {r[1:].rstrip("/") for r in rules if r.startswith("!")} == copied


# -- a strict reader for the block-YAML subset of the manifests -------------------------


class YamlSubsetError(ValueError):
    """Text outside the block-YAML subset the manifests are written in."""


_KEY = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_./-]*):(?: +(.*))?")
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
# Plain scalars that YAML 1.1 (kubectl's sigs.k8s.io/yaml) or 1.2 read as numbers,
# booleans, nulls or timestamps, and the two versions do not agree on: quote them.
_AMBIGUOUS = re.compile(
    r"[-+]?[0-9][0-9_]*"
    r"|[-+]?0[xob][0-9a-fA-F_]+"
    r"|[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}.*"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
    r"|y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF"
    r"|True|TRUE|False|FALSE|Null|NULL|~"
)
_INDICATORS = "&*!|>'\"%@`[]{}#,?:-"
_MAX_DEPTH = 64


def parse_yaml(text):
    """The documents of a multi-document YAML text, in the subset described above."""
    if "\r" in text:
        raise YamlSubsetError("carriage return: use Unix line ends")
    docs, start, lines = [], 0, text.split("\n")
    for i, line in enumerate([*lines, "---"]):
        if line.rstrip(" ") == "---":
            if any(_content(x) for x in lines[start:i]):
                docs.append(_Reader(lines[start:i], start).document())
            start = i + 1
        elif line.startswith(("---", "...", "%")):
            raise YamlSubsetError(f"line {i + 1}: directives and markers are not supported")
    return docs


def _content(line):
    stripped = line.strip(" ")
    return bool(stripped) and not stripped.startswith("#")


def _seq_item(content):
    return content == "-" or content.startswith("- ")


class _Reader:
    def __init__(self, lines, offset):
        self.lines = list(lines)
        self.offset = offset
        self.pos = 0
        self.depth = 0

    def fail(self, message: str) -> NoReturn:
        raise YamlSubsetError(f"line {self.pos + self.offset + 1}: {message}")

    def peek(self):
        """(indent, content) of the next line that is not blank or a comment."""
        while self.pos < len(self.lines) and not _content(self.lines[self.pos]):
            self.pos += 1
        if self.pos == len(self.lines):
            return None
        line = self.lines[self.pos]
        if "\t" in line:
            self.fail("tab outside a block scalar")
        content = line.lstrip(" ")
        return len(line) - len(content), content

    def document(self):
        first = self.peek()
        if first is None or first[0] != 0:
            self.fail("a document starts at column 0")
        root = self.node(0)
        if self.peek() is not None:
            self.fail("unexpected content after the document")
        return root

    def node(self, indent):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            self.fail("nested too deeply")
        try:
            _, content = self.peek()
            return self.sequence(indent) if _seq_item(content) else self.mapping(indent)
        finally:
            self.depth -= 1

    def mapping(self, indent):
        out = {}
        while (nxt := self.peek()) is not None and nxt[0] >= indent:
            if nxt[0] > indent:
                self.fail("unexpected indentation")
            m = _KEY.fullmatch(nxt[1])
            if not m:
                self.fail(f"expected KEY: VALUE, got {nxt[1][:40]!r}")
            if m[1] in out:
                self.fail(f"duplicate key {m[1]!r}")
            self.pos += 1
            out[m[1]] = self.value(m[2] or "", indent, indentless_ok=True)
        return out

    def sequence(self, indent):
        out = []
        while (nxt := self.peek()) is not None and nxt[0] >= indent:
            if nxt[0] > indent:
                self.fail("unexpected indentation")
            if not _seq_item(nxt[1]):
                break  # a key after an indentless sequence; the mapping goes on
            after = nxt[1][1:]
            rest = after.lstrip(" ")
            inner = indent + 1 + len(after) - len(rest)
            if (
                rest
                and not rest.startswith(("#", "|"))
                and (_seq_item(rest) or _KEY.fullmatch(rest))
            ):
                # "- key: v" or "- - v": a node that starts on this line, at column `inner`.
                self.lines[self.pos] = " " * inner + rest
                out.append(self.node(inner))
            else:
                self.pos += 1
                out.append(self.value(rest, indent, indentless_ok=False))
        return out

    def value(self, rest, indent, *, indentless_ok):
        """What follows "KEY:" or "-" on a line at `indent`."""
        rest = rest.strip(" ")
        if rest.startswith("|"):
            return self.block_scalar(rest, indent)
        if rest and not rest.startswith("#"):
            return self.scalar(rest)
        nxt = self.peek()
        if nxt is not None and nxt[0] > indent:
            return self.node(nxt[0])
        if indentless_ok and nxt is not None and nxt[0] == indent and _seq_item(nxt[1]):
            return self.sequence(indent)
        self.fail("missing value (write null, {} or [] if that is meant)")

    def block_scalar(self, header, indent):
        m = re.fullmatch(r"\|(-?)(?: +#.*)?", header)
        if not m:
            self.fail(f"block scalar header {header!r}: only | and |- are supported")
        lines, block = [], None
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.strip(" "):
                spaces = len(line) - len(line.lstrip(" "))
                if block is None and spaces > indent:
                    block = spaces
                if block is None or spaces < block:
                    break
            lines.append(line)
            self.pos += 1
        if block is None:
            self.fail("empty block scalar")
        while lines and not lines[-1].strip(" "):
            lines.pop()
        text = "\n".join(line[block:] for line in lines)
        return text if m[1] == "-" else text + "\n"

    def scalar(self, text):
        if text[0] in "\"'":
            value, rest = self.quoted(text)
            if rest.strip(" ") and not re.match(r" +#", rest):
                self.fail(f"text after a quoted scalar: {rest[:40]!r}")
            return value
        plain = re.split(r" #", text, maxsplit=1)[0].rstrip(" ")
        if plain == "{}":
            return {}
        if plain == "[]":
            return []
        if plain[0] in _INDICATORS and not re.match(r"-[^ ]", plain):
            self.fail(f"plain scalar {plain[:40]!r} starts with an indicator")
        if ": " in plain or plain.endswith(":"):
            self.fail(f"plain scalar {plain[:40]!r} holds ': '; quote it")
        if plain in ("true", "false"):
            return plain == "true"
        if plain == "null":
            return None
        if _INT.fullmatch(plain):
            return int(plain)
        if _AMBIGUOUS.fullmatch(plain):
            self.fail(f"ambiguous plain scalar {plain!r}; quote it")
        return plain

    def quoted(self, text):
        if text[0] == "'":
            m = re.match(r"'((?:[^']|'')*)'", text)
            if not m:
                self.fail("unterminated single-quoted scalar")
            return m[1].replace("''", "'"), text[m.end() :]
        m = re.match(r'"(?:[^"\\]|\\.)*"', text)
        if not m:
            self.fail("unterminated double-quoted scalar")
        try:
            return json.loads(m[0]), text[m.end() :]  # JSON's escapes are a subset of YAML's
        except ValueError:
            self.fail(f"double-quoted scalar {m[0][:40]} outside the JSON escape subset")


# An emitter for the round-trip property: block style, every string double-quoted
# (JSON) unless it can be written as a | or |- block scalar.

_KEYS = st.from_regex(r"[a-z0-9_][a-z0-9_./-]{0,8}", fullmatch=True)
_LINE = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12)
_BLOCK_TEXT = st.builds(
    lambda first, middle, last, newline: "\n".join([first, *middle, last]) + newline,
    _LINE.filter(lambda s: s[:1] not in ("", " ")),
    st.lists(_LINE, max_size=3),
    _LINE.filter(lambda s: s.strip(" ") != ""),
    st.sampled_from(["", "\n"]),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.text(max_size=12),
    _BLOCK_TEXT,
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=20,
)


def _block_safe(value):
    if "\n" not in value or value.startswith((" ", "\n")) or value.endswith("\n\n"):
        return False
    lines = value.removesuffix("\n").split("\n")
    return lines[-1].strip(" ") != "" and all(
        c >= " " and c not in "\x7f\ufeff" for c in value.replace("\n", "")
    )


def _scalar_text(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict | list):
        assert not value
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value)


def _block_lines(value, indent):
    header = "|" if value.endswith("\n") else "|-"
    body = [(" " * indent + line) if line else "" for line in value.removesuffix("\n").split("\n")]
    return header, body


def emit(value, indent=0, indentless=False):
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and _block_safe(item):
                header, body = _block_lines(item, indent + 2)
                lines += [f"{pad}{key}: {header}", *body]
            elif isinstance(item, dict | list) and item:
                nested = indent if indentless and isinstance(item, list) else indent + 2
                lines += [f"{pad}{key}:", *emit(item, nested, indentless)]
            else:
                lines.append(f"{pad}{key}: {_scalar_text(item)}")
        return lines
    for item in value:
        if isinstance(item, str) and _block_safe(item):
            header, body = _block_lines(item, indent + 2)
            lines += [f"{pad}- {header}", *body]
        elif isinstance(item, dict | list) and item:
            nested = emit(item, indent + 2, indentless)
            lines += [f"{pad}- {nested[0].lstrip(' ')}", *nested[1:]]
        else:
            lines.append(f"{pad}- {_scalar_text(item)}")
    return lines


_DOCS = st.one_of(
    st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=4),
    st.lists(_VALUES, min_size=1, max_size=4),
)


@given(st.lists(_DOCS, min_size=1, max_size=3), st.booleans())
def test_yaml_round_trip(docs, indentless):
    text = "\n---\n".join("\n".join(emit(doc, 0, indentless)) for doc in docs)
    assert parse_yaml(text) == docs


@given(st.text(st.sampled_from("ab:-#|'\" \n\t{}[]&*!0.1yes"), max_size=80))
def test_yaml_garbage_raises_only_our_error(text):
    try:
        docs = parse_yaml(text)
    except YamlSubsetError:
        return
    json.dumps(docs)  # accepted text yields plain JSON data


@given(st.from_regex(r"[A-Za-z0-9/._~+-][A-Za-z0-9/._:~+ -]{0,12}", fullmatch=True))
def test_yaml_plain_scalars_are_read_as_written_or_refused(text):
    """A plain scalar is never silently turned into something else (trailing spaces
    are not part of a plain scalar in YAML: ``0 `` is the number 0)."""
    try:
        (doc,) = parse_yaml(f"a: {text}")
    except YamlSubsetError:
        return
    value = doc["a"]
    written = text.rstrip(" ")
    if isinstance(value, str):
        assert value == written
    elif isinstance(value, bool) or value is None:
        assert written == json.dumps(value)
    else:
        assert written == str(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a: 1\nb: -2\nc: true\nd: null\ne: {}\nf: []",
            {"a": 1, "b": -2, "c": True, "d": None, "e": {}, "f": []},
        ),
        ("a: x # note\nb: 'it''s'\nc: \"q\\n\"", {"a": "x", "b": "it's", "c": "q\n"}),
        ("a:\n- 1\n- b: 2\n  c: 3\nd: 4", {"a": [1, {"b": 2, "c": 3}], "d": 4}),
        (
            "a: |\n  x\n\n  # not a comment\n    y\n\nb: |-\n  z",
            {"a": "x\n\n# not a comment\n  y\n", "b": "z"},
        ),
        ("- - a\n  - b\n- c", [["a", "b"], "c"]),
        (
            "a: tally:0.1.0\nb: 1Gi\nc: -c\nd: /etc/x",
            {"a": "tally:0.1.0", "b": "1Gi", "c": "-c", "d": "/etc/x"},
        ),
    ],
)
def test_yaml_reads_the_subset(text, expected):
    assert parse_yaml(text) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "a: 0400",
        "a: yes",
        "a: 1.0",
        "a: 1:30",
        "a: 2026-11-29",
        "a: &x 1",
        "a: *x",
        "a: !!str 1",
        "a: [1, 2]",
        "a: {b: 1}",
        "a: >\n  folded",
        "a: 1\na: 2",
        "a:\n",
        "a: 1\n  b: 2",
        "a:\n\tb: 1",
        "a: x: y",
        "a: 'open",
        'a: "\\x41"',
        " a: 1",
        "a: 1\n...",
        "%YAML 1.2\n---\na: 1",
        "? a\n: 1",
    ],
)
def test_yaml_refuses_what_it_does_not_read_like_kubectl(text):
    with pytest.raises(YamlSubsetError):
        parse_yaml(text)


# -- Kubernetes manifests ---------------------------------------------------------------

MANIFEST_FILES = ["namespaces.yaml", "ca.yaml", "agent.yaml", "web.yaml"]


def objects():
    out = []
    for name in MANIFEST_FILES:
        for doc in parse_yaml((KUBE / name).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
            out.append(doc)
    return out


def find(kind, name):
    (doc,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return doc


def test_every_manifest_is_covered_and_kustomized():
    (kustomization,) = parse_yaml((KUBE / "kustomization.yaml").read_text())
    assert kustomization["resources"] == MANIFEST_FILES
    assert sorted(p.name for p in KUBE.glob("*.yaml")) == sorted(
        [*MANIFEST_FILES, "kustomization.yaml"]
    )


def test_manifest_inventory():
    kinds = sorted(
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects()
    )
    assert kinds == [
        ("ConfigMap", "tally", "tally-agent"),
        ("ConfigMap", "tally", "tally-ca"),
        ("ConfigMap", "web", "web-proxy"),
        ("DaemonSet", "tally", "tally-agent"),
        ("Deployment", "web", "web"),
        ("Namespace", "", "tally"),
        ("Namespace", "", "web"),
        ("Service", "tally", "tally-ca"),
        ("Service", "web", "web"),
        ("StatefulSet", "tally", "tally-ca"),
    ]


def test_selectors_match_pod_labels_and_services_reach_named_ports():
    workloads = [o for o in objects() if o["kind"] in ("StatefulSet", "DaemonSet", "Deployment")]
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (o for o in objects() if o["kind"] == "Service"):
        (w,) = [
            w
            for w in workloads
            if w["metadata"]["namespace"] == svc["metadata"]["namespace"]
            and svc["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        names = {
            p["name"]
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names


def tally_argv(container):
    """The `tally` arguments a container runs, or None if it runs something else."""
    command, args = container.get("command"), container.get("args", [])
    if command == ["/bin/sh", "-c"]:
        (script,) = args
        execs = [line.strip() for line in script.splitlines() if line.strip().startswith("exec ")]
        (line,) = execs
        argv = shlex.split(line)[1:]
    else:
        argv = (command or image_entrypoint()) + args
    return argv[1:] if argv[0] == "tally" else None


class Pod:
    """One tally container in its workload, with the settings it loads."""

    def __init__(self, workload, container, tmp_path):
        self.workload = workload
        self.spec = workload["spec"]["template"]["spec"]
        self.container = container
        self.namespace = workload["metadata"]["namespace"]
        self.args, self.schema = command_schema(tally_argv(container))
        config = PurePosixPath(self.args.config)
        volume = self.volume(self.mount(config, exact_dir=True)["name"])
        configmap = find("ConfigMap", volume["configMap"]["name"])
        assert configmap["metadata"]["namespace"] == self.namespace
        self.config_file = tmp_path / f"{workload['metadata']['name']}-{config.name}"
        self.config_file.write_text(configmap["data"][config.name])
        self.cfg = load_file(self.schema, self.config_file, args=self.args)

    def mount(self, path, *, exact_dir=False):
        """The volume mount that holds ``path`` (the innermost one)."""
        path = PurePosixPath(path)
        mounts = [
            m for m in self.container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])
        ]
        assert mounts, f"{self.container['name']}: nothing mounted over {path}"
        best = max(mounts, key=lambda m: len(m["mountPath"]))
        if exact_dir:
            assert PurePosixPath(best["mountPath"]) == path.parent
        return best

    def writable(self, path):
        m = self.mount(path)
        assert not m.get("readOnly", False), f"{path} is on a read-only mount"
        return m

    def volume(self, name):
        (v,) = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        return v

    def port(self, name):
        (p,) = [p for p in self.container["ports"] if p["name"] == name]
        return p["containerPort"]


@pytest.fixture
def pods(tmp_path):
    out = {}
    for w in objects():
        if w["kind"] not in ("StatefulSet", "DaemonSet", "Deployment"):
            continue
        for c in w["spec"]["template"]["spec"]["containers"]:
            if tally_argv(c) is not None:
                out[w["kind"]] = Pod(w, c, tmp_path)
    return out


def test_each_role_runs_with_its_settings(pods):
    assert {k: p.schema for k, p in pods.items()} == {
        "StatefulSet": CASettings,
        "DaemonSet": AgentSettings,
        "Deployment": ServerSettings,
    }
    version = PYPROJECT["project"]["version"]
    for p in pods.values():
        assert p.container["image"] == f"tally:{version}"


def test_probes_use_the_metrics_port(pods):
    for p in pods.values():
        c = p.container
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            assert p.port(c[probe]["httpGet"]["port"]) == p.cfg.metrics.port
        assert p.cfg.metrics.host == "0.0.0.0"  # the kubelet probes the pod's IP


def test_containers_are_locked_down():
    for w in objects():
        if w["kind"] not in ("StatefulSet", "DaemonSet", "Deployment"):
            continue
        spec = w["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            merged = {**spec["securityContext"], **sc}
            if w["kind"] == "DaemonSet":
                assert sc["capabilities"]["add"] == ["SYS_PTRACE"]
            else:
                assert "add" not in sc["capabilities"]
                assert merged["runAsNonRoot"] is True
                assert merged.get("runAsUser", 10001) != 0


def test_ca_statefulset_keeps_its_data_on_a_claim(pods):
    p = pods["StatefulSet"]
    sts = p.workload
    assert sts["spec"]["replicas"] == 1  # one SQLite writer
    assert sts["spec"]["serviceName"] == find("Service", "tally-ca")["metadata"]["name"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    data = p.writable(p.cfg.data_dir)
    assert data["name"] == claim["metadata"]["name"]
    assert not any(v["name"] == data["name"] for v in p.spec["volumes"])
    # The kubelet must not re-chmod the keys on every mount.
    assert p.spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    run = p.writable(p.cfg.admin_socket)
    assert "emptyDir" in p.volume(run["name"])
    env = {e["name"]: e.get("value") for e in p.container["env"]}
    assert env["TALLY_CA_ADMIN_SOCKET"] == str(p.cfg.admin_socket)
    assert find("Service", "tally-ca")["spec"]["ports"][0]["port"] == p.cfg.listen.port
    assert p.port("agent-api") == p.cfg.listen.port
    assert p.spec["terminationGracePeriodSeconds"] > ca.server.DRAIN_SECONDS


def test_agent_daemonset_shares_its_socket_with_the_host(pods):
    p = pods["DaemonSet"]
    assert p.spec["hostPID"] is True
    text = (KUBE / "agent.yaml").read_text()
    before = text[: text.index("hostPID: true")].splitlines()[-5:]
    assert any("/proc" in line for line in before if line.strip().startswith("#"))
    socket = p.writable(p.cfg.socket)
    assert p.volume(socket["name"])["hostPath"]["path"] == socket["mountPath"]
    data = p.writable(p.cfg.data_dir)
    assert p.volume(data["name"])["hostPath"]["path"] == str(p.cfg.data_dir)
    bundle = p.volume(p.mount(p.cfg.trust_bundle, exact_dir=True)["name"])
    assert bundle["configMap"]["name"] == "tally-bundle"
    assert p.cfg.trust_bundle.name == "bundle.pem"
    assert p.cfg.server == ["tally-ca.tally.svc.cluster.local:8443"]


def test_agent_reads_its_node_join_token_into_the_environment(pods):
    p = pods["DaemonSet"]
    (script,) = p.container["args"]
    join = next(m for m in p.container["volumeMounts"] if m["name"] == "join")
    secret = p.volume("join")["secret"]
    assert secret["optional"] is True
    assert join["readOnly"] is True
    assert f'token_file="{join["mountPath"]}/$NODE_NAME"' in script
    assert "export TALLY_JOIN_TOKEN" in script
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in p.container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName"}
    # The variable the script sets is the one the loader reads for join_token.
    loaded = load_file(p.schema, p.config_file, args=p.args, env={"TALLY_JOIN_TOKEN": "t0k3n"})
    assert loaded.join_token == "t0k3n"


def test_sidecar_reaches_the_agent_socket(pods):
    agent, web = pods["DaemonSet"], pods["Deployment"]
    agent_mount = agent.mount(agent.cfg.socket)
    host_dir = PurePosixPath(agent.volume(agent_mount["name"])["hostPath"]["path"])
    on_host = host_dir / PurePosixPath(agent.cfg.socket).relative_to(agent_mount["mountPath"])

    socket = PurePosixPath(web.cfg.workload_socket.removeprefix("unix://"))
    mount = web.mount(socket)
    assert mount["readOnly"] is True
    volume = web.volume(mount["name"])
    assert volume["hostPath"]["type"] == "Directory"  # the agent creates it
    assert (
        PurePosixPath(volume["hostPath"]["path"]) / socket.relative_to(mount["mountPath"])
        == on_host
    )
    # Only the proxy gets the socket; the application does not.
    for c in web.spec["containers"]:
        if c is not web.container:
            assert not any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))


def test_sidecar_drains_before_the_pod_is_killed(pods):
    web = pods["Deployment"]
    assert web.spec["terminationGracePeriodSeconds"] > web.cfg.drain_timeout
    assert web.port("https") == web.cfg.listen.port
    uid = web.container["securityContext"]["runAsUser"]
    assert f"unix:uid:{uid}" in (KUBE / "web.yaml").read_text()  # the entry to register


def test_namespaces_are_declared():
    declared = {o["metadata"]["name"] for o in objects() if o["kind"] == "Namespace"}
    used = {o["metadata"]["namespace"] for o in objects() if o["kind"] != "Namespace"}
    assert used == declared
