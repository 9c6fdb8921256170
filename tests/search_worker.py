"""A search run in its own process, killed by `test_search.py` in the middle of a trial: its evaluator hangs at the
`hang_at`-th evaluation. Usage: python search_worker.py STORAGE N_TRIALS HANG_AT"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_search import Synthetic, adapter_params, super_network  # noqa: E402

from peft_elastic.search import run_search  # noqa: E402


def main() -> None:
    storage, n_trials, hang_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = super_network()
    synthetic = Synthetic(model)

    def evaluate(m):
        if synthetic.calls + 1 == hang_at:
            time.sleep(600)  # the test kills the process here, mid-trial
        return synthetic(m)

    evaluate.direction = "minimize"
    run_search(model, evaluate, "nsga2", adapter_params, n_trials=n_trials, seed=0, storage=storage, progress=False)


if __name__ == "__main__":
    main()
