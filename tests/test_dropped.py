"""The interpreter for uid-dropping children reads nothing from the clone or its venv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

CHILD = """
import json, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
import grpc._channel, spiffe, google.protobuf.descriptor_pool, cryptography.x509
print(json.dumps({"prefix": sys.prefix, "path": sys.path, "uid": os.getuid()}))
"""


def test_a_child_dropped_to_65534_imports_py_spiffe_from_the_copy_only(
    request: pytest.FixtureRequest,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    python: Path = request.getfixturevalue("dropped_python")
    home = python.parents[1]
    result = subprocess.run(
        [str(python), "-I", "-c", CHILD], capture_output=True, text=True, check=False, cwd=home
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 65534 and seen["prefix"] == str(home)
    assert all(p.startswith(str(home)) for p in seen["path"]), seen["path"]
