"""`import peft_elastic` is lazy, and PEFT still learns our tuner types however the user's imports are ordered.

Each case runs in a fresh interpreter: what a process has imported cannot be undone in this one.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import peft_elastic

OUR_TYPES = ["ELASTIC_LORA", "NLS", "SPARSE_PEFT"]

REGISTERED = """
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
registered = {t.value: (PEFT_TYPE_TO_CONFIG_MAPPING[t].__name__, PEFT_TYPE_TO_TUNER_MAPPING[t].__name__)
              for t in PEFT_TYPE_TO_CONFIG_MAPPING if t.value in OUR_TYPES}
print(json.dumps(registered, sort_keys=True))
""".replace("OUR_TYPES", repr(OUR_TYPES))

EXPECTED = {
    "ELASTIC_LORA": ["ElasticLoraConfig", "ElasticLoraModel"],
    "NLS": ["NLSConfig", "ElasticLoraModel"],
    "SPARSE_PEFT": ["SparsePEFTConfig", "SparsePEFTModel"],
}


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import json, os, sys\n" + code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_loads_no_torch_peft_or_optional_backend_and_leaves_the_environment():
    printed = run_python(
        "before = dict(os.environ)\n"
        "import peft_elastic\n"
        "heavy = ['torch', 'peft', 'transformers', 'trl', 'bitsandbytes', 'gptqmodel', 'torchao', 'datasets']\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(json.dumps({'loaded': [m for m in heavy if m in sys.modules], 'changed': changed}))"
    )
    assert json.loads(printed) == {"loaded": [], "changed": []}


@pytest.mark.parametrize(
    "imports",
    [
        "import peft_elastic; import peft",  # PEFT after us: registered when it is imported
        "import peft; import peft_elastic",  # PEFT before us: registered at once
        "import peft_elastic; from transformers import AutoModelForCausalLM; from peft import PeftModel",
        "from peft_elastic import ElasticLoraConfig",  # a name of ours first
    ],
)
def test_peft_knows_our_types_whatever_the_import_order(imports):
    assert json.loads(run_python(imports + "\n" + REGISTERED)) == EXPECTED


def test_every_module_imported_first_leaves_peft_knowing_our_types():
    """The registration runs inside whichever import first brings PEFT in: no module may make it circular."""
    names = sorted(f"peft_elastic.{m.name}" for m in pkgutil.iter_modules(peft_elastic.__path__))
    assert {"peft_elastic.tuners", "peft_elastic.cli", "peft_elastic.training", "peft_elastic.cost"} <= set(names)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = pool.map(lambda name: run_python(f"import {name}\n{REGISTERED}"), names)
        printed = dict(zip(names, outputs, strict=True))
    wrong = {name: out for name, out in printed.items() if json.loads(out) != EXPECTED}
    assert not wrong, wrong


def test_every_public_name_resolves_and_is_listed():
    printed = run_python(
        "import peft_elastic\n"
        "missing = [n for n in peft_elastic.__all__ if getattr(peft_elastic, n, None) is None]\n"
        "print(json.dumps({'missing': missing, 'listed': sorted(set(peft_elastic.__all__) - set(dir(peft_elastic)))}))"
    )
    assert json.loads(printed) == {"missing": [], "listed": []}
    assert set(peft_elastic.__all__) == set(peft_elastic._EXPORTS)


def test_an_unknown_name_is_an_attribute_error_that_names_it():
    with pytest.raises(AttributeError, match="'peft_elastic' has no attribute 'ElasticLoRAConfig'"):
        peft_elastic.ElasticLoRAConfig  # noqa: B018 - the attribute access is the test


COMMANDS = ["sparsify", "quantize", "export", "search", "eval", "train", "demo"]


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_cli_help_loads_no_torch_peft_or_trl(command):
    printed = run_python(
        "from peft_elastic.cli import main\n"
        f"try:\n    main({command + ['--help']!r})\nexcept SystemExit as done:\n    code = done.code\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in ('torch', 'peft', 'transformers', 'trl') "
        "if m in sys.modules]}))"
    )
    assert json.loads(printed) == {"code": 0, "loaded": []}


def test_the_cli_choices_are_the_names_the_library_implements():
    from peft_elastic.choices import SAMPLERS, SEARCH_COSTS, SEARCH_STRATEGIES
    from peft_elastic.search import SEARCH_COSTS as COSTS
    from peft_elastic.search import SEARCH_STRATEGIES as STRATEGIES
    from peft_elastic.search import STRATEGY_CLASSES
    from peft_elastic.training import SAMPLER_CLASSES

    assert SEARCH_STRATEGIES == STRATEGIES == ("heuristic", "random", "nsga2", "tpe", "hill_climb")
    assert tuple(STRATEGY_CLASSES) == SEARCH_STRATEGIES  # one strategy object per name, in the same order
    assert SEARCH_COSTS == COSTS == ("params", "macs", "latency", "adapter_params")
    assert SAMPLERS == tuple(sorted(SAMPLER_CLASSES))
    assert SAMPLERS == ("fixed", "grid_params", "random", "random_linear", "sandwich")
