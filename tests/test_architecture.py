"""The import graph of pertvl: imports point one way (docs/ARCHITECTURE.md, "Layers").

Data flows ingest → perturb → pack → stream → model → losses → engine → export → infer → evaluate;
a module may import its own layer and the layers before it, never one after it, and the graph
has no cycle. The graph is read from the source (every `import` / `from ... import`, also those
inside functions), so a lazy import against the flow is caught as well.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pertvl

PACKAGE_DIR = Path(pertvl.__file__).parent

# Layers in data-flow order; a module belongs to the longest prefix listed (a prefix covers a
# module and everything under it).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("pertvl", "pertvl.__main__", "pertvl.cli", "pertvl.files", "pertvl.faults",
              "pertvl.config", "pertvl.pipeline", "pertvl.errors", "pertvl.process")),
    ("ingest", ("pertvl.data", "pertvl.data.cli", "pertvl.data.records", "pertvl.data.text", "pertvl.data.tokenize",
                "pertvl.data.image", "pertvl.data.openi", "pertvl.data.phantom")),
    ("perturb", ("pertvl.data.perturb",)),
    ("pack", ("pertvl.data.shards",)),
    ("stream", ("pertvl.data.stream", "pertvl.data.batch", "pertvl.data.augment")),
    ("model", ("pertvl.model",)),
    ("losses", ("pertvl.losses",)),
    ("engine", ("pertvl.train",)),
    ("export", ("pertvl.export",)),
    ("infer", ("pertvl.infer",)),
    ("evaluate", ("pertvl.evaluate",)),
    ("app", ("pertvl.demo", "pertvl.demo_cli")),
)
_RANK = {prefix: (i, name) for i, (name, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package's __init__)} of every module of pertvl."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: pertvl modules it imports}, from every import statement of its source."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pertvl.data import shards` imports the module pertvl.data.shards
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def layer_of(module: str) -> tuple[int, str]:
    probe = module
    while probe:
        if probe in _RANK:
            return _RANK[probe]
        probe = probe.rpartition(".")[0]
    raise KeyError(module)


def test_every_module_has_a_layer():
    unplaced = []
    for module in package_modules():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer of LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_imports_follow_the_data_flow():
    graph = import_graph()
    assert "pertvl.data.shards" in graph["pertvl.data.stream"]  # the reader sees real edges
    against = []
    for module, targets in sorted(graph.items()):
        rank, layer = layer_of(module)
        for target in sorted(targets):
            target_rank, target_layer = layer_of(target)
            if target_rank > rank:
                against.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not against, "imports against the data flow:\n" + "\n".join(against)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path
                              else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_importing_infer_loads_neither_torch_matplotlib_nor_evaluation():
    """The runtime serves an export where torch is not installed: a fresh interpreter that
    imports pertvl.infer has loaded no torch, transformers, matplotlib nor pertvl.evaluate module."""
    code = (
        "import json, sys\n"
        "import pertvl.infer\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib')"
        " or m == 'pertvl.evaluate' or m.startswith('pertvl.evaluate.'))\n"
        "print(json.dumps(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE_DIR.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
