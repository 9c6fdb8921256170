"""peft_elastic: elastic low-rank adapters for PEFT.

Importing this package makes PEFT know its tuner types (idempotently), so that `get_peft_model`,
`PeftModel.from_pretrained` and transformers' `model.load_adapter` accept them: at once if PEFT is imported already,
else the moment PEFT is. Import it before loading an elastic checkpoint. The package itself imports lazily: torch,
PEFT and transformers load with the first name used from it, and TRL, bitsandbytes and gptqmodel only where used.
"""

import importlib
import importlib.util

from ._registry import register_when_peft_imports

__version__ = "0.1.0"

#: Each public name and the module that defines it, imported on first use (PEP 562): `import peft_elastic` loads
#: neither torch nor PEFT, and a command-line `--help` stays fast.
_EXPORTS = {
    "export_compressed_model": ".compressed",
    "load_compressed_model": ".compressed",
    **dict.fromkeys(
        ("Cost", "CostModel", "Latency", "count_macs", "count_parameters", "measure_latency", "subnetwork_cost"),
        ".cost",
    ),
    "export_sub_adapter": ".export",
    "sub_adapter_state": ".export",
    "export_merged_model": ".merged",
    "apply_importance_order": ".importance",
    "reorder_by_importance": ".importance",
    "load_causal_lm": ".models",
    "resolve_model": ".models",
    **dict.fromkeys(("QuantizationReport", "load_sparsity_mask", "quantize_gptq"), ".quantization"),
    **dict.fromkeys(("SparsityReport", "measure_sparsity", "save_sparsified", "sparsify"), ".sparsity"),
    **dict.fromkeys(
        (
            "SearchSpace",
            "get_subnetwork",
            "heuristic_subnetwork",
            "maximal_subnetwork",
            "minimal_subnetwork",
            "module_ranks",
            "module_widths",
            "num_adapter_parameters",
            "parameters_per_rank",
            "sample_subnetwork",
            "search_space",
            "set_subnetwork",
        ),
        ".subnetwork",
    ),
    "ElasticLoraConfig": ".tuners.elastic_lora",
    "ElasticLoraModel": ".tuners.elastic_lora",
    "NLSConfig": ".tuners.nls",
    "SparsePEFTConfig": ".tuners.sparse_peft",
    "SparsePEFTModel": ".tuners.sparse_peft",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule not imported yet
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# PEFT learns the tuner types when it is imported (now, if it already is): `PeftModel.from_pretrained` and
# transformers' `load_adapter` then read elastic checkpoints, as when importing this package imported everything.
register_when_peft_imports()

__all__ = [
    "Cost",
    "CostModel",
    "Latency",
    "apply_importance_order",
    "count_macs",
    "count_parameters",
    "measure_latency",
    "subnetwork_cost",
    "ElasticLoraConfig",
    "ElasticLoraModel",
    "NLSConfig",
    "QuantizationReport",
    "SearchSpace",
    "SparsePEFTConfig",
    "SparsePEFTModel",
    "SparsityReport",
    "export_compressed_model",
    "export_merged_model",
    "export_sub_adapter",
    "get_subnetwork",
    "heuristic_subnetwork",
    "load_causal_lm",
    "load_compressed_model",
    "load_sparsity_mask",
    "maximal_subnetwork",
    "measure_sparsity",
    "minimal_subnetwork",
    "module_ranks",
    "module_widths",
    "num_adapter_parameters",
    "parameters_per_rank",
    "quantize_gptq",
    "reorder_by_importance",
    "resolve_model",
    "sample_subnetwork",
    "save_sparsified",
    "search_space",
    "set_subnetwork",
    "sparsify",
    "sub_adapter_state",
]
