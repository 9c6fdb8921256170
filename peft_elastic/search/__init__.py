"""Search for Pareto-optimal subnetworks of a trained super-network: `run_search` with interchangeable strategies
(heuristic, random, hill-climbing, NSGA-II, multi-objective TPE) on optuna, evaluators, and `SearchResult`.
Needs the `search` extra (optuna, matplotlib)."""

from ..choices import SEARCH_COSTS, SEARCH_STRATEGIES
from .evaluators import ExactMatchEvaluator, LossEvaluator, extract_answer
from .harness import LMEvalEvaluator
from .latency import RelativeLatency
from .result import SearchResult
from .run import run_search
from .strategies import STRATEGY_CLASSES, SearchStrategy, Stop

__all__ = [
    "SEARCH_COSTS",
    "SEARCH_STRATEGIES",
    "STRATEGY_CLASSES",
    "SearchStrategy",
    "Stop",
    "ExactMatchEvaluator",
    "LMEvalEvaluator",
    "LossEvaluator",
    "RelativeLatency",
    "SearchResult",
    "extract_answer",
    "run_search",
]
