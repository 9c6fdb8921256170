"""Several adapters on one model: which parameters require grad, exactly as for PEFT's own LoRA.

The oracle is stock `LoraConfig` in the installed PEFT, put through the same calls (`from_pretrained(is_trainable=)`,
`load_adapter(is_trainable=)`, `set_adapter`, `disable_adapter`, `set_requires_grad`); the parameter names are
compared with `lora_` as the only difference. PEFT's contract (its issues #2759 and #3580): an adapter loaded with
`is_trainable=False` never requires grad until it is made active for training; loading another adapter does not
change the trainability of the ones already there.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from peft import LoraConfig, PeftModel, get_peft_model

from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.toy import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trainable(model) -> list[str]:
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


def walk(config, folder, first: bool, second: bool) -> list[tuple[str, list[str]]]:
    """The trainable parameters after each step of a multi-adapter session."""
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    model = PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=first)
    steps = [("from_pretrained", trainable(model))]
    model.load_adapter(folder, adapter_name="other", is_trainable=second)
    steps.append(("load_adapter", trainable(model)))
    model.set_adapter("other")
    steps.append(("set_adapter(other)", trainable(model)))
    with model.disable_adapter():
        steps.append(("disable_adapter", trainable(model)))
    steps.append(("after disable_adapter", trainable(model)))
    model.set_adapter("default")
    steps.append(("set_adapter(default)", trainable(model)))
    model.set_adapter("default", inference_mode=True)
    steps.append(("set_adapter(default, inference_mode)", trainable(model)))
    model.set_requires_grad("other", True)
    steps.append(("set_requires_grad(other)", trainable(model)))
    return steps


@pytest.mark.parametrize("config_cls", [ElasticLoraConfig, NLSConfig, SparsePEFTConfig])
@pytest.mark.parametrize("first,second", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_requires_grad_as_stock_lora(tmp_path, config_cls, first, second, modules_to_save):
    kwargs = {"r": 8, "target_modules": TARGETS, "modules_to_save": modules_to_save}
    expected = walk(LoraConfig(**kwargs), tmp_path / "lora", first, second)
    with pytest.warns(UserWarning, match="has no zeros") if config_cls is SparsePEFTConfig else nullcontext():
        got = walk(config_cls(**kwargs), tmp_path / "elastic", first, second)
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (step, names), (_, reference) in zip(got, expected, strict=True):
        assert names == reference, step
    # the facts the comparison rests on, so that it cannot pass on two empty lists
    after_load = dict(got)["load_adapter"]
    assert any(".default." in name for name in after_load) == first
    assert any(".other." in name for name in after_load) == second
    assert not dict(got)["disable_adapter"]
    assert any("lora_A.other" in name for name in dict(got)["set_requires_grad(other)"])
