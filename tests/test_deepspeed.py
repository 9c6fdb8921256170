"""DeepSpeed ZeRO on CPU (two torchrun ranks, gloo): for every tuner type of `test_fsdp.py`, the same SGD steps with
a new random subnetwork each under ZeRO-3 give the losses and adapter of one process on the same global batch, both
ranks train the same subnetworks, and the adapter gathered and saved from rank 0 equals one process's. Dropping a
block (Mode B `droppable_layers`) is the exception: ZeRO-3 moves the dropped block's adapters (measured), so it is
refused there with what to use instead; ZeRO-2 trains it exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fsdp_worker import train
from test_ddp import free_port
from test_fsdp import _assert_close, _tensors

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
#: ZeRO-3 kinds trained as one process does: every kind but Mode B with a droppable block
ZERO3 = ["mode_a", "mode_b_widths", "nls", "nls_tied", "sparse_peft", "qa_sparse_peft"]


@pytest.fixture(scope="module")
def gptq_checkpoint(quantized):
    return quantized(4)[0]


def _launch(out: Path, gptq: Path, stage: int, kinds: list[str]) -> Path:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(WORKER), str(out), str(gptq), str(stage), *kinds]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, "".join(f.read_text() for f in out.glob("fault*.log")) + result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, gptq_checkpoint):
    return _launch(tmp_path_factory.mktemp("zero3"), gptq_checkpoint, 3, [*ZERO3, "mode_b"])


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, gptq_checkpoint):
    return _launch(tmp_path_factory.mktemp("zero2"), gptq_checkpoint, 2, ["mode_b"])


def _check_equal(out: Path, kind: str, gptq: Path, reference_dir: Path) -> None:
    ranks = [json.loads((out / kind / f"record{rank}.json").read_text()) for rank in range(2)]
    assert all("error" not in r for r in ranks), ranks[0].get("trace")
    single = train(kind, gptq, reference_dir)
    assert ranks[0]["subnetworks"] == ranks[1]["subnetworks"] == single["subnetworks"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-6)
    # the adapter gathered from the ZeRO partitions is one process's (measured: at most 7.5e-9)
    _assert_close(_tensors(out / kind / "adapter"), _tensors(reference_dir / "adapter"))


@pytest.mark.parametrize("kind", ZERO3)
def test_zero3_training_equals_one_process(kind, zero3_run, gptq_checkpoint, tmp_path):
    _check_equal(zero3_run, kind, gptq_checkpoint, tmp_path)


def test_zero3_refuses_to_drop_a_block_while_training(zero3_run):
    for rank in range(2):
        record = json.loads((zero3_run / "mode_b" / f"record{rank}.json").read_text())
        assert record["error"].startswith("ValueError: 'model.layers.1:block': 0 drops model.layers.1 while training")
        assert "under DeepSpeed ZeRO-3" in record["error"]
        assert "FSDP2 (peft_elastic.fsdp.shard_model)" in record["error"]


def test_zero2_trains_dropped_blocks_as_one_process(zero2_run, gptq_checkpoint, tmp_path):
    _check_equal(zero2_run, "mode_b", gptq_checkpoint, tmp_path)
    subnetworks = json.loads((zero2_run / "mode_b" / "record0.json").read_text())["subnetworks"]
    assert {s["model.layers.1:block"] for s in subnetworks} == {0, 1}  # block 1 dropped in some steps, kept in others
