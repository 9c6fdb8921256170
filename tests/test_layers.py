"""The package's import layers: a module imports only from its own top-level package or module, or from a lower
layer — never upward, never a sibling of its layer. Every import statement counts, at module level or inside a
function (a function-level import is a dependency too; it only runs later).

`KNOWN_VIOLATIONS` lists the imports that break the rule today, each to be removed by issue 19's redesign (the
neutral layer takes the shared plumbing). The test fails on any import not listed, and on a listed one that is gone
(delete it from the list), so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_elastic"

#: Top-level module or package of peft_elastic -> its layer (lower numbers are lower layers).
LAYERS = {
    # neutral plumbing: imports nothing of ours
    "_import_noise": 0,
    "blocks": 0,
    "choices": 0,
    "io": 0,
    "text": 0,
    # PEFT registration, model loading, the toy models: plumbing over plumbing
    "_registry": 1,
    "models": 1,
    "toy": 1,
    # weight formats: sparsity masks, INT4 codes, sharded parameters
    "sparsity": 2,
    "quantization": 2,
    "fsdp": 2,
    # the PEFT tuner types
    "tuners": 3,
    # the search space, what a subnetwork costs, how channels are ordered, what is exported
    "subnetwork": 4,
    "cost": 5,
    "importance": 5,
    "export": 6,
    "compressed": 6,
    # the pipelines
    "training": 7,
    "search": 7,
    # the applications
    "demo": 8,
    "cli": 9,
    "": 10,  # peft_elastic/__init__.py
}

KNOWN_VIOLATIONS = {
    ("peft_elastic.cli", "peft_elastic"),  # the package's lazy names instead of their modules
    ("peft_elastic.demo.__main__", "peft_elastic.cli"),  # demo and cli import each other
    ("peft_elastic.demo.lonas", "peft_elastic"),
    ("peft_elastic.demo.sqft", "peft_elastic"),
    ("peft_elastic.quantization.gptq", "peft_elastic.sparsity.calibration"),  # calibration reading: neutral
    ("peft_elastic.sparsity.sparsify", "peft_elastic.quantization.layers"),  # sparsity and quantization siblings
    ("peft_elastic.tuners.elastic_lora.model", "peft_elastic.compressed"),  # the tuner calls up into exports
    ("peft_elastic.tuners.elastic_lora.model", "peft_elastic.importance"),
    ("peft_elastic.tuners.elastic_lora.model", "peft_elastic.subnetwork"),
}


def module_name(path: Path) -> str:
    parts = ["peft_elastic", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The peft_elastic modules that `path` imports, absolute (`from .x import y` resolved; `y` may be a name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "peft_elastic")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "peft_elastic":
                found.add(target)
    return found


def layer_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYERS, f"{module}: its top-level {top!r} has no layer in LAYERS; add it"
    return top, LAYERS[top]


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        own, own_layer = layer_of(importer)
        for target in imports(path):
            top, layer = layer_of(target)
            if top != own and layer >= own_layer:
                found.add((importer, target))
    return found


def test_no_module_imports_upward_or_sideways_beyond_the_known_ones():
    found = violations()
    new = sorted(found - KNOWN_VIOLATIONS)
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not new, f"imports that go up or sideways a layer (see LAYERS): {new}"
    assert not gone, f"fixed, so delete them from KNOWN_VIOLATIONS: {gone}"


def test_the_checker_sees_function_level_and_relative_imports():
    # the tuners' model imports the search space inside functions: the checker must see it as tuners -> subnetwork
    model = PACKAGE / "tuners" / "elastic_lora" / "model.py"
    assert "peft_elastic.subnetwork" in imports(model)
    assert layer_of("peft_elastic.tuners.elastic_lora.model") == ("tuners", 3)
    assert layer_of("peft_elastic") == ("", 10)
