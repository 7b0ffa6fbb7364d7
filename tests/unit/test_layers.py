"""What may import what (docs/architecture.md, "Layers"), checked on the source with ``ast``:

* the serving path never imports the dev tooling (``discovery.devtools``): only the command
  line that runs it (``cli/dev.py``, ``cli/drill.py``, ``cli/main.py``), the drills, the tests
  and the benches do; and importing the server loads none of it;
* the domain (view, replication, registry, query, model, keys, errors, config) imports no
  gRPC servicer and nothing of the layers above it (api, xds, server, cli, devtools, drill);
* in the server and the client, only ``discovery/store.py`` imports ``etcd3aio``;
* the client library and the generated stubs import nothing from ``discovery``;
* no module imports a private (underscore) module of another package;
* nothing imports a conftest, and tests/support imports nothing of tests/ but itself, so the
  shared test code has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients" / "python"
SOURCES = [
    (ROOT, "discovery"),
    (CLIENTS, "discovery_client"),
    (CLIENTS, "discovery_pb"),
    (ROOT, "tests"),
    (ROOT, "bench"),
    (ROOT, "scripts"),
]

DEVTOOLS = "discovery.devtools"
DEVTOOLS_USERS = ("discovery.cli.dev", "discovery.cli.drill", "discovery.cli.main", "discovery.drill", DEVTOOLS)
NOT_SERVING = ("discovery.cli", "discovery.drill", DEVTOOLS)  # the rest of discovery/ is the serving path
DOMAIN = (
    "discovery.view",
    "discovery.replication",
    "discovery.registry",
    "discovery.query",
    "discovery.model",
    "discovery.keys",
    "discovery.errors",
    "discovery.config",
)
ABOVE_DOMAIN = ("discovery.api", "discovery.xds", "discovery.server", "discovery.cli", "discovery.drill", DEVTOOLS)

# Private modules of packages not ours, each named with its reason. etcd3aio exports no
# public names for its generated stubs: the store uses them for the calls its API lacks, the
# benches for a direct-etcd baseline.
FOREIGN_PRIVATE_ALLOWED = {
    ("discovery.store", "etcd3aio._protobuf"),
    ("bench.client_bench", "etcd3aio._protobuf"),
    ("bench.resolve_bench", "etcd3aio._protobuf"),
    ("bench.scale_bench", "etcd3aio._protobuf"),
}

# Violations of the rules above found in the tree and not yet fixed, each to be removed with
# its fix (test_known_violations_are_still_there fails once one is gone).
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file that imports
    module: str  # dotted name of the module imported (``from a import b``: a.b when b is a module)
    names: tuple[str, ...] = ()  # ``from a import b, c``: b and c


def _module_name(base: Path, path: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of the sources (not a name inside one)."""
    for base, top in SOURCES:
        if name.split(".", maxsplit=1)[0] == top:
            path = base.joinpath(*name.split("."))
            return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
    return False


def _modules() -> Iterator[tuple[str, Path]]:
    for base, top in SOURCES:
        for path in sorted((base / top).rglob("*.py")):
            yield _module_name(base, path), path


def _imports() -> list[Import]:
    found = []
    for name, path in _modules():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    module = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                found.append(Import(name, module, tuple(alias.name for alias in node.names)))
                for alias in node.names:
                    # ``from a import b`` imports module a.b when b is a module (of ours, or a
                    # private one of a package not ours: etcd3aio._protobuf).
                    if _is_module(f"{module}.{alias.name}") or alias.name.startswith("_"):
                        found.append(Import(name, f"{module}.{alias.name}"))
    return found


IMPORTS = _imports()


def _within(name: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == p or name.startswith(p + ".") for p in packages)


def _private_of_another_package(i: Import) -> bool:
    parts = i.module.split(".")
    for k, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            owner = ".".join(parts[:k])  # the package the private module belongs to
            if not _is_module(".".join(parts[: k + 1])) and _within(parts[0], tuple(t for _, t in SOURCES)):
                return False  # a private name inside one of our modules, not a module
            return not (i.importer == owner or i.importer.startswith(owner + "."))
    return False


def _violations() -> set[tuple[str, str, str]]:
    found = set()
    for i in IMPORTS:
        shipped = ("discovery", "discovery_client", "discovery_pb", "scripts")  # tests and bench may use devtools
        if _within(i.module, DEVTOOLS) and _within(i.importer, shipped) and not _within(i.importer, DEVTOOLS_USERS):
            found.add(("devtools", i.importer, i.module))
        if _within(i.importer, "discovery") and not _within(i.importer, NOT_SERVING) and _within(i.module, DEVTOOLS):
            found.add(("serving-path", i.importer, i.module))
        if _within(i.importer, DOMAIN):
            servicer = any(n.endswith("Servicer") or n.startswith("add_") for n in i.names)
            if servicer or _within(i.module, ABOVE_DOMAIN):
                found.add(("domain", i.importer, i.module))
        if (
            _within(i.module, "etcd3aio")
            and _within(i.importer, ("discovery", "discovery_client", "discovery_pb"))
            and i.importer != "discovery.store"
        ):
            found.add(("etcd3aio", i.importer, i.module))
        if _within(i.importer, ("discovery_client", "discovery_pb")) and _within(i.module, "discovery"):
            found.add(("client", i.importer, i.module))
        support = "tests.support"
        if i.module.rpartition(".")[2] == "conftest" or (
            _within(i.importer, support) and _within(i.module, "tests") and not _within(i.module, support)
        ):
            found.add(("tests", i.importer, i.module))
        generated = _within(i.importer, "discovery_pb")  # grpc_tools' output imports grpc._utilities
        if _private_of_another_package(i) and not generated and (i.importer, i.module) not in FOREIGN_PRIVATE_ALLOWED:
            found.add(("private", i.importer, i.module))
    return found


def test_the_walk_sees_the_tree() -> None:
    importers = {i.importer for i in IMPORTS}
    assert {"discovery.server", "discovery.store", "discovery.devtools.cluster", "discovery_client"} <= importers
    modules = {(i.importer, i.module) for i in IMPORTS}
    assert ("discovery.cli.dev", "discovery.devtools.cluster") in modules
    assert ("discovery.xds.ads", "discovery.api.streams") in modules  # a from-import of a module


def test_no_new_violation_of_the_layers() -> None:
    assert sorted(_violations() - KNOWN_VIOLATIONS) == []


def test_known_violations_are_still_there() -> None:
    """A fixed violation leaves KNOWN_VIOLATIONS, so it cannot come back unseen."""
    assert sorted(KNOWN_VIOLATIONS - _violations()) == []


def test_importing_the_server_loads_no_devtools() -> None:
    """The server, imported in a fresh interpreter: none of the dev tooling (threads,
    subprocesses, at-fork handlers) comes with it, directly or not. (The ``discovery`` command
    itself imports ``cli/dev.py`` and ``cli/drill.py``, which use it.)"""
    code = "import sys, discovery.server; print(sorted(m for m in sys.modules if m.startswith('discovery.devtools')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]"
