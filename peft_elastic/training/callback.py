"""`SubnetworkSamplingCallback`: super-network training with the transformers `Trainer` and TRL's `SFTTrainer`.

The callback activates a subnetwork at the start of every optimizer step (before its first micro-batch; the same for
all gradient-accumulation micro-batches), switches to the evaluation subnetwork after each step (so evaluations and
checkpoints see it) and at the end of training, adds the active adapter size to the logs, and saves what a resumed
run needs in the trainer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..subnetwork import get_subnetwork, num_adapter_parameters, parameters_per_rank, set_subnetwork
from .samplers import NAMED_SUBNETWORKS, SAMPLER_CLASSES, SubnetworkSampler, make_sampler, named_subnetwork

MULTI_PASS_HELP = (
    "use peft_elastic.training.ElasticSFTTrainer (TRL) or ElasticTrainer (transformers) instead of SFTTrainer / "
    "Trainer, or add peft_elastic.training.ElasticTrainerMixin to your own trainer class"
)


class SubnetworkSamplingCallback(TrainerCallback, ExportableState):
    """Trains an elastic adapter as a super-network: a (new) subnetwork per optimizer step.

    Args:
        strategy: "random", "sandwich", "random_linear", "grid_params" or "fixed" (see
            `peft_elastic.training.samplers`), or a `SubnetworkSampler` instance.
        seed: the subnetwork of optimizer step `t` depends only on `(seed, t)`: the same on every DDP rank, and a
            resumed run continues the same sequence.
        eval_subnetwork: the subnetwork evaluations, checkpoints and the final model use: "maximal" (default),
            "heuristic", "minimal" or a dict `{group name: choice}` (groups it does not name: maximal). Its metrics
            are reported as usual (`eval_loss`).
        eval_subnetworks: further subnetworks to evaluate at each evaluation, by name (e.g.
            `("maximal", "heuristic", "minimal")`); their metrics get the name in their prefix (`eval_minimal_loss`).
            Needs `ElasticTrainer` / `ElasticSFTTrainer`.
        adapter_name: the elastic adapter to train (default: the active one).
        num_random: for "sandwich", the random subnetworks between the maximal and the minimal one (default 1).
        subnetwork: for "fixed", the subnetwork to train (default "maximal").
        bins, candidates, max_tries: for "grid_params" (defaults 10, 10, 200 · bins · candidates).

    Logged with the training loss: `subnetwork_params`, the mean number of active adapter parameters over the
    optimizer steps since the previous log (over all passes of a sandwich step), and `subnetwork_params_ratio`, that
    number over the maximal subnetwork's.
    """

    def __init__(
        self,
        strategy: str | SubnetworkSampler = "random",
        seed: int = 0,
        *,
        eval_subnetwork: str | Mapping[str, int] = "maximal",
        eval_subnetworks: Sequence[str] = (),
        adapter_name: str | None = None,
        **sampler_options: Any,
    ) -> None:
        if isinstance(strategy, SubnetworkSampler):
            if sampler_options:
                raise ValueError(
                    f"Sampler options {sorted(sampler_options)} were given with a sampler instance; configure the "
                    "instance instead."
                )
            self.sampler = strategy
        elif isinstance(strategy, str):
            self.sampler = make_sampler(strategy, seed, **sampler_options)
        else:
            raise ValueError(
                f"strategy must be one of {sorted(SAMPLER_CLASSES)} or a SubnetworkSampler, got {strategy!r}."
            )
        self.strategy = self.sampler.name
        self.seed = self.sampler.seed
        self.sampler_options = dict(sampler_options)
        if not isinstance(eval_subnetwork, (str, Mapping)) or (
            isinstance(eval_subnetwork, str) and eval_subnetwork not in NAMED_SUBNETWORKS
        ):
            raise ValueError(
                f"eval_subnetwork must be one of {list(NAMED_SUBNETWORKS)} or a dict {{group name: choice}}, "
                f"got {eval_subnetwork!r}."
            )
        if isinstance(eval_subnetworks, str):
            eval_subnetworks = (eval_subnetworks,)
        unknown = [name for name in eval_subnetworks if name not in NAMED_SUBNETWORKS]
        if unknown:
            raise ValueError(f"eval_subnetworks may only name {list(NAMED_SUBNETWORKS)}; unknown: {unknown}.")
        self.eval_subnetwork = eval_subnetwork
        self.eval_subnetworks = tuple(eval_subnetworks)
        self.adapter_name = adapter_name
        self.model: nn.Module | None = None
        self.current: list[dict[str, int]] = []
        self._trainer = None  # set by ElasticTrainerMixin
        self._logged_params: list[int] = []

    # ---------------------------------------------------------------------------------------------------- helpers

    def attach(self, trainer) -> None:
        """Called by `ElasticTrainerMixin`: the trainer runs several passes per step and extra evaluations."""
        self._trainer = trainer

    def activate(self, subnetwork: str | Mapping[str, int]) -> dict[str, int]:
        """Make `subnetwork` (a name or a dict) the active one of the trained model; return it as a dict."""
        chosen = named_subnetwork(self.model, subnetwork, self.adapter_name)
        set_subnetwork(self.model, chosen, self.adapter_name)
        return chosen

    def _params(self, subnetwork: Mapping[str, int]) -> int:
        if self._widths:  # Mode B: the widths change the adapters' sizes too
            return num_adapter_parameters(self.model, subnetwork, self.adapter_name)
        return self._bias_params + sum(self._costs[name] * rank for name, rank in subnetwork.items())

    # -------------------------------------------------------------------------------------------------- callbacks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SubnetworkSamplingCallback needs the trainer's model; none was passed to the callback.")
        try:
            get_subnetwork(model, self.adapter_name)
        except ValueError as error:
            raise ValueError(
                f"SubnetworkSamplingCallback(strategy={self.strategy!r}) needs a model with an elastic adapter "
                f"(ElasticLoraConfig, NLSConfig or SparsePEFTConfig): {error}"
            ) from None
        self.model = model
        if self.sampler.passes > 1 and self._trainer is None:
            raise ValueError(
                f"strategy={self.strategy!r} trains {self.sampler.passes} subnetworks per optimizer step, which the "
                f"plain Trainer cannot do: {MULTI_PASS_HELP}."
            )
        if self.eval_subnetworks and self._trainer is None:
            raise ValueError(
                f"eval_subnetworks={list(self.eval_subnetworks)} needs extra evaluations: {MULTI_PASS_HELP}."
            )
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, list):  # several instances of this callback: not ours to pick from
            saved = None
        sampler_state = (saved or {}).get("attributes", {}).get("sampler_state")
        self.sampler.setup(model, self.adapter_name, state=sampler_state)
        self._costs = parameters_per_rank(model, self.adapter_name)
        maximal = self.sampler.maximal
        self._widths = bool(set(maximal) - set(self._costs))
        self._bias_params = num_adapter_parameters(model, maximal, self.adapter_name) - sum(
            self._costs[name] * rank for name, rank in maximal.items() if name in self._costs
        )
        self._max_params = self._params(maximal)
        self._eval = dict(self.sampler.maximal)  # groups a dict does not name use their maximal rank
        self._eval.update(named_subnetwork(model, self.eval_subnetwork, self.adapter_name))
        self._logged_params = []

    def on_step_begin(self, args, state, control, **kwargs):
        # Called before the first micro-batch of each optimizer step; `global_step` only moves after the optimizer
        # step, so every micro-batch of one step (and every DDP rank) gets the same subnetworks.
        self.current = self.sampler.sample(state.global_step, state.max_steps)
        set_subnetwork(self.model, self.current[0], self.adapter_name)

    def on_step_end(self, args, state, control, **kwargs):
        self._logged_params.append(sum(self._params(s) for s in self.current) / len(self.current))
        # Evaluations and checkpoints that follow this step see the evaluation subnetwork.
        set_subnetwork(self.model, self._eval, self.adapter_name)

    def on_train_end(self, args, state, control, **kwargs):
        if self.model is not None:
            set_subnetwork(self.model, self._eval, self.adapter_name)

    def log_fields(self) -> dict[str, float]:
        """The subnetwork size fields of the next training log (empty if no step was made since the last one)."""
        if not self._logged_params:
            return {}
        mean = sum(self._logged_params) / len(self._logged_params)
        self._logged_params = []
        return {"subnetwork_params": round(mean, 1), "subnetwork_params_ratio": round(mean / self._max_params, 4)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or "subnetwork_params" in logs:
            return
        fields = self.log_fields()
        logs.update(fields)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(fields)

    # ------------------------------------------------------------------------------------------ ExportableState

    def state(self) -> dict:
        return {
            "args": {
                "strategy": self.strategy,
                "seed": self.seed,
                "eval_subnetwork": self.eval_subnetwork,
                "eval_subnetworks": list(self.eval_subnetworks),
                "adapter_name": self.adapter_name,
                **self.sampler_options,
            },
            "attributes": {"sampler_state": self.sampler.state()},
        }

    @classmethod
    def from_state(cls, state):
        # transformers calls this with `restore_callback_states_from_checkpoint=True`; the sampler state (e.g. the
        # grid of "grid_params") is read back from the trainer state in `on_train_begin` in any case.
        return cls(**state["args"])

    def __repr__(self) -> str:
        return f"SubnetworkSamplingCallback({self.sampler!r}, eval_subnetwork={self.eval_subnetwork!r})"
