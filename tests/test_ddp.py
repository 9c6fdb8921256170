"""Two real DDP ranks on CPU (torchrun, gloo): the same subnetwork on both ranks at every step, fixed across
gradient-accumulation micro-batches, and bit-identical adapter weights at the end — with single-pass and sandwich
strategies. (`accelerate launch --cpu --num_processes 2` would start only one process.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from peft_elastic import NLSConfig
from peft_elastic.toy import tiny_llama
from peft_elastic.training import make_sampler

WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS, ACCUMULATION = 4, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["random", "sandwich"])
def test_two_ddp_ranks_agree(tmp_path, strategy):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(WORKER), str(tmp_path), strategy]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, "".join(f.read_text() for f in tmp_path.glob("fault*.log")) + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    weights = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]

    assert [(r["rank"], r["world_size"], r["backend"]) for r in records] == [(0, 2, "gloo"), (1, 2, "gloo")]
    passes = 3 if strategy == "sandwich" else 1
    steps = [[call["step"] for call in r["calls"]] for r in records]
    expected_steps = [step for step in range(STEPS) for _ in range(ACCUMULATION * passes)]
    assert steps[0] == steps[1] == expected_steps

    # the two ranks trained on different data (DDP shards the dataset) ...
    first_batches = [r["calls"][0]["input_ids"] for r in records]
    assert first_batches[0] != first_batches[1]
    # ... with the same subnetworks, the seeded sampler's, each kept for all micro-batches of its step
    subnetworks = [[call["subnetwork"] for call in r["calls"]] for r in records]
    assert subnetworks[0] == subnetworks[1]
    sampler = make_sampler(strategy, seed=0)
    sampler.setup(get_peft_model(tiny_llama(), NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4])))
    for step in range(STEPS):
        chosen = sampler.sample(step, STEPS)
        calls = subnetworks[0][step * ACCUMULATION * passes : (step + 1) * ACCUMULATION * passes]
        assert calls == [s for _ in range(ACCUMULATION) for s in chosen], step
    if strategy == "random":
        assert len({json.dumps(s, sort_keys=True) for s in subnetworks[0]}) > 1

    # gradients were all-reduced: identical adapters on both ranks, and they did train
    assert sorted(weights[0]) == sorted(weights[1]) and len(weights[0]) == 2 * 2 * 10
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    trained_b = [n for n in weights[0] if ".lora_B." in n and not n.startswith("initial.")]
    assert trained_b and all(torch.count_nonzero(weights[0][n]) > 0 for n in trained_b)
    assert all(torch.count_nonzero(weights[0][f"initial.{n}"]) == 0 for n in trained_b)
