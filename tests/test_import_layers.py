"""The package's import graph: no cycles, and every import points down the declared layers
(README, Layout). Walked with `ast` over every module, counting every `import` and `from ...
import` of evomerge code wherever it stands (module level, inside a function, under
TYPE_CHECKING): a lazy import still ties two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"

# Top to bottom: a module may import its own layer and the layers below it. Names match a module
# or anything under it; the longest match decides (evomerge.fitness.spec is a spec, not fitness).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("evomerge.cli", "evomerge.demo", "evomerge.zoo")),
    ("search", ("evomerge.search",)),
    ("fitness", ("evomerge.fitness",)),
    ("backends", ("evomerge.backends",)),
    ("config", ("evomerge.config",)),
    ("merge and models", ("evomerge.merge", "evomerge.models", "evomerge.layouts", "evomerge.routing",
                          "evomerge.routing_layouts", "evomerge.vocab", "evomerge.export", "evomerge.mergekit_yaml",
                          "evomerge.mergekit_in", "evomerge.model_card", "evomerge.lora", "evomerge.lora_export")),
    ("specs", ("evomerge.recipe", "evomerge.search_space", "evomerge.merge.methods", "evomerge.fitness.spec",
               "evomerge.backends.vllm_options")),
    ("base", ("evomerge.errors", "evomerge.yamlio", "evomerge.refs", "evomerge.faults")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The evomerge modules `path` imports (`from evomerge.x import y` names evomerge.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) - {name} for name, path in known.items()}


def layer(name: str) -> int:
    matches = [(len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS (and to README's Layout)"
    return max(matches)[1]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_points_down_the_layers():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) < layer(a)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_package_inits_import_no_evomerge_code():
    """Importing evomerge.fitness.spec runs evomerge/fitness/__init__.py first: an __init__ that
    imports nothing keeps a submodule's imports the whole story."""
    edges = graph()
    heavy = {name: sorted(edges[name]) for name, path in modules().items() if path.name == "__init__.py" and edges[name]}
    assert not heavy, f"package __init__ modules that import evomerge code: {heavy}"


def test_the_walker_sees_lazy_and_type_checking_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evomerge.config import RunConfig\n"
                      "def f():\n    import evomerge.errors\n    from evomerge import yamlio\n")
    assert imports(source, set(modules())) == {"evomerge.config", "evomerge.errors", "evomerge.yamlio"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_readme_layout_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [name for name, path in modules().items()
               if path.name != "__init__.py" and f"`{path.stem}.py`" not in layout]
    assert not missing, f"README's Layout does not name: {missing}"
