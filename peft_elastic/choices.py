"""The names a user picks from — search strategies, search costs, training samplers, pruning methods, GPTQ bit
widths, tuners — in a module that imports nothing, so that the command line lists them (`--help`, argparse's
`choices`) without loading torch. The modules that implement them take their names from here (`peft_elastic.search`,
`peft_elastic.training.samplers`, `peft_elastic.sparsity`, `peft_elastic.quantization`)."""

#: `run_search(strategy=...)`, `peft-elastic search --strategy`.
SEARCH_STRATEGIES = ("heuristic", "random", "nsga2", "tpe", "hill_climb")

#: `run_search(cost=...)` besides a callable, `peft-elastic search --cost`.
SEARCH_COSTS = ("params", "macs", "latency", "adapter_params")

#: `SubnetworkSamplingCallback(strategy=...)`, `peft-elastic train --sampler`: one `SubnetworkSampler` class each.
SAMPLERS = ("fixed", "grid_params", "random", "random_linear", "sandwich")

#: `sparsify(method=...)`, `peft-elastic sparsify --method`.
PRUNING_METHODS = ("wanda", "magnitude")

#: The bit widths of the GPTQ layers we quantize to, read and merge into (`quantize_gptq(bits=...)`,
#: `peft-elastic quantize --bits`): the widths whose codes fill 32-bit words exactly.
GPTQ_BITS = (2, 4, 8)

#: `peft-elastic train --method`: NLS (Shears), ElasticLoRA (Mode A/B), SparsePEFT (SQFT).
TUNERS = ("nls", "elastic-lora", "sparse-peft")
