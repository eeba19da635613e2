"""The house rules of DESIGN.md's parts table, checked on every import in the tree.

Each module's imports are read from its source (ast), each rule says which imports a part may not make, and a
failure names the file, the line and the arrow. Imports inside functions and under `if TYPE_CHECKING:` are
deferred; the server's rule is about what it loads at import time, so it counts only module-level imports, and a
subprocess confirms that importing the server really leaves torch unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    top_level: bool  # at import time: not inside a function, not under TYPE_CHECKING


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(path) if path.name == "__init__.py" else _package_of(path).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            deferred = top_level
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                deferred = False
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                deferred = False
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, child.lineno, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    module = ".".join([*base, child.module] if child.module else base)
                else:
                    module = child.module
                found.append(Import(module, child.lineno, top_level))
                found.extend(Import(f"{module}.{alias.name}", child.lineno, top_level) for alias in child.names)
            visit(child, deferred)

    visit(tree, True)
    return found


def modules(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (ROOT / part).rglob("*.py"))


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@dataclass(frozen=True)
class Rule:
    """Modules under `parts` may not import anything under `forbidden` (at import time only, if `top_level_only`),
    except what is under `allowed`."""

    name: str
    parts: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    top_level_only: bool = False
    only_known: bool = False  # forbid everything outside stdlib and `allowed`


RULES = [
    Rule("the add-on never imports torch or backend code", ("blender_addon",), ("torch", "backend", "triton")),
    Rule("the add-on's core never imports bpy", ("blender_addon/core",), ("bpy",)),
    Rule("the add-on reaches the protocol only through its own subpackage", ("blender_addon/core", "blender_addon/blender"),
         ("protocol",)),
    Rule("the backend never imports bpy", ("backend",), ("bpy",)),
    Rule("the model code never imports the asset code, the server or ZeroMQ", ("backend/trellis2",),
         ("backend.asset", "backend.server", "backend.engine", "zmq", "blender_addon")),
    Rule("the O-Voxel code sits beneath the model and asset code", ("backend/ovoxel",),
         ("backend.trellis2", "backend.asset", "backend.server", "backend.engine")),
    Rule("the asset code never imports the model code or the server", ("backend/asset",),
         ("backend.trellis2", "backend.server", "backend.engine")),
    Rule("the server loads neither torch nor model code at import time", ("backend/server",),
         ("torch", "triton", "backend.trellis2", "backend.engine", "backend.asset.postprocess"), top_level_only=True),
    Rule("native kernels need only torch, triton and numpy", ("backend/native",), (),
         allowed=("torch", "triton", "numpy", "backend.native"), only_known=True),
    Rule("the protocol needs only msgpack, pyzmq and numpy", ("protocol",), (),
         allowed=("msgpack", "zmq", "numpy", "protocol"), only_known=True),
]
# The one protocol module the model and asset code may read: the settings schema (pure data, no ZeroMQ).
SCHEMA_ONLY = Rule("model and asset code read only the settings schema of the protocol",
                   ("backend/trellis2", "backend/asset", "backend/ovoxel", "backend/native"), ("protocol",),
                   allowed=("protocol.settings",))
RULES.append(SCHEMA_ONLY)


def violations(rule: Rule) -> list[str]:
    out = []
    for path in modules(*rule.parts):
        if path.parts[-2:] == ("blender_addon", "__init__.py"):
            continue  # it borrows the repository's protocol when run from the source tree (see its docstring)
        for imp in imports_of(path):
            if rule.top_level_only and not imp.top_level:
                continue
            root = imp.module.split(".")[0]
            if _under(imp.module, rule.allowed):
                continue
            if rule.only_known:
                bad = root not in STDLIB
            else:
                bad = _under(imp.module, rule.forbidden)
            if bad:
                out.append(f"{path.relative_to(ROOT)}:{imp.line} imports {imp.module}")
    return sorted(set(out))


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_no_import_breaks_the_house_rules(rule: Rule) -> None:
    assert violations(rule) == []


def test_the_walk_sees_relative_deferred_and_type_checking_imports(tmp_path) -> None:
    source = ("from typing import TYPE_CHECKING\nfrom .sibling import x\nimport torch\n"
              "if TYPE_CHECKING:\n    from backend.engine import Engine\n"
              "def f():\n    import backend.trellis2.pipeline\n")
    path = ROOT / "backend" / "server" / "_probe_for_test.py"
    path.write_text(source)
    try:
        found = {(i.module, i.top_level) for i in imports_of(path)}
    finally:
        path.unlink()
    assert {("backend.server.sibling", True), ("torch", True), ("backend.engine", False),
            ("backend.trellis2.pipeline", False)} <= found


def test_importing_the_server_really_leaves_torch_unloaded() -> None:
    code = ("import sys, backend.server.server, backend.server.submit_cli; "
            "print(sorted(m for m in ('torch', 'backend.trellis2', 'backend.engine') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
