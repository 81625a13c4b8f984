"""The package's layering: the core imports no integration, demo or CLI module, and no
module-level import cycle exists anywhere in the package (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asft_kernels"
CORE = ("asft_kernels.optim", "asft_kernels.functional", "asft_kernels.sharding", "asft_kernels.ops",
        "asft_kernels.anchor", "asft_kernels.reference")
OUTSIDE_CORE = ("asft_kernels.integrations", "asft_kernels.demo", "asft_kernels.cli", "asft_kernels.diagnostics")


def test_core_modules_load_no_integration():
    code = (f"import sys, {', '.join(CORE)}\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({OUTSIDE_CORE!r}))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path, name: str) -> set[str]:
    """Package modules imported at module level (not inside functions) by ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("asft_kernels"):
                if node.module:  # `from . import x` needs the submodule x, not the package
                    out.add(target)
                out.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("asft_kernels"))
    return out


def test_no_import_cycle_in_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {t for t in _top_level_imports(path, name) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
