"""The package's import graph: no cycles, and imports point down the layers of ../DESIGN.md §2
(cli > api/jobs/ray > parallel > plan > engine > models > memory > kernels > config).

Every import counts, those inside functions too; only `if TYPE_CHECKING:` blocks are exempt.
`from pkg import name` depends on the module pkg.name when that is a module, else on pkg."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flexrun"

# lower index = lower layer; a module may import its own layer or any layer below it
LAYERS = ["config", "kernels", "memory", "models", "engine", "plan", "parallel", "api", "jobs",
          "ray", "cli", "__init__"]
RANK = {"config": 0, "kernels": 1, "memory": 2, "models": 3, "engine": 4, "plan": 5,
        "parallel": 6, "api": 7, "jobs": 7, "ray": 7, "cli": 8, "__init__": 9}


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        skip.add(n.lineno)
    return skip


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
             if RANK[layer(d)] > RANK[layer(m)]]
    assert not wrong, "imports pointing up: " + "; ".join(sorted(wrong))


def test_every_module_has_a_layer():
    assert {layer(m) for m in module_names(ROOT)} <= set(RANK)


def test_kernels_import_nothing_of_flexrun_but_config():
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() if layer(m) == "kernels"
             for d in deps if layer(d) not in ("kernels", "config")]
    assert not wrong, wrong


def test_cycle_finder_catches_a_deferred_import(tmp_path):
    """The checker itself: a cycle through an import inside a function is found, one under
    `if TYPE_CHECKING:` is not."""
    pkg = tmp_path / "flexrun"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from flexrun.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from flexrun import a\n")
    assert find_cycle(import_graph(pkg)) == ["flexrun.a", "flexrun.sub.b", "flexrun.a"]
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flexrun import a\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("relative", [True, False])
def test_relative_and_absolute_imports_resolve_alike(tmp_path, relative):
    pkg = tmp_path / "flexrun"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("")
    line = "from ..config import X\n" if relative else "from flexrun.config import X\n"
    (pkg / "sub" / "b.py").write_text(line)
    assert import_graph(pkg)["flexrun.sub.b"] == {"flexrun.config"}
