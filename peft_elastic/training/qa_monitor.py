"""`QuantizationAwareCallback`: logs how many INT codes a QA-SparsePEFT adapter changes, and warns when it changes
almost none — the adapter is then rounded away (`|ΔW / S| < ½` nearly everywhere) and the merge gives back the base.

`ElasticTrainer` / `ElasticSFTTrainer` add it by themselves when the model has QA-SparsePEFT layers; with a plain
`Trainer` / `SFTTrainer`, pass it in `callbacks=[QuantizationAwareCallback()]`.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from ..checks import check_int
from ..tuners.sparse_peft.monitor import QA_LEARNING_RATE, codes_changed

#: Below this fraction of changed codes at the check step the run is warned. The learning rates measured on
#: SmolLM2-135M and the demo's base (docs/quantization.md) give < 0.01 % when the loss stays flat and > 1 % when it
#: falls.
MIN_FRACTION = 1e-4


def has_quantization_aware_layers(model) -> bool:
    from ..tuners.sparse_peft.gptq import is_quant_aware_layer

    return any(is_quant_aware_layer(module) for module in model.modules())


class QuantizationAwareCallback(TrainerCallback):
    """Adds `qa_codes_changed` (the fraction of the adapted INT weights whose code the merge would change) to every
    log, and warns once, at the first log at or after `check_fraction` of the run's steps (but not before step 10, or
    the end of a shorter run; or at `check_step`), when that fraction is below `min_fraction`: the learning rate is
    then too small for the update to reach half a quantization step in this run.

    Args:
        min_fraction: warn below this fraction of changed codes (default 1e-4).
        check_fraction: when to check, as a fraction of the run's optimizer steps (default 0.2).
        check_step: check at this step instead (an int ≥ 1).
    """

    def __init__(
        self, min_fraction: float = MIN_FRACTION, check_fraction: float = 0.2, check_step: int | None = None
    ) -> None:
        if not 0 <= min_fraction < 1:
            raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction!r}.")
        if not 0 < check_fraction <= 1:
            raise ValueError(f"check_fraction must be in (0, 1], got {check_fraction!r}.")
        check_int("check_step", check_step, optional=True, valid="an int >= 1 or None")
        self.min_fraction, self.check_fraction, self.check_step = min_fraction, check_fraction, check_step
        self.model = None
        self.checked = False
        self.last = None  # the CodeChanges of the last log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not has_quantization_aware_layers(model):
            raise ValueError(
                "QuantizationAwareCallback needs a model with QA-SparsePEFT layers (SparsePEFTConfig(..., "
                f"quantization_aware=True) on a GPTQ base); got {type(model).__name__}. Remove the callback."
            )
        self.model, self.checked = model, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.model is None or logs is None or "loss" not in logs:
            return
        self.last = codes_changed(self.model)
        logs["qa_codes_changed"] = self.last.fraction
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1]["qa_codes_changed"] = self.last.fraction
        # not before step 10 (or the end of a shorter run): the first steps of any run change few codes
        check_at = self.check_step or max(min(10, state.max_steps), round(self.check_fraction * state.max_steps))
        if not self.checked and state.global_step >= check_at:
            self.checked = True
            if self.last.fraction < self.min_fraction:
                warnings.warn(
                    f"QA-SparsePEFT: after {state.global_step} of {state.max_steps} steps at learning rate "
                    f"{args.learning_rate:g}, its merge would leave the base nearly as it is — {self.last}, below "
                    f"{self.min_fraction:.2%}. The adapter's update is under half a quantization step almost "
                    "everywhere, so it is rounded away and the merged INT model is the base. Use a larger learning "
                    f"rate (about {QA_LEARNING_RATE:g} with AdamW on INT4; see docs/quantization.md) or more steps.",
                    stacklevel=2,
                )
