"""The layers of DESIGN.md, enforced: an AST walk over every module of tally/ and the roles.

Rules / theory of operation.  Every ``import``, ``from ... import`` and
``importlib.import_module``/``__import__`` call counts wherever it sits: at the
top, inside a function, or under ``TYPE_CHECKING`` (a type-only import still ties
the layers together for the reader and for mypy).  Each module gets a rank:

    tally.spiffe < tally.tls < tally.wire < tally.ops < roles (ca, agent, proxy) < tally.app

(a) a pure module (PURE below) imports no I/O module (IMPURE_IMPORTS), nothing of a
    higher rank, and no tally module that is not pure itself;
(b) no module imports a module of a higher rank;
(c) a role never imports another role;
(d) nothing outside tally/app imports a role, by ``import`` or by module name:
    a dynamic import whose name is a role module, or that may be one because the
    module spells a role module's dotted name, counts as importing it.

Each rule has a self-test on a synthetic module, so a checker that silently stops
seeing imports fails too.  A known violation is marked xfail(strict=True) in
KNOWN_VIOLATIONS with a reason naming it, never by loosening a rule.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

PURE = [
    "tally/spiffe/",
    "tally/wire/grpc.py",
    "tally/wire/workload_pb.py",
    "tally/ops/durations.py",
    "agent/renewal.py",
    "agent/workload_calls.py",
    "proxy/xfcc.py",
    "ca/console_view.py",
    "ca/console_page.py",
]
"""Modules (or folders of them, ending in "/") that do no I/O; the list may only grow."""

IMPURE_IMPORTS = frozenset({"trio", "socket", "sqlite3", "os", "time", "subprocess", "threading"})

ROLES = ("ca", "agent", "proxy")
LAYERS = ("tally.spiffe", "tally.tls", "tally.wire", "tally.ops", ROLES, "tally.app")
"""Lowest first; the roles share one rank."""

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}
"""(rule, module) -> the reason it is still so; each one is a strict xfail."""

_ROLE_MODULE_NAME = re.compile(rf"^(?:{'|'.join(ROLES)})(?:\.\w+)*$")
_DOTTED_ROLE_MODULE = re.compile(rf"^(?:{'|'.join(ROLES)})(?:\.\w+)+$")


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "tally.wire.grpc"
    path: str  # relative to the repository, e.g. "tally/wire/grpc.py"
    imports: tuple[str, ...]  # dotted names, each as specific as the source says


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute dotted name a ``from`` import refers to (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    anchor = parts[: len(parts) - node.level + 1]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _dynamic_import_target(call: ast.Call) -> ast.expr | None:
    """The name argument of ``importlib.import_module(...)``/``__import__(...)``, if it is one."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called in ("import_module", "__import__") and call.args:
        return call.args[0]
    return None


def imports_of(source: str, path: str) -> tuple[str, ...]:
    """Every module `source` imports, anywhere in it, in source order.

    ``from a import b`` counts as ``a.b``: `b` may be a module, and a name taken
    from `a` still ranks as `a`.
    """
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(source)
    found: list[tuple[int, int, str]] = []
    dynamic_by_variable = False
    for node in ast.walk(tree):
        at = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))
        if isinstance(node, ast.Import):
            found.extend((*at, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, package)
            for alias in node.names:
                found.append((*at, base if alias.name == "*" else f"{base}.{alias.name}"))
        elif isinstance(node, ast.Call) and (target := _dynamic_import_target(node)) is not None:
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                found.append((*at, target.value))
            else:
                dynamic_by_variable = True
    if dynamic_by_variable:
        # A module name chosen at run time: any role module the source spells may be it.
        found.extend(
            (node.lineno, node.col_offset, node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _DOTTED_ROLE_MODULE.match(node.value)
        )
    return tuple(name for *_, name in sorted(found))


def rank(name: str) -> int | None:
    """The layer of a first-party module, or None for anything else (stdlib, third party)."""
    for index, layer in enumerate(LAYERS):
        for prefix in (layer,) if isinstance(layer, str) else layer:
            if name == prefix or name.startswith(prefix + "."):
                return index
    return None


def role_of(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in ROLES and _ROLE_MODULE_NAME.match(name) else None


def is_pure(path: str) -> bool:
    return any(path.startswith(entry) if entry.endswith("/") else path == entry for entry in PURE)


# -- the four rules, each a function from a module to what it breaks ------------------


def impure_imports(module: Module, pure_names: frozenset[str] | None = None) -> list[str]:
    """(a) What a pure module imports that does I/O, sits higher, or is not pure itself.

    `pure_names` are the pure modules to allow; by default, those of the code base.
    """
    if not is_pure(module.path):
        return []
    pure_names = PURE_NAMES if pure_names is None else pure_names
    own = rank(module.name)
    bad = []
    for name in module.imports:
        theirs = rank(name)
        if name.split(".")[0] in IMPURE_IMPORTS:
            bad.append(f"{name} (does I/O)")
        elif theirs is not None and own is not None and theirs > own:
            bad.append(f"{name} (a higher layer)")
        elif theirs is not None and not _imports_pure(name, pure_names):
            bad.append(f"{name} (not a pure module)")
    return bad


def _imports_pure(name: str, pure_names: frozenset[str]) -> bool:
    """Whether `name` (a module, or a name taken from one) is pure."""
    parts = name.split(".")
    return any(".".join(parts[:n]) in pure_names for n in range(len(parts), 0, -1))


def upward_imports(module: Module) -> list[str]:
    """(b) What a module imports from a higher layer."""
    own = rank(module.name)
    if own is None:
        return []
    return [name for name in module.imports if (theirs := rank(name)) is not None and theirs > own]


def cross_role_imports(module: Module) -> list[str]:
    """(c) What a role imports from another role."""
    own = role_of(module.name)
    if own is None:
        return []
    return [name for name in module.imports if role_of(name) not in (None, own)]


def role_imports_outside_the_app(module: Module) -> list[str]:
    """(d) The roles a module outside tally/app imports (a role's own modules excepted)."""
    if rank(module.name) == LAYERS.index("tally.app"):
        return []
    own = role_of(module.name)
    return [name for name in module.imports if role_of(name) not in (None, own)]


RULES: dict[str, Callable[[Module], list[str]]] = {
    "pure": impure_imports,
    "upward": upward_imports,
    "cross-role": cross_role_imports,
    "role-outside-app": role_imports_outside_the_app,
}


# -- the code base ---------------------------------------------------------------------


def all_modules() -> list[Module]:
    modules = []
    for top in ("tally", *ROLES):
        for file in sorted((ROOT / top).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            name = module_name(path)
            modules.append(Module(name, path, imports_of(file.read_text(), path)))
    return modules


MODULES = all_modules()
PURE_NAMES = frozenset(m.name for m in MODULES if is_pure(m.path))


def _cases() -> Iterator[object]:
    for rule in RULES:
        for module in MODULES:
            reason = KNOWN_VIOLATIONS.get((rule, module.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(rule, module, id=f"{rule}:{module.path}", marks=marks)


def test_every_first_party_module_is_walked():
    names = {m.name for m in MODULES}
    assert {
        "tally.spiffe.x509profile",
        "tally.app.cli",
        "ca.cli",
        "agent.cli",
        "proxy.cli",
    } <= names
    assert all(rank(m.name) is not None for m in MODULES if m.name != "tally")
    cli = next(m for m in MODULES if m.name == "tally.app.cli")
    assert {"ca.cli", "agent.cli", "proxy.cli"} <= set(cli.imports)  # the app finds every role
    assert all(any(m.path.startswith(p) or m.path == p for m in MODULES) for p in PURE), PURE


@pytest.mark.parametrize(("rule", "module"), list(_cases()))
def test_layers(rule: str, module: Module):
    assert RULES[rule](module) == [], f"{module.path} breaks rule {rule!r}"


# -- self-tests: each rule catches a synthetic violation -------------------------------


def synthetic(path: str, source: str) -> Module:
    return Module(module_name(path), path, imports_of(source, path))


PURE_OK = frozenset({"tally.spiffe.spiffeid", "tally.spiffe.fake"})


def test_self_pure_module_importing_io_is_caught():
    module = synthetic(
        "tally/spiffe/fake.py", "def f():\n    import trio\n    from os import path\n"
    )
    assert impure_imports(module, PURE_OK) == ["trio (does I/O)", "os.path (does I/O)"]


def test_self_pure_module_importing_a_higher_or_impure_module_is_caught():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from tally.ops.config import Address\n"
        "from tally.wire import http\n"
        "from tally.spiffe.spiffeid import SpiffeId\n"
    )
    module = synthetic("tally/wire/grpc.py", source)
    assert impure_imports(module, PURE_OK | {"tally.wire.grpc"}) == [
        "tally.ops.config.Address (a higher layer)",
        "tally.wire.http (not a pure module)",
    ]
    assert impure_imports(synthetic("tally/wire/http.py", source), PURE_OK) == []  # not pure


def test_self_upward_import_is_caught():
    module = synthetic("tally/tls/fake.py", "from . import plain\nimport tally.app.launch\n")
    assert module.imports == ("tally.tls.plain", "tally.app.launch")
    assert upward_imports(module) == ["tally.app.launch"]
    assert upward_imports(synthetic("proxy/fake.py", "from tally.app import demo\n")) == [
        "tally.app.demo"
    ]
    assert upward_imports(synthetic("tally/app/fake.py", "import ca.cli\n")) == []
    package = synthetic(
        "tally/wire/__init__.py", "from .http import serve\nfrom ..app import cli\n"
    )
    assert package.imports == ("tally.wire.http.serve", "tally.app.cli")
    assert upward_imports(package) == ["tally.app.cli"]


def test_self_cross_role_import_is_caught():
    module = synthetic("proxy/fake.py", "def f():\n    from ca.store import Store\n")
    assert cross_role_imports(module) == ["ca.store.Store"]
    assert cross_role_imports(synthetic("proxy/fake.py", "from proxy import tcp\n")) == []


def test_self_role_import_outside_the_app_is_caught():
    module = synthetic("tally/ops/fake.py", "import agent.cli\n")
    assert role_imports_outside_the_app(module) == ["agent.cli"]
    assert role_imports_outside_the_app(synthetic("tally/app/fake.py", "import agent.cli\n")) == []


def test_self_dynamic_role_imports_are_caught():
    by_string = synthetic(
        "tally/ops/fake.py", "import importlib\nimportlib.import_module('ca.cli')\n"
    )
    assert role_imports_outside_the_app(by_string) == ["ca.cli"]
    by_table = synthetic(
        "tally/wire/fake.py",
        "import importlib\nROLES = {'proxy': 'proxy.cli'}\n"
        "def load(role):\n    return importlib.import_module(ROLES[role])\n",
    )
    assert role_imports_outside_the_app(by_table) == ["proxy.cli"]
    assert cross_role_imports(synthetic("ca/fake.py", "__import__('agent.manager')\n")) == [
        "agent.manager"
    ]
