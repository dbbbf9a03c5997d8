"""A Python interpreter that a child can still use after dropping to another uid.

Tests that attest a second user (uid 65534) start a child as root, which drops
its uid and then goes on importing: grpc, protobuf and parts of the standard
library import submodules lazily, at the first call.  The clone's ``.venv``,
and with pyenv the interpreter's own standard library, may sit under a 0700
home directory, where the dropped child can read nothing: it then fails with
``cannot import name '_channel' from 'grpc'`` instead of reaching the agent.

So the suite builds, once per session, a small self-contained interpreter in a
0755 temporary directory: the base interpreter's binary and standard library
plus the distributions the children need, hard-linked where the filesystem
allows (tens of milliseconds) and copied where it does not.  It is built the
same way wherever the clone lives, so a clone in /work runs the same path as a
clone in /root.  Why not the alternatives: importing every submodule before the
drop misses the next lazy import; a fresh venv at /tmp still points at the
unreadable standard library and needs an index to install into.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# Parts of the standard library no child of ours imports; leaving them out
# halves what is linked or copied.
SKIP_STDLIB = {
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
}


def _readable_by_others(path: Path) -> bool:
    mode = path.stat().st_mode
    return bool(mode & stat.S_IROTH) and (not mode & stat.S_IXUSR or bool(mode & stat.S_IXOTH))


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst``, or copy it where a link would not do.

    A link shares the source's inode and so its mode: a file the other user may
    not read is copied and opened up instead (a chmod on a link would change the
    original too).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _readable_by_others(src):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links refused: copy
    shutil.copy2(src, dst)
    dst.chmod(dst.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if os.access(src, os.X_OK) else 0))


def _tree(src: Path, dst: Path, skip: set[str]) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not (Path(root) == src and d in skip)]
        for name in files:
            here = Path(root) / name
            if not here.is_symlink() or here.exists():
                _place(here, dst / here.relative_to(src))


def distributions(*names: str) -> list[metadata.Distribution]:
    """``names`` and everything they require (extras included when asked for)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[key] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            wanted = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in wanted):
                todo.append(dep)
    return list(seen.values())


def build(dest: Path, *names: str) -> Path:
    """Lay out an interpreter at ``dest`` with ``names`` installed; return its binary.

    The layout is the one the interpreter finds its prefix from
    (``bin/pythonX.Y`` beside ``lib/pythonX.Y/os.py``); the binary itself is
    exec'd by root, so its shared library may stay where it is.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_path("stdlib"))
    lib = dest / "lib" / version
    _tree(stdlib, lib, SKIP_STDLIB)
    base = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    python = dest / "bin" / version
    _place(base, python)
    site = lib / "site-packages"
    for dist in distributions(*names):
        for file in dist.files or []:
            if ".." not in file.parts:  # scripts land in bin/, outside site-packages
                src = Path(str(dist.locate_file(file)))
                if src.exists():
                    _place(src, site / file)
    for root, dirs, _ in os.walk(dest):
        for d in dirs:
            (Path(root) / d).chmod(0o755)
    dest.chmod(0o755)
    return python
