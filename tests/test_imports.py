"""Import structure: no import circle anywhere in drex_hf, and the layers in pyproject.toml hold.

The circle check reads the source with `ast`, so it counts every import a reader sees: module level,
inside functions, and under `if TYPE_CHECKING:` (a circle a type checker or a later refactor trips
over is still a circle). `from pkg import name` is an edge to `pkg.name` when that is a module, else
to `pkg`; relative imports are resolved. Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`;
those implicit parent imports are not edges (no circle tool counts them).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package_dir` (a package: `x/__init__.py` is `x`)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module of the same package: line numbers}, every import statement counted."""
    modules = module_names(package_dir)

    def known(name: str) -> str | None:  # the longest prefix of `name` that is a module of the package
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [known(f"{source}.{alias.name}") or known(source) for alias in node.names]
            else:
                continue
            for target in targets:
                if target is not None and target != name:
                    graph[name].setdefault(target, []).append(node.lineno)
    return graph


def circles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph[target])))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def describe(graph: dict[str, dict[str, list[int]]], found: list[list[str]]) -> str:
    lines = []
    for component in found:
        lines.append(f"circle of {len(component)} modules:")
        for module in component:
            for target, at in sorted(graph[module].items()):
                if target in component:
                    lines.append(f"    {module} -> {target} (line {', '.join(map(str, sorted(set(at))))})")
    return "\n".join(lines)


def test_no_import_circle_in_drex_hf():
    graph = import_graph(ROOT / "drex_hf")
    found = circles(graph)
    assert not found, "import circles in drex_hf (function-level and TYPE_CHECKING imports count):\n" + describe(
        graph, found
    )


def test_the_circle_check_finds_circles_through_function_and_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        # a -> b at module level, b -> a inside a function
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from . import a\n",
        # c -> d (relative, from a subpackage) and d -> c only for the type checker
        "sub/__init__.py": "",
        "sub/c.py": "from ..d import thing\n",
        "d.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import pkg.sub.c\nthing = 1\n",
        # no circle: e -> a only
        "e.py": "import pkg.a as a\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.a": [2]}
    assert graph["pkg.sub.c"] == {"pkg.d": [1]}
    assert circles(graph) == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub.c"]]
    assert "pkg.d -> pkg.sub.c (line 4)" in describe(graph, circles(graph))


def test_import_linter_contracts_hold():
    """The layers and the generation contract in pyproject.toml [tool.importlinter] (`make lint` runs
    the same). lint-imports is looked for beside this Python first: `make test` runs from .venv."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    command = str(lint_imports) if lint_imports.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is not installed (pip install -r requirements-cpu.txt)"
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
