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
    "calibration": 0,
    "checks": 0,
    "scratch": 0,
    "choices": 0,
    "atomic_folders": 0,
    # PEFT registration, model loading, the toy models, real text: plumbing over plumbing
    "_registry": 1,
    "models": 1,
    "text": 1,
    "toy": 1,
    # weight formats: INT4 codes and bit-packed masks, sharded parameters
    "quantization": 2,
    "fsdp": 2,
    # pruning, which reads GPTQ codes to measure the zeros of a quantized model
    "sparsity": 3,
    # the PEFT tuner types
    "tuners": 4,
    # the search space, what a subnetwork costs, how channels are ordered, what is exported
    "subnetwork": 5,
    "cost": 6,
    "importance": 6,
    "export": 7,
    "compressed": 7,
    "merged": 7,
    # the pipelines
    "training": 8,
    "search": 8,
    # the applications
    "demo": 9,
    "cli": 10,
    "": 11,  # peft_elastic/__init__.py
}

KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # none left: a new one must be fixed, not listed


def module_name(path: Path) -> str:
    parts = ["peft_elastic", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path: Path, text: str | None = None):
    """`(module, node)` for each import statement of `path` (or of `text`, as if it were that file), with the
    module it imports from made absolute (`from .x import y` resolved; for `import a.b`, `a.b`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base), node
            else:
                yield node.module or "", node


def imports(path: Path) -> set[str]:
    """The peft_elastic modules that `path` imports, absolute (`from .x import y` resolved; `y` may be a name)."""
    return {target for target, _ in import_statements(path) if target.split(".")[0] == "peft_elastic"}


def layer_of(module: str) -> tuple[str, int]:
    if module.endswith(".__main__"):  # `python -m ...`: a program over the package, which nothing imports
        return "", LAYERS[""]
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
    # the tuners' model imports its GPTQ layer inside _check_merge_allowed (a function-level, relative import) and
    # the compressed model at the top (relative, from its own package): the checker must see both
    model = PACKAGE / "tuners" / "elastic_lora" / "model.py"
    assert {"peft_elastic.tuners.elastic_lora.gptq", "peft_elastic.tuners.elastic_lora.narrowed"} <= imports(model)
    assert layer_of("peft_elastic.tuners.elastic_lora.model") == ("tuners", 4)
    assert layer_of("peft_elastic") == ("", 11)
    assert layer_of("peft_elastic.demo.__main__") == ("", 11)  # `python -m peft_elastic.demo` runs the CLI


def private_imports(path: Path, text: str | None = None) -> set[tuple[str, str]]:
    """`(module, name)` for each private name (`_x`, not dunder) that `path` (or `text`, as if it were that file)
    imports from another peft_elastic module (`from .x import _y`; a private module itself, such as `_registry`, may
    be imported)."""
    found = set()
    for target, node in import_statements(path, text):
        if isinstance(node, ast.ImportFrom) and target.split(".")[0] == "peft_elastic" and target != module_name(path):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            found.update((target, n) for n in private if f"{target}.{n}" not in MODULES)
    return found


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_private_name_of_another():
    found = {module_name(path): private_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}
    assert not {importer: names for importer, names in found.items() if names}


def test_the_private_name_check_sees_a_relative_import():
    probe = PACKAGE / "tuners" / "elastic_lora" / "model.py"
    text = probe.read_text() + "\nfrom .space import _whole\nfrom ... import _registry\n"
    assert private_imports(probe, text) == {("peft_elastic.tuners.elastic_lora.space", "_whole")}
