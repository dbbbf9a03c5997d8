"""What a newcomer trips on first: `make demo`'s install and `x509 mint --out`."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

from tests.e2e.conftest import CA

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_string_so_setuptools_stays_quiet():
    # A TOML table here makes setuptools >= 77 print a screen of deprecation warnings
    # on every `pip install`, which is the first thing `make demo` shows.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires), requires


def test_mint_creates_a_missing_out_dir_with_mode_0700(ca: CA, tmp_path: Path):
    out = tmp_path / "new" / "creds"
    ca.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/tool", "--out", str(out))
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    assert {p.name for p in out.iterdir()} == {"svid.pem", "key.pem", "bundle.pem"}


def test_mint_refuses_an_out_path_that_is_a_file(ca: CA, tmp_path: Path):
    out = tmp_path / "file"
    out.write_text("")
    result = ca.cli(
        "x509", "mint", "--spiffe-id", "spiffe://example.org/tool", "--out", str(out), check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"tally: error: --out {out}: not a directory"
