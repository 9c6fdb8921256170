"""QA-SparsePEFT's threshold made visible: `codes_changed` counts what the merge writes, and
`QuantizationAwareCallback` logs it and warns when a learning rate leaves the adapter under half a step.

Oracle for the count: the codes of the merged checkpoint itself (`merge_and_unload`) compared with the base's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from gptq_fixtures import TEXTS, load_gptq
from peft import get_peft_model
from test_qa_sparse_peft import TARGETS, gptq_state, qa_config, randomize_adapters
from trl import SFTConfig, SFTTrainer

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.quantization.packing import unpack_rows
from peft_elastic.training import ElasticSFTTrainer, QuantizationAwareCallback, SubnetworkSamplingCallback
from peft_elastic.tuners.sparse_peft.gptq import is_quant_aware_layer, quant_grid, transposed_mask
from peft_elastic.tuners.sparse_peft.monitor import CodeChanges, codes_changed


def merged_difference(model) -> tuple[int, int]:
    """(codes that differ, codes) of the adapted layers between the base and `merge_and_unload()` of `model`, from
    the packed tensors."""
    before = {name: state for name, state in gptq_state(model).items() if name.split(".")[-1] in TARGETS}
    after = gptq_state(model.merge_and_unload())
    changed = total = 0
    for name, (qweight, *_) in before.items():
        old, new = (unpack_rows(q, 4, 8 * q.shape[0]) for q in (qweight, after[name][0]))
        changed += int((old != new).sum())
        total += old.numel()
    return changed, total


def test_codes_changed_counts_what_the_merge_writes(quantized):
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), qa_config(rank_choices=[8, 4]))
    zero = codes_changed(model)
    assert zero.changed == 0 and zero.layers == 12 and zero.fraction == 0.0  # B = 0: nothing moves
    randomize_adapters(model, seed=3)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    counted = codes_changed(model)
    changed, total = merged_difference(model)  # the merge at the active (minimal) rank
    assert counted.changed == changed > 0
    assert counted.total == total
    assert "codes changed" in str(counted)


def test_codes_changed_refuses_a_model_without_qa_layers(quantized):
    path, _ = quantized(4, False)
    float_sparse = get_peft_model(load_gptq(path), SparsePEFTConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantization_aware=True"):
        codes_changed(float_sparse)


def sft_args(tmp_path, lr: float, steps: int = 6) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path / f"run-{lr}"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=32,
        disable_tqdm=True,
    )


def train(path, tokenizer, tmp_path, lr, trainer_class=SFTTrainer, **kwargs):
    dataset = Dataset.from_list([{"text": text} for text in TEXTS[:32]])
    trainer = trainer_class(
        model=load_gptq(path),
        args=sft_args(tmp_path, lr),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=qa_config(),
        **kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "QA-SparsePEFT" in str(w.message)]
    return trainer, messages


def test_a_tiny_learning_rate_is_warned_and_logged(quantized, tokenizer, tmp_path):
    path, _ = quantized(4, False)
    callback = QuantizationAwareCallback()
    trainer, messages = train(path, tokenizer, tmp_path, 1e-7, callbacks=[callback])
    logged = [entry["qa_codes_changed"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(fraction < 1e-4 for fraction in logged)
    assert len(messages) == 1  # once, at the check step
    assert "learning rate 1e-07" in messages[0] and "rounded away" in messages[0]
    assert isinstance(callback.last, CodeChanges) and callback.last.fraction == logged[-1]


def test_the_elastic_trainer_adds_the_callback_and_a_working_rate_is_not_warned(quantized, tokenizer, tmp_path):
    path, _ = quantized(4, False)
    sampling = SubnetworkSamplingCallback(strategy="random", seed=0)
    trainer, messages = train(path, tokenizer, tmp_path, 2e-2, ElasticSFTTrainer, callbacks=[sampling])
    added = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QuantizationAwareCallback)]
    assert len(added) == 1
    logged = [entry["qa_codes_changed"] for entry in trainer.state.log_history if "loss" in entry]
    assert messages == []
    assert logged[-1] > 1e-4
    assert logged[-1] == pytest.approx(codes_changed(trainer.model).fraction)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_fraction": 1.5}, "min_fraction must be in"),
        ({"check_fraction": 0}, "check_fraction must be in"),
        ({"check_step": 0}, "check_step must be an int"),
        ({"check_step": True}, "check_step must be an int"),
    ],
)
def test_callback_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAwareCallback(**options)


def test_callback_refuses_a_run_without_qa_layers_before_training(quantized, tokenizer, tmp_path):
    """A QuantizationAwareCallback passed to a run without QA layers says so in one line, before any step."""
    path, _ = quantized(4, False)
    dataset = Dataset.from_list([{"text": text} for text in TEXTS[:8]])
    trainer = SFTTrainer(
        model=load_gptq(path),
        args=sft_args(tmp_path, 1e-3, steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=SparsePEFTConfig(r=4, target_modules=["q_proj"]),
        callbacks=[QuantizationAwareCallback()],
    )
    with pytest.raises(ValueError, match="QuantizationAwareCallback needs"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_codes_changed_on_a_hand_built_update_matches_the_rounding_rule(quantized):
    """One layer, B A chosen so that ΔW / S is exactly 0.49 or 0.51 of a step at chosen weights: only the latter
    flips (the threshold of the docs), as long as the code is not at the end of the grid."""
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), qa_config(r=1, lora_alpha=1, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if is_quant_aware_layer(m)]
    layer = layers[0]
    grid = quant_grid(layer)
    mask_t = transposed_mask(layer)  # (in × out)
    codes = grid.codes_into(torch.empty(mask_t.shape))
    inside = mask_t & (codes > 0) & (codes < grid.maxq)
    rows, cols = inside.nonzero(as_tuple=True)
    i, j = int(rows[0]), int(cols[0])
    scale = float(grid.scales[i // grid.group_size, j])
    for share, expected in ((0.49, 0), (0.51, 1)):
        with torch.no_grad():
            for other in layers[1:]:
                other.lora_B["default"].weight.zero_()
            layer.lora_A["default"].weight.zero_()
            layer.lora_A["default"].weight[0, i] = 1.0
            layer.lora_B["default"].weight.zero_()
            layer.lora_B["default"].weight[j, 0] = share * scale
        assert codes_changed(model).changed == expected, share
