"""The house keeps its shape: every module sits in a room (subpackage) on a floor, imports only
from its own floor or below, and no two modules import each other, directly or in a circle.

Imports are read from the source with ast (function-level imports included), so a lazy import
cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "harness"

# Lowest floor first. A room may import its own floor and any floor below, never above.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("host", "remote"),
    ("qemu",),
    ("guest",),
    ("vm",),
    ("scenario",),
    ("results",),
    ("vmexit", "selftests", "bench", "hostvm"),
    ("matrix",),
    ("runners",),
)
FLOOR_OF = {room: n for n, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(HARNESS.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_imports(path: Path) -> set[str]:
    """Every harness module this file imports (absolute imports only: the house uses no other)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            mod = node.module or ""
            if mod.startswith("harness"):
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    found.add(sub if (HARNESS.parent / (sub.replace(".", "/") + ".py")).exists()
                              else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("harness"))
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR_OF) else None


MODULES = {module_name(p): p for p in sorted(HARNESS.rglob("*.py"))}
GRAPH = {m: harness_imports(p) - {m} for m, p in MODULES.items()}


def test_every_module_lives_in_a_room():
    loose = [m for m in MODULES if m not in ("harness", "harness.__main__") and room(m) not in FLOOR_OF]
    assert not loose, f"modules outside the rooms of FLOORS: {loose}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) in FLOOR_OF))
def test_no_import_from_a_higher_floor(module: str):
    mine = FLOOR_OF[room(module)]
    up = [dep for dep in GRAPH[module] if room(dep) in FLOOR_OF and FLOOR_OF[room(dep)] > mine]
    assert not up, f"{module} (floor {mine}) imports from above: {sorted(up)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None (iterative DFS, white/grey/black)."""
    colour = dict.fromkeys(graph, 0)
    for start in graph:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next((d for d in it if d in graph), None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, f"import circle: {' -> '.join(find_cycle(GRAPH) or [])}"


def test_the_checks_catch_a_broken_house():
    # The oracles themselves: a planted circle and a planted upward import are found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert FLOOR_OF[room("harness.runners.cli")] > FLOOR_OF[room("harness.core.proc")]
    assert room("harness.loose") is None
