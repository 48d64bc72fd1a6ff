"""Imports go downward only: base ← core ← module ← kvm ← tools (SPEC §2, STYLE §2.1).

Walks every module of the package (Python files with ``ast``, Cython files by their import and
cimport lines) and fails on an upward import, on any package import of ``tdxcore.reference``, and
on a twin importing a core (or a core importing a twin).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tdxcore

PKG = Path(tdxcore.__file__).resolve().parent

BASE = {"status", "constants", "errors", "guest", "eventlog", "sched"}
CORE = {"_sept", "_pamt", "_xarray", "_invalidate", "_busylock", "_atomic", "_alloc", "_defs", "_testing",
        "_probe"}
RANK = {"base": 0, "core": 1, "module": 2, "kvm": 3, "tools": 4}
TOOLS = {"invariants", "storm", "explore", "trace", "cli", "cli_tools", "schemas", "helpers_cli", "bench",
         "demo", "__main__", "benchplot"}


def layer_of(parts: tuple[str, ...]) -> str:
    """Layer of a module given its dotted parts below ``tdxcore``."""
    head = parts[0]
    if head in BASE or head == "data":
        return "base"
    if head in CORE:
        return "core"
    if head == "reference":
        return "reference"
    if head == "module":
        return "module"
    if head == "kvm":
        return "kvm"
    if head in TOOLS:
        return "tools"
    if head == "__init__":
        return "facade"
    raise AssertionError(f"tdxcore.{'.'.join(parts)} belongs to no layer: add it to test_layers.py")


def _imports_py(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    pkg_parts = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


_CY_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def _imports_pyx(path: Path) -> list[str]:
    return [a or b for a, b in _CY_IMPORT.findall(path.read_text())]


def _modules():
    for path in sorted(PKG.rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxd") or "__pycache__" in path.parts:
            continue
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield path, parts


def test_every_module_has_a_layer():
    for _, parts in _modules():
        layer_of(parts)


def test_imports_go_downward_only():
    problems = []
    for path, parts in _modules():
        src_layer = layer_of(parts)
        imports = _imports_pyx(path) if path.suffix in (".pyx", ".pxd") else _imports_py(path)
        for imp in imports:
            if not imp.startswith("tdxcore.") or imp == "tdxcore":
                continue
            dst_parts = tuple(imp.split(".")[1:])
            try:
                dst_layer = layer_of(dst_parts)
            except AssertionError:
                continue  # a name imported from a package, e.g. `from tdxcore import status`
            if src_layer == "facade":
                continue
            if dst_layer == "reference" and src_layer != "reference":
                problems.append(f"{path.name}: the package must not import the twins ({imp})")
            elif src_layer == "reference":
                if dst_layer not in ("base", "reference") or dst_parts[0] not in (
                    "status", "constants", "errors", "reference"
                ):
                    problems.append(f"{path.name}: a twin may import only status/constants/errors ({imp})")
            elif dst_layer not in ("reference", "facade") and RANK[dst_layer] > RANK[src_layer]:
                problems.append(f"{path.name} ({src_layer}) imports upward: {imp} ({dst_layer})")
            elif src_layer == "base" and dst_layer == "base" and parts[0] in ("status", "constants"):
                if dst_parts[0] not in ("errors",):
                    problems.append(f"{path.name}: status/constants are stdlib-only ({imp})")
    assert not problems, "\n".join(problems)


def test_checker_sees_an_upward_import(tmp_path):
    """The walker itself works: a core importing kvm/ is reported."""
    assert RANK["kvm"] > RANK["core"]
    fake = tmp_path / "x.pyx"
    fake.write_text("from tdxcore.kvm.vm cimport Vm\nimport tdxcore.reference.sept\n")
    assert _imports_pyx(fake) == ["tdxcore.kvm.vm", "tdxcore.reference.sept"]
