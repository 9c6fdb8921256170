"""The names a user picks from — search strategies, search costs, training samplers — in a module that imports
nothing, so that the command line lists them (`--help`, argparse's `choices`) without loading torch. The modules that
implement them take their names from here (`peft_elastic.search`, `peft_elastic.training.samplers`)."""

#: `run_search(strategy=...)`, `peft-elastic search --strategy`.
SEARCH_STRATEGIES = ("heuristic", "random", "nsga2", "tpe", "hill_climb")

#: `run_search(cost=...)` besides a callable, `peft-elastic search --cost`.
SEARCH_COSTS = ("params", "macs", "latency", "adapter_params")

#: `SubnetworkSamplingCallback(strategy=...)`, `peft-elastic train --sampler`: one `SubnetworkSampler` class each.
SAMPLERS = ("fixed", "grid_params", "random", "random_linear", "sandwich")
