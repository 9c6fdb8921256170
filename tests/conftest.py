"""Shared fixtures: tiny Llama models built from a config (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch
from gptq_fixtures import quantized, tokenizer  # noqa: F401  (session fixtures of the GPTQ tests)

import peft_elastic  # noqa: F401  (registers the tuner types)
from peft_elastic.toy import tiny_llama

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def base():
    """A fresh tiny Llama (2 layers, hidden 64); the same weights every time."""
    return tiny_llama()


@pytest.fixture
def input_ids():
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def randomize_lora_b(model, std: float = 0.3, seed: int = 1) -> None:
    """Give every LoRA B factor random values (B starts at zero, which would make every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
