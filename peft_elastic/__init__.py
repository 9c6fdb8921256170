"""peft_elastic: elastic low-rank adapters for PEFT.

Importing this package registers its tuner types with PEFT (idempotently), so that `get_peft_model`,
`PeftModel.from_pretrained` and transformers' `model.load_adapter` accept them. Import it before loading an elastic
checkpoint.
"""

from ._import_noise import quiet_import_noise

with quiet_import_noise():  # what PEFT's optional back-ends log when imported on a CPU machine
    from ._registry import register_tuner
    from .compressed import export_compressed_model, load_compressed_model
    from .cost import Cost, CostModel, Latency, count_macs, count_parameters, measure_latency, subnetwork_cost
    from .export import export_sub_adapter, sub_adapter_state
    from .importance import apply_importance_order, reorder_by_importance
    from .models import load_causal_lm, resolve_model
    from .quantization import QuantizationReport, load_sparsity_mask, quantize_gptq
    from .sparsity import SparsityReport, measure_sparsity, save_sparsified, sparsify
    from .subnetwork import (
        get_subnetwork,
        heuristic_subnetwork,
        maximal_subnetwork,
        minimal_subnetwork,
        module_ranks,
        module_widths,
        num_adapter_parameters,
        parameters_per_rank,
        sample_subnetwork,
        search_space,
        set_subnetwork,
    )
    from .tuners.elastic_lora import ElasticLoraConfig, ElasticLoraModel
    from .tuners.nls import NLSConfig
    from .tuners.sparse_peft import SparsePEFTConfig, SparsePEFTModel

__version__ = "0.1.0"

register_tuner("elastic_lora", ElasticLoraConfig, ElasticLoraModel)
register_tuner("nls", NLSConfig, ElasticLoraModel)  # a preset: same tuner, its own PEFT type
register_tuner("sparse_peft", SparsePEFTConfig, SparsePEFTModel)

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
    "SparsePEFTConfig",
    "SparsePEFTModel",
    "SparsityReport",
    "export_compressed_model",
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
