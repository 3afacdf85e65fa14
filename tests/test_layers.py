"""keiryo's modules import one way, lowest layer first (see ../shared/DESIGN.md): no cycles, no keiryo
import hidden inside a function, no module importing one from a higher layer. New modules are placed here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "keiryo"

# lowest first; a module may import its own layer (without cycles) or any lower one
LAYERS: list[tuple[str, ...]] = [
    (
        "units",
        "errors",
        "optional",
        "devices",
        "fileio",
        "sparse",
        "provenance",
        "inputs",
        "interrupts",
        "yamlfile",
    ),
    (
        "attention",
        "splits",
        "datafiles",
        "data",
        "hf_files",
        "hf",
        "hf_text",
        "hf_export",
        "models",
        "metrics",
    ),
    ("loop", "checkpoints", "holdout", "progress", "batches"),
    ("parallel", "compress", "lm"),
    (
        "artifacts",
        "measuring",
        "export_check",
        "export",
        "report",
        "examples",
        "summary",
        "runtimes",
        "deploy_report",
        "deploy_files",
    ),
    ("training", "recipe", "lm_recipe", "optimize", "steps", "deployment"),
    ("keiryo", "cli", "__main__"),
]
# entry points that import on purpose inside a function: `__main__` imports the command under its Ctrl-C
# watch, and the package's `__getattr__` imports the public API on first use (so `import keiryo` is cheap)
LAZY_ALLOWED = {"keiryo", "__main__"}


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "keiryo"


def _rank(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if module in layer or top in layer:
            return i
    raise AssertionError(f"keiryo.{module} is in no layer of tests/test_layers.py: place it there")


def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported keiryo module, inside a function?, line)]."""
    found: dict[str, list[tuple[str, bool, int]]] = {}
    modules = {_name(p) for p in SRC.rglob("*.py")}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        me = _name(path)
        inner_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner_nodes.update(id(n) for n in ast.walk(node) if n is not node)
        edges = []
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "keiryo":
                    targets = [a.name if a.name in modules else "keiryo" for a in node.names]
                elif node.module.startswith("keiryo."):
                    base = node.module[len("keiryo.") :]
                    targets = [
                        f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
                    ]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("keiryo.") :] for a in node.names if a.name.startswith("keiryo.")]
            for t in targets:
                if t != me:
                    edges.append((t, id(node) in inner_nodes, node.lineno))
        found[me] = edges
    return found


IMPORTS = _imports()


def test_every_module_has_a_layer() -> None:
    for module in IMPORTS:
        _rank(module)


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_imports_point_down(module: str) -> None:
    for target, inner, line in IMPORTS[module]:
        if inner and module not in LAZY_ALLOWED:
            raise AssertionError(f"keiryo/{module}:{line} imports keiryo.{target} inside a function")
        assert _rank(target) <= _rank(module), (
            f"keiryo.{module} (layer {_rank(module)}) imports keiryo.{target} "
            f"(layer {_rank(target)}) at line {line}"
        )


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _, _ in edges if t in IMPORTS} for m, edges in IMPORTS.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layer_map_names_real_modules() -> None:
    """A stale name in LAYERS would let a future module of that name skip its check."""
    tops = {m.split(".")[0] for m in IMPORTS} | set(IMPORTS)
    stale = [name for layer in LAYERS for name in layer if name not in tops]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


MAX_PARAMETERS = 6


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    named = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def test_public_functions_take_at_most_six_parameters() -> None:
    """Options beyond six belong in a config dataclass (issue 13): public functions and public methods of
    public classes in keiryo take at most six parameters. The CLI's commands are exempt: a typer command
    declares one parameter per command-line option, and turns them into the API's configs."""
    wide = []
    for path in sorted(SRC.rglob("*.py")):
        if _name(path).split(".")[0] == "cli":
            continue
        tree = ast.parse(path.read_text())
        scopes = [(tree.body, "")] + [
            (node.body, node.name + ".")
            for node in tree.body
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
        ]
        for body, prefix in scopes:
            for fn in body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and not fn.name.startswith("_"):
                    if _parameters(fn) > MAX_PARAMETERS:
                        wide.append(f"{_name(path)}.{prefix}{fn.name} ({_parameters(fn)})")
    assert not wide, "public functions with more than six parameters: " + ", ".join(wide)
