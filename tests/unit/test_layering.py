"""The package's layers, enforced: each module imports only its own layer and the layers below, and no
import (function-level ones included) closes a circle.

    cli, __main__, deltaw/__init__      the command line and the public API
    tools/                              the commands' library calls: SVD, planning, merging, generation, eval
    serve/                              the adapter bank, the engine, the HTTP server
    train/                              data, the loop, checkpoints
    models/                             loading base models, quantized bases, merged export
    adapters/ kinds (lora/, prefix/)    one package per adapter kind; kinds never import each other
    adapters/ (the rest)                the seam every kind plugs into: records, registry, files, targets
    quant/                              NF4
    compat, runtime, flags              transformers internals, allocator settings, dataclass -> flags
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LAYERS = [  # (module prefix, layer), the most specific prefix wins
    ("deltaw.compat", 0), ("deltaw.attention", 0), ("deltaw.runtime", 0), ("deltaw.flags", 0),
    ("deltaw.quant", 1),
    ("deltaw.adapters", 2), ("deltaw.adapters.lora", 3), ("deltaw.adapters.prefix", 3),
    ("deltaw.models", 4),
    ("deltaw.train", 5),
    ("deltaw.serve", 6),
    ("deltaw.tools", 7),
    ("deltaw.cli", 8), ("deltaw.__main__", 8), ("deltaw", 8),
]
KIND_PACKAGES = ("deltaw.adapters.lora", "deltaw.adapters.prefix")
REGISTERS_KINDS = "deltaw.adapters"  # the package __init__ imports the kinds to register them


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Module -> the deltaw modules it imports anywhere in its code (`from a.b import c` may name a module a.b.c)."""
    found: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        name, targets = module_name(path), set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        found[name] = targets
    return {name: {t for t in targets if t in found and t != name} for name, targets in found.items()}


def layer_of(module: str) -> tuple[str, int]:
    prefix, layer = max(((p, n) for p, n in LAYERS if module == p or module.startswith(p + ".")),
                        key=lambda item: len(item[0]))
    return prefix, layer


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, targets in imports().items():
        _, layer = layer_of(module)
        for target in targets:
            if module.startswith(target + "."):
                continue  # a package's own __init__, imported implicitly anyway
            if layer_of(target)[1] > layer and module != REGISTERS_KINDS:
                upward.append(f"{module} (layer {layer}) imports {target} (layer {layer_of(target)[1]})")
    assert not upward, "\n".join(sorted(upward))


def test_adapter_kinds_never_import_each_other():
    crossing = [f"{module} imports {target}" for module, targets in imports().items() for target in targets
                for kind in KIND_PACKAGES if module.startswith(kind + ".") or module == kind
                for other in KIND_PACKAGES if other != kind and (target == other or target.startswith(other + "."))]
    assert not crossing, "\n".join(crossing)


def test_there_are_no_import_cycles():
    graph = {module: {t for t in targets if not module.startswith(t + ".")} for module, targets in imports().items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_every_module_has_a_layer_and_stays_small():
    too_long = []
    for path in SRC.rglob("*.py"):
        assert layer_of(module_name(path)), module_name(path)
        lines = path.read_text().splitlines()
        if len(lines) > 600:
            too_long.append(f"{module_name(path)}: {len(lines)} lines")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                too_long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)
