"""A 50 %-sparse tiny Llama quantized with `peft_elastic.quantize_gptq` on CPU, shared by the GPTQ tests (the
`tokenizer` and `quantized` fixtures are registered in conftest)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTQConfig

import peft_elastic
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

WIDE = {"hidden_size": 128, "intermediate_size": 256}
TEXTS = [p["prompt"] + p["completion"] for p in arithmetic_problems(64, seed=1)]
CALIBRATION = [" ".join(TEXTS[i : i + 8]) for i in range(0, len(TEXTS), 8)]
GROUP_SIZE = 32


def sparse_model(hidden: int = 128):
    """The float model that `quantized` quantizes: a tiny Llama (hidden 128, or `hidden` with twice as wide an MLP),
    50 % magnitude-pruned per row. With hidden 256, the first group of 32 inputs of layer 0's `q_proj` holds
    nonnegative weights only (GPTQ sets a group's grid before any error feedback reaches it): its asymmetric
    zero-point is 0 in every row, whatever dtype gptqmodel calibrates in."""
    model = tiny_llama(**WIDE) if hidden == 128 else tiny_llama(hidden_size=hidden, intermediate_size=2 * hidden)
    peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    if hidden != 128:
        with torch.no_grad():
            group = model.model.layers[0].self_attn.q_proj.weight[:, :GROUP_SIZE]
            group.copy_(group.abs())
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=96)


@pytest.fixture(scope="session")
def quantized(tokenizer, tmp_path_factory):
    """`quantized(bits, desc_act, hidden)` -> (checkpoint folder, report), made once per session from
    `sparse_model(hidden)` (asymmetric, groups of 32)."""
    made = {}

    def make(bits: int = 4, desc_act: bool = False, hidden: int = 128):
        key = bits, desc_act, hidden
        if key not in made:
            path = tmp_path_factory.mktemp(f"gptq{bits}{'act' if desc_act else ''}h{hidden}") / "int"
            options = dict(bits=bits, group_size=GROUP_SIZE, desc_act=desc_act, tokenizer=tokenizer)
            report = peft_elastic.quantize_gptq(sparse_model(hidden), path, CALIBRATION, **options)
            made[key] = path, report
        return made[key]

    return make


def load_gptq(path, backend: str | None = "gptq_torch", dtype=torch.float32):
    """The checkpoint loaded by transformers on CPU. `gptq_torch` (TorchLinear) keeps the standard packed layout and
    computes in float32 here, so comparisons can be exact; `backend=None, dtype=None` is the default user path
    (TorchAtenLinear, bfloat16)."""
    kwargs = {"device_map": "cpu"}
    if backend is not None:
        bits = json.loads((path / "config.json").read_text())["quantization_config"]["bits"]
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
