"""deploy/compose/ha.yaml: two CA servers on one PostgreSQL, read by the strict YAML reader
of tests/test_deploy.py, each server's command parsed and loaded by the real `tally`."""

from __future__ import annotations

import argparse

from ca.datastore import parse as parse_datastore
from ca.settings import CASettings
from tally.ops.config import load
from tests.test_deploy import DEPLOY, command_schema, parse_yaml

COMPOSE = DEPLOY / "compose" / "ha.yaml"


def compose() -> dict:
    text = COMPOSE.read_text().replace("{}", "null")  # the reader has no flow collections
    (doc,) = parse_yaml(text)
    return doc


def ca_settings(service: dict) -> CASettings:
    args, schema = command_schema(service["command"])
    assert schema is CASettings
    return load(schema, argparse.Namespace(**vars(args)), env={})


def test_two_ca_servers_share_one_database_and_nothing_else():
    services = compose()["services"]
    cas = {name: s for name, s in services.items() if name.startswith("ca-")}
    assert sorted(cas) == ["ca-1", "ca-2"]
    cfgs = {name: ca_settings(s) for name, s in cas.items()}
    urls = {cfg.datastore for cfg in cfgs.values()}
    assert len(urls) == 1
    (url,) = urls
    assert url is not None
    where = parse_datastore(url)
    assert where.engine == "postgresql" and where.shown == url, "no password in the file"
    # Each server its own volume (its server.key), its own published port.
    assert len({s["volumes"][0].split(":")[0] for s in cas.values()}) == 2
    assert len({s["ports"][0].split(":")[0] for s in cas.values()}) == 2
    for s in cas.values():
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert s["environment"]["PGPASSFILE"] == "/run/secrets/pgpass"
        assert s["image"] == "tally:0.1.0"
    assert services["postgres"]["image"].startswith("postgres:15")
