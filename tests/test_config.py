import argparse
import ipaddress
import math
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.ops.config import (
    REQUIRED,
    Address,
    AddressError,
    ConfigError,
    Duration,
    add_arguments,
    describe,
    dump_toml,
    load,
    setting,
)
from tally.ops.durations import MAX_SECONDS


@dataclass(frozen=True)
class Sample:
    name: str = setting(help="what to call it")
    count: int = setting(3, help="how many")
    ratio: float = setting(0.5, help="a fraction, 50% by default")
    verbose: bool = setting(False, help="say more")
    data_dir: Path = setting(Path("/var/lib/sample"), help="where data lives")
    ttl: Duration = setting(Duration(3600), help="how long")
    listen: Address = setting(Address.parse("127.0.0.1:8443"), help="where to listen")
    tags: list[str] = setting([], help="labels")
    upstream: Address | None = setting(None, help="optional address")
    cert: Path | None = setting(None, help="optional path")
    timeout: Duration | None = setting(None, help="optional duration")
    label: str | None = setting(None, help="optional string")
    limit: int | None = setting(None, help="optional integer")
    weight: float | None = setting(None, help="optional number")
    fast: bool | None = setting(None, help="optional switch")
    extra: list[str] | None = setting(None, help="optional list")
    join_token: str | None = setting(None, help="one-time token", secret=True)
    renamed: str = setting("x", help="has its own flag", flag="--other-name", metavar="THING")


def parser_for(schema=Sample):
    parser = argparse.ArgumentParser(prog="test")
    add_arguments(parser, schema)
    return parser


def load_argv(argv, schema=Sample, env=None):
    return load(schema, parser_for(schema).parse_args(argv), env=env or {})


def write(tmp_path, text, name="sample.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(argv, schema=Sample, env=None):
    with pytest.raises(ConfigError) as info:
        load_argv(argv, schema, env)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- Address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "path", "shown"),
    [
        ("127.0.0.1:8443", "127.0.0.1", 8443, None, "127.0.0.1:8443"),
        ("[::1]:0", "::1", 0, None, "[::1]:0"),
        ("[0:0::1]:80", "::1", 80, None, "[::1]:80"),
        ("ca.example.org:443", "ca.example.org", 443, None, "ca.example.org:443"),
        ("localhost:65535", "localhost", 65535, None, "localhost:65535"),
        ("unix:/run/tally/agent.sock", None, None, "/run/tally/agent.sock", None),
        ("/run/tally/agent.sock", None, None, "/run/tally/agent.sock", None),
    ],
)
def test_address_parses(text, host, port, path, shown):
    addr = Address.parse(text)
    assert (addr.host, addr.port, addr.path) == (host, port, path)
    assert addr.is_unix == (path is not None)
    assert str(addr) == (shown or f"unix:{path}")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected HOST:PORT"),
        ("8443", "expected HOST:PORT"),
        (":8443", "expected HOST:PORT"),
        ("host:", "port must be"),
        ("host:65536", "port must be"),
        ("host:-1", "port must be"),
        ("host: 80", "port must be"),
        ("::1:80", "brackets"),
        ("[zz::1]:80", "bad IPv6"),
        ("999.1.1.1:80", "bad IPv4"),
        ("01.2.3.4:80", "bad IPv4"),
        ("ho st:80", "bad host name"),
        ("-bad.example:80", "bad host name"),
        ("a..b:80", "bad host name"),
        ("unix:run/x.sock", "must be absolute"),
        ("unix:", "must be absolute"),
        ("/", "must be absolute"),
        ("/tmp/a\0b", "NUL"),
        ("/" + "a" * 107, "longer than 107 bytes"),
    ],
)
def test_address_rejects(text, why):
    with pytest.raises(AddressError, match=why) as info:
        Address.parse(text)
    assert repr(text)[:20] in str(info.value)


def test_address_needs_one_kind():
    with pytest.raises(AddressError):
        Address(host="a", port=1, path="/x")
    with pytest.raises(AddressError):
        Address(host="a")
    with pytest.raises(AddressError):
        Address()


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
tcp_addresses = st.builds(
    lambda host, port: Address(host=host, port=port),
    st.one_of(
        st.ip_addresses().map(str),
        st.lists(_label, min_size=1, max_size=4)
        .map(".".join)
        .filter(lambda h: not all(c in "0123456789." for c in h)),
    ),
    st.integers(0, 65535),
)
unix_addresses = st.text(  # at most 4 bytes a character: within the 107-byte limit
    st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=26
).map(lambda rest: Address(path="/" + rest))
addresses = st.one_of(tcp_addresses, unix_addresses)


@given(addresses)
def test_address_round_trips(addr):
    assert Address.parse(str(addr)) == addr


@given(st.one_of(st.text(), st.builds(lambda a, t: str(a) + t, addresses, st.text(max_size=3))))
def test_address_garbage_raises_only_address_error(text):
    try:
        addr = Address.parse(text)
    except AddressError:
        return
    # Accepted implies valid, and what was accepted prints back to itself.
    if addr.is_unix:
        assert addr.path is not None and addr.path.startswith("/") and "\0" not in addr.path
        assert len(addr.path.encode()) <= 107
    else:
        assert addr.host and addr.port is not None and 0 <= addr.port <= 65535
        if ":" in addr.host:
            ipaddress.IPv6Address(addr.host)
    assert Address.parse(str(addr)) == addr


# -- merging and errors -----------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given():
    cfg = load_argv(["--name", "n"])
    assert cfg == Sample(name="n")
    assert cfg.ttl == 3600 and isinstance(cfg.ttl, Duration)
    assert cfg.upstream is None


def test_file_overrides_default_and_flag_overrides_file(tmp_path):
    path = write(tmp_path, 'name = "from-file"\ncount = 7\nratio = 2\n')
    cfg = load_argv(["--config", str(path)])
    assert (cfg.name, cfg.count, cfg.ratio, cfg.verbose) == ("from-file", 7, 2.0, False)
    cfg = load_argv(["--config", str(path), "--count", "9", "--name", "flag"])
    assert (cfg.name, cfg.count, cfg.ratio) == ("flag", 9, 2.0)


def test_flags_not_given_leave_no_trace():
    args = parser_for().parse_args(["--count", "1"])
    assert vars(args) == {"config": None, "count": "1"}


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, 'name = "n"\nverbos = true\n')
    assert error_of(["--config", str(path)]) == (
        f"config {path}: unknown key 'verbos' (did you mean 'verbose'?)"
    )
    path = write(tmp_path, 'name = "n"\ndata-dir = "/x"\n')
    assert error_of(["--config", str(path)]).endswith("(did you mean 'data_dir'?)")
    path = write(tmp_path, 'name = "n"\nzzzzzz = 1\n')
    assert error_of(["--config", str(path)]) == f"config {path}: unknown key 'zzzzzz'"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('count = "ten"', "key 'count': expected an integer, got string 'ten'"),
        ("count = true", "key 'count': expected an integer, got boolean true"),
        ("count = 1.5", "key 'count': expected an integer, got float 1.5"),
        ("verbose = 1", "key 'verbose': expected true or false, got integer 1"),
        ("ratio = nan", "key 'ratio': expected a finite number, got nan"),
        ("ratio = inf", "key 'ratio': expected a finite number, got inf"),
        ("data_dir = 5", "key 'data_dir': expected a path, got integer 5"),
        ('data_dir = ""', "key 'data_dir': expected a path, got an empty string"),
        ("tags = [1]", "key 'tags': expected a string or an array of strings, item 0 is integer 1"),
        ("tags = 1", "key 'tags': expected a string or an array of strings, got integer 1"),
        ("listen = 8443", "key 'listen': expected an address"),
        ('listen = "nowhere"', "key 'listen': invalid address 'nowhere'"),
        ('ttl = "abc"', "key 'ttl': invalid duration 'abc'"),
        ("ttl = -1", "key 'ttl': invalid duration -1"),
        (
            "ttl = 1979-05-27",
            "key 'ttl': expected a duration like '10m' or a number of seconds, got date 1979-05-27",
        ),
        ("upstream = {host = 'x'}", "key 'upstream': expected an address"),
    ],
)
def test_wrong_value_names_key_and_expected_type(tmp_path, line, expected):
    path = write(tmp_path, f'name = "n"\n{line}\n')
    message = error_of(["--config", str(path)])
    assert message.startswith(f"config {path}: {expected}")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--count", "ten"], "flag --count: invalid integer 'ten'"),
        (["--count", "1.0"], "flag --count: invalid integer '1.0'"),
        (["--ratio", "nan"], "flag --ratio: invalid number 'nan'"),
        (["--ttl", "abc"], "flag --ttl: invalid duration 'abc': expected whole seconds"),
        (["--listen", "[::1]"], "flag --listen: invalid address '[::1]'"),
        (["--data-dir="], "flag --data-dir: expected a path, got an empty string"),
    ],
)
def test_bad_flag_names_the_flag(argv, expected):
    assert error_of(["--name", "n", *argv]).startswith(expected)


def test_missing_required_setting():
    assert error_of([]) == (
        "missing required setting 'name' (flag --name or key name in the config file)"
    )


def test_bool_flags_both_ways(tmp_path):
    assert load_argv(["--name", "n", "--verbose"]).verbose is True
    assert load_argv(["--name", "n", "--no-verbose"]).verbose is False
    path = write(tmp_path, 'name = "n"\nverbose = true\nfast = false\n')
    assert load_argv(["--config", str(path)]).verbose is True
    cfg = load_argv(["--config", str(path), "--no-verbose", "--fast"])
    assert (cfg.verbose, cfg.fast) == (False, True)


def test_list_flags_repeat_and_replace_the_file(tmp_path):
    cfg = load_argv(["--name", "n", "--tags", "a", "--tags", "b", "--extra", "c"])
    assert (cfg.tags, cfg.extra) == (["a", "b"], ["c"])
    path = write(tmp_path, 'name = "n"\ntags = ["x", "y"]\n')
    assert load_argv(["--config", str(path)]).tags == ["x", "y"]
    assert load_argv(["--config", str(path), "--tags", "z"]).tags == ["z"]


@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
def test_one_string_in_the_file_is_a_list_of_one(config_file, text):
    loaded = []
    for value in (text, [text]):
        config_file.write_text(f'name = "n"\ntags = {_toml(value)}\n', encoding="utf-8")
        loaded.append(load_argv(["--config", str(config_file)]).tags)
    assert loaded == [[text], [text]]


def test_list_default_is_not_shared():
    a, b = load_argv(["--name", "a"]), load_argv(["--name", "b"])
    a.tags.append("mine")
    assert b.tags == [] and Sample(name="c").tags == []


@pytest.mark.parametrize(("value", "seconds"), [('"90s"', 90), ('"1h"', 3600), ("3600", 3600)])
def test_duration_from_file(tmp_path, value, seconds):
    path = write(tmp_path, f'name = "n"\nttl = {value}\ntimeout = 0.25\n')
    cfg = load_argv(["--config", str(path)])
    assert cfg.ttl == seconds and isinstance(cfg.ttl, Duration)
    assert cfg.timeout == 0.25 and isinstance(cfg.timeout, Duration)


def test_duration_from_flag():
    cfg = load_argv(["--name", "n", "--ttl", "1h30m", "--timeout", "90"])
    assert (cfg.ttl, cfg.timeout) == (5400, 90)


def test_explicit_flag_and_metavar():
    assert load_argv(["--name", "n", "--other-name", "y"]).renamed == "y"
    assert "--other-name THING" in parser_for().format_help()
    assert error_of(["--name", "n", "--limit", "x"]).startswith("flag --limit:")


def test_help_shows_defaults_and_survives_percent():
    text = " ".join(parser_for().format_help().split())
    assert "how long (default: 1h)" in text
    assert "50% by default (default: 0.5)" in text
    assert "what to call it (required)" in text
    assert "labels (default: []; repeatable)" in text


def test_table_in_a_flat_file_is_refused(tmp_path):
    path = write(tmp_path, 'name = "n"\n[sample]\ncount = 1\n')
    assert error_of(["--config", str(path)]) == (
        f"config {path}: unexpected table 'sample': settings are top-level keys, with no [sections]"
    )


def test_file_problems_name_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert error_of(["--config", str(missing)]) == (
        f"config {missing}: cannot read: No such file or directory"
    )
    assert error_of(["--config", str(tmp_path)]).startswith(f"config {tmp_path}: cannot read:")
    bad = write(tmp_path, 'name = "n"\ncount = = 1\n')
    message = error_of(["--config", str(bad)])
    assert message.startswith(f"config {bad}: invalid TOML:") and "line 2" in message
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'name = "\xff"\n')
    assert error_of(["--config", str(binary)]) == f"config {binary}: not UTF-8 text"


def test_secret_values_stay_out_of_messages_and_dumps(tmp_path):
    path = write(tmp_path, 'name = "n"\njoin_token = 12345678\n')
    message = error_of(["--config", str(path)])
    assert message == f"config {path}: key 'join_token': expected a string, got integer"
    cfg = load_argv(["--name", "n", "--join-token", "s3cret-token"])
    assert cfg.join_token == "s3cret-token"
    dumped = dump_toml(cfg)
    assert "s3cret-token" not in dumped and 'join_token = "<redacted>"' in dumped
    assert "s3cret" not in parser_for().format_help()


def test_secret_from_environment_between_file_and_flags(tmp_path):
    env = {"TALLY_JOIN_TOKEN": "from-env", "TALLY_NAME": "ignored"}
    path = write(tmp_path, 'name = "n"\njoin_token = "from-file"\n')
    assert load_argv(["--config", str(path)]).join_token == "from-file"
    assert load_argv(["--config", str(path)], env=env).join_token == "from-env"
    cfg = load_argv(["--config", str(path), "--join-token", "flag"], env=env)
    assert cfg.join_token == "flag"
    # Only secrets come from the environment.
    assert error_of([], env=env).startswith("missing required setting 'name'")
    # An empty variable counts as unset.
    assert load_argv(["--name", "n"], env={"TALLY_JOIN_TOKEN": ""}).join_token is None


@dataclass(frozen=True)
class NeedsToken:
    join_token: str = setting(help="one-time token", secret=True)
    low: int = setting(1, help="lower bound")
    high: int = setting(2, help="upper bound")

    def validate(self):
        if self.low > self.high:
            raise ConfigError("setting 'low' is above 'high'")


def test_required_secret_mentions_the_environment():
    assert error_of([], NeedsToken) == (
        "missing required setting 'join_token' (flag --join-token or key join_token in the "
        "config file, or environment TALLY_JOIN_TOKEN)"
    )
    assert load_argv([], NeedsToken, env={"TALLY_JOIN_TOKEN": "t"}).join_token == "t"


def test_validate_runs_after_merging():
    assert error_of(["--join-token", "t", "--low", "5"], NeedsToken) == (
        "setting 'low' is above 'high'"
    )
    assert load_argv(["--join-token", "t", "--low", "5", "--high", "6"], NeedsToken).low == 5


def test_describe_comes_from_the_schema():
    docs = {d.name: d for d in describe(Sample)}
    assert [d.name for d in describe(Sample)] == [f.name for f in fields(Sample)]
    assert docs["name"].default == "required" and docs["name"].flag == "--name"
    assert (docs["ttl"].type, docs["ttl"].default) == ("duration", "1h")
    assert (docs["listen"].type, docs["listen"].default) == ("address", "127.0.0.1:8443")
    assert (docs["upstream"].default, docs["tags"].default) == ("unset", "[]")
    assert docs["renamed"].flag == "--other-name"
    assert docs["verbose"].default == "false"
    assert docs["count"].help == "how many"


def test_schema_mistakes_are_type_errors():
    @dataclass(frozen=True)
    class BadType:
        x: dict[str, str] = setting(None, help="")

    @dataclass(frozen=True)
    class OptionalWithDefault:
        x: int | None = setting(1, help="")

    @dataclass(frozen=True)
    class WrongDefault:
        x: Duration = setting(3600, help="")

    @dataclass
    class NotFrozen:
        x: int = setting(1, help="")

    @dataclass(frozen=True)
    class Undeclared:
        x: int = 1

    for schema in (BadType, OptionalWithDefault, WrongDefault, NotFrozen, Undeclared):
        with pytest.raises(TypeError):
            describe(schema)
    with pytest.raises(TypeError):
        setting(1, help="", flag="-x")
    assert repr(REQUIRED) == "REQUIRED"


# -- properties -------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=20)
paths = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1).map(Path)
durations = st.one_of(st.integers(0, MAX_SECONDS), st.floats(0, MAX_SECONDS, allow_nan=False)).map(
    Duration
)
finite = st.floats(allow_nan=False, allow_infinity=False)
int64 = st.integers(-(2**63), 2**63 - 1)

samples = st.builds(
    Sample,
    name=texts,
    count=int64,
    ratio=finite,
    verbose=st.booleans(),
    data_dir=paths,
    ttl=durations,
    listen=addresses,
    tags=st.lists(texts, max_size=3),
    upstream=st.none() | addresses,
    cert=st.none() | paths,
    timeout=st.none() | durations,
    label=st.none() | texts,
    limit=st.none() | int64,
    weight=st.none() | finite,
    fast=st.none() | st.booleans(),
    extra=st.none() | st.lists(texts, max_size=3),
    join_token=st.none(),
    renamed=texts,
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("config") / "generated.toml"


@given(samples)
def test_dump_then_load_gives_back_the_config(config_file, cfg):
    config_file.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_argv(["--config", str(config_file)]) == cfg


def _toml_key(key):
    return '"' + "".join(f"\\U{ord(c):08x}" for c in key) + '"'


def _toml(value):
    """A tiny independent TOML writer, so the garbage is valid TOML with wrong types."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_key(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return value.isoformat()


_names = [f.name for f in fields(Sample)]
toml_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(st.characters(codec="utf-8"), max_size=30),
        st.sampled_from(["90s", "1h", "[::1]:80", "/run/x.sock", "unix:/a", "10m", "-1"]),
        st.dates(),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
    max_leaves=6,
)
toml_documents = st.dictionaries(  # mostly real keys, so that some documents load
    st.one_of(st.sampled_from(_names), st.sampled_from(_names), texts), toml_values, max_size=3
).map(lambda d: "".join(f"{_toml_key(k)} = {_toml(v)}\n" for k, v in d.items()))
toml_ish = st.lists(
    st.one_of(
        st.sampled_from(["=", "[", "]", '"', "'", "\n", " ", ",", "{", "}", "#", "."]),
        st.sampled_from(_names),
        texts,
    ),
    max_size=20,
).map("".join)


def _assert_kinds(cfg):
    """Accepted implies valid: every value has its declared type and range."""
    assert isinstance(cfg.count, int) and not isinstance(cfg.count, bool)
    assert isinstance(cfg.ratio, float) and math.isfinite(cfg.ratio)
    assert isinstance(cfg.ttl, Duration) and 0 <= cfg.ttl <= MAX_SECONDS
    assert isinstance(cfg.listen, Address) and isinstance(cfg.data_dir, Path)
    assert all(isinstance(t, str) for t in cfg.tags)
    assert cfg.upstream is None or isinstance(cfg.upstream, Address)
    assert cfg.timeout is None or isinstance(cfg.timeout, Duration)


@given(st.one_of(toml_documents, toml_ish))
def test_garbage_files_raise_only_config_error(config_file, text):
    config_file.write_text(text, encoding="utf-8")
    try:
        cfg = load_argv(["--config", str(config_file), "--name", "n"])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    _assert_kinds(cfg)


@given(st.binary(max_size=60))
def test_garbage_bytes_raise_only_config_error(config_file, data):
    config_file.write_bytes(data)
    try:
        load_argv(["--config", str(config_file), "--name", "n"])
    except ConfigError as exc:
        assert "\n" not in str(exc)


_valued_flags = [d.flag for d in describe(Sample) if d.type != "boolean"]


@given(st.lists(st.tuples(st.sampled_from(_valued_flags), st.text(max_size=30)), max_size=4))
def test_garbage_flags_raise_only_config_error(pairs):
    argv = ["--name=n", *(f"{flag}={value}" for flag, value in pairs)]
    try:
        cfg = load_argv(argv)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    _assert_kinds(cfg)
