"""The package's layers only point down: no module imports from a layer above its own.

The layers, lowest first (README's layout section draws them). Within a layer, the parts
marked independent do not import each other either (training and evaluation share the core
and inference layers, never each other's modules). Imports are read from the source with
``ast`` (function-local ones too), so the check needs neither torch nor Megatron.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_irl"

# (layer, {part: modules under megatron_irl}, parts independent of each other)
LAYERS = [
    ("foundation", {"cpu_support": ["cpu_support"], "data": ["data"], "loss": ["loss"]}, True),
    ("configuration", {"configuration": ["config", "config_model", "config_schema",
                                         "config_online", "arguments"]}, False),
    ("core", {"core": ["core", "testing"]}, False),
    ("inference", {"inference": ["inference"]}, False),
    ("applications", {"training": ["training"], "evaluation": ["evaluation"],
                      "convert": ["convert"], "planning": ["planning"]}, True),
    # the package's own __init__ (its public names) and __main__ sit on top with the commands
    ("commands", {"commands": ["", "commands", "__main__"]}, False),
]


def _place(module: str) -> tuple[int, str]:
    """(layer index, part) of a dotted module name under megatron_irl."""
    parts = module.split(".")
    assert parts[0] == "megatron_irl", module
    top = parts[1] if len(parts) > 1 else ""
    for index, (_, members, _) in enumerate(LAYERS):
        for part, names in members.items():
            if top in names:
                return index, part
    raise AssertionError(f"megatron_irl.{top} is in no layer of tests/test_layers.py LAYERS")


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, module: str) -> set[str]:
    """The megatron_irl modules (or packages) that ``path`` imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            # ``from megatron_irl import loss`` imports the submodule megatron_irl.loss
            if name == "megatron_irl":
                found.update(f"megatron_irl.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "megatron_irl"}


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer, part = _place(module)
        for target in sorted(_imported(path, module)):
            target_layer, target_part = _place(target)
            if target_layer > layer:
                problems.append(f"{module} ({LAYERS[layer][0]}) imports {target} "
                                f"({LAYERS[target_layer][0]}, a higher layer)")
            elif target_layer == layer and target_part != part and LAYERS[layer][2]:
                problems.append(f"{module} imports {target}: {part} and {target_part} are "
                                f"independent parts of the {LAYERS[layer][0]} layer")
    return problems


def test_no_module_imports_from_a_higher_layer_or_an_independent_peer():
    assert _violations() == []


def test_every_module_of_the_package_is_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        _place(_module_name(path))


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walker finds a function-local upward import: evaluation code that reaches into
    training (an application importing a peer) and core code that reaches into inference."""
    package = tmp_path / "megatron_irl"
    (package / "core").mkdir(parents=True)
    (package / "evaluation").mkdir()
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "evaluation" / "__init__.py").write_text("")
    (package / "core" / "model.py").write_text(
        "def f():\n    from megatron_irl.inference.generation import Generator\n")
    (package / "evaluation" / "loading.py").write_text(
        "from megatron_irl.training import loop\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert _violations() == [
        "megatron_irl.core.model (core) imports megatron_irl.inference.generation "
        "(inference, a higher layer)",
        "megatron_irl.evaluation.loading imports megatron_irl.training: evaluation and "
        "training are independent parts of the applications layer",
    ]


def test_a_module_outside_every_layer_is_reported():
    with pytest.raises(AssertionError, match="in no layer"):
        _place("megatron_irl.nonexistent")


def test_tests_share_helpers_through_tests_helpers_not_through_each_other():
    tests = Path(__file__).resolve().parent
    modules = {path.stem for path in tests.glob("test_*.py")}
    importing = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            importing += [f"{path.name} imports {name}" for name in names if name in modules]
    assert importing == []
