"""The package's floors: every import in mlray/ (module level and inside functions)
points down the declared layer order, and no chain of imports comes back to its start.

Floors, bottom to top. A module may import its own package and any package on a
lower floor; two packages on one floor never import each other.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mlray"

LAYERS = [
    {"io"},
    {"config"},
    {"runtime", "progress", "resources"},
    {"data"},
    {"model"},
    {"evaluation"},
    {"training", "tagging"},
    {"audit"},
    {"demo"},
    {"cli"},
    {"__main__", "__init__"},  # python -m mlray, and the lazy public API
]
FLOOR = {unit: i for i, floor in enumerate(LAYERS) for unit in floor}


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The mlray modules that ``path`` imports, anywhere in the file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from mlray.x import y``: y is a module when one of that name exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "mlray" or t.startswith("mlray."):
                while t not in known:  # an attribute path: its module
                    t = t.rsplit(".", 1)[0]
                found.add(t)
    return found - {name}


def unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_every_package_and_top_level_module_has_a_floor(graph):
    assert {unit(m) for m in graph} <= set(FLOOR), {unit(m) for m in graph} - set(FLOOR)


def test_imports_point_down(graph):
    upward = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = unit(src), unit(dst)
            if a != b and FLOOR[b] >= FLOOR[a] and dst != "mlray":
                upward.append(f"{src} -> {dst} (floor {FLOOR[a]} imports floor {FLOOR[b]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_import_cycles(graph):
    """Depth-first search for a back edge; the cycle found is named in full."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The test itself: an import inside a function, and a relative one, are found."""
    pkg = tmp_path / "mlray"
    (pkg / "io").mkdir(parents=True)
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("def f():\n    from mlray.training import b\n    from . import c\n")
    known = {"mlray", "mlray.io", "mlray.io.a", "mlray.io.c", "mlray.training", "mlray.training.b"}
    assert imports(pkg / "io" / "a.py", "mlray.io.a", known) == {"mlray.training.b", "mlray.io.c"}
