"""Trainer support for strategies that train several subnetworks per optimizer step (sandwich) and for evaluating
several subnetworks: `ElasticTrainerMixin`, and `ElasticTrainer` / `ElasticSFTTrainer` built with it.

With a `SubnetworkSamplingCallback` whose sampler gives several subnetworks per step, `training_step` runs one
forward/backward pass per subnetwork on the same micro-batch; the gradients add up in `.grad` (the sandwich rule's
sum). Under DDP only the last pass of a step's last micro-batch synchronises gradients. Each pass is an ordinary
`training_step`, so gradient accumulation, loss scaling and gradient checkpointing (reentrant or not: the
subnetwork is fixed before each pass and not changed until its backward is done) behave as for a single pass.
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import Trainer
from trl import SFTTrainer

from ..subnetwork import get_subnetwork, set_subnetwork
from .callback import SubnetworkSamplingCallback
from .qa_monitor import QuantizationAwareCallback, has_quantization_aware_layers


class ElasticTrainerMixin:
    """Add to a `transformers.Trainer` subclass (before it in the bases) for multi-pass sampling strategies and for
    `eval_subnetworks`. The logged training loss of a multi-pass step is the mean over its subnetworks."""

    def _sampling_callback(self) -> SubnetworkSamplingCallback | None:
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SubnetworkSamplingCallback)]
        if len(callbacks) > 1:
            raise ValueError(
                f"{len(callbacks)} SubnetworkSamplingCallbacks are registered with this trainer; use one (it decides "
                "the subnetwork of every step)."
            )
        return callbacks[0] if callbacks else None

    def _attach_sampling_callback(self) -> None:
        callback = self._sampling_callback()
        if callback is not None:
            callback.attach(self)

    def _refuse_unsharded_fsdp(self) -> None:
        """FSDP asked for (the `fsdp` arguments, or an accelerate config's) that accelerate does not run: say so rather
        than train a whole replica per process. Accelerate turns FSDP on only for GPU-type devices; on CPU the job
        silently becomes DDP (measured: `DistributedType.MULTI_CPU`, the model in `DistributedDataParallel`)."""
        from_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if not (self.args.fsdp or from_env) or getattr(self, "is_fsdp_enabled", False):
            return
        asked = "fsdp=" + repr(self.args.fsdp) if self.args.fsdp else "ACCELERATE_USE_FSDP=true, an accelerate config"
        kind = self.accelerator.state.distributed_type
        raise ValueError(
            f"FSDP was requested ({asked}) but accelerate runs this job as {kind.value}, without FSDP: accelerate "
            "shards only on GPU-type devices (CUDA, XPU, NPU, HPU, ...), so every process would hold a whole "
            "replica. On CPU, shard with peft_elastic.fsdp.shard_model in a torch training loop (examples/fsdp.py), "
            "or drop the fsdp arguments to train with DDP."
        )

    def train(self, *args, **kwargs):
        self._refuse_unsharded_fsdp()
        self._attach_sampling_callback()
        callbacks = self.callback_handler.callbacks
        if has_quantization_aware_layers(self.model) and not any(
            isinstance(cb, QuantizationAwareCallback) for cb in callbacks
        ):
            self.add_callback(QuantizationAwareCallback())
        return super().train(*args, **kwargs)

    def _load_callback_state(self, *args, **kwargs):
        # With `restore_callback_states_from_checkpoint=True` the Trainer replaces the callbacks by new instances.
        result = super()._load_callback_state(*args, **kwargs)
        self._attach_sampling_callback()
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        callback = self._sampling_callback()
        subnetworks = callback.current if callback is not None else []
        if len(subnetworks) <= 1:
            return super().training_step(model, inputs, num_items_in_batch)
        syncs = self.accelerator.sync_gradients  # False inside gradient accumulation: already under no_sync
        losses = []
        for i, subnetwork in enumerate(subnetworks):
            set_subnetwork(self.model, subnetwork, callback.adapter_name)
            last = i == len(subnetworks) - 1
            context = self.accelerator.no_sync(model) if syncs and not last else contextlib.nullcontext()
            with context:
                # a shallow copy: compute_loss may pop keys (e.g. labels) from the dict it gets
                losses.append(super().training_step(model, dict(inputs), num_items_in_batch))
        return torch.stack(losses).mean()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        callback = self._sampling_callback()
        if callback is None or callback.model is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        previous = get_subnetwork(callback.model, callback.adapter_name)
        try:
            callback.activate(callback._eval)
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            for name in callback.eval_subnetworks:
                prefix = f"{metric_key_prefix}_{name}"
                if callback.activate(name) == callback._eval:  # the main evaluation already measured it
                    start = f"{metric_key_prefix}_"
                    extra = {f"{prefix}_{k[len(start) :]}": v for k, v in metrics.items() if k.startswith(start)}
                    self.log(extra)
                else:
                    extra = super().evaluate(eval_dataset, ignore_keys, prefix)
                metrics.update(extra)
            return metrics
        finally:
            set_subnetwork(callback.model, previous, callback.adapter_name)

    def log(self, logs, *args, **kwargs):
        callback = self._sampling_callback()
        if callback is not None and "loss" in logs and "subnetwork_params" not in logs:
            logs.update(callback.log_fields())
        return super().log(logs, *args, **kwargs)


class ElasticTrainer(ElasticTrainerMixin, Trainer):
    """`transformers.Trainer` with support for multi-pass sampling strategies (sandwich) and `eval_subnetworks`."""


class ElasticSFTTrainer(ElasticTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with support for multi-pass sampling strategies (sandwich) and `eval_subnetworks`."""
