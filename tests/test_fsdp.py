"""FSDP2 on CPU (two torchrun ranks, gloo, `peft_elastic.fsdp.shard_model`): for every tuner type, a few SGD steps
with a new random subnetwork per step give the losses and adapter of one process on the same global batch, both ranks
train the same subnetworks, the adapter saved from the sharded model and its exports (written once, from rank 0)
load and equal the single-process ones, and what would read shards or merge in place says what to do instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import CONFIGS, base_model, train
from peft import PeftModel
from safetensors.torch import load_file
from test_ddp import free_port

import peft_elastic
from peft_elastic.fsdp import full_parameters, gathered, refuse_sharded, require_gathered, shard_model
from peft_elastic.toy import tiny_llama

WORKER = Path(__file__).with_name("fsdp_worker.py")
EXAMPLE = Path(__file__).parents[1] / "examples" / "fsdp.py"
KINDS = list(CONFIGS)
#: Sharded training all-reduces the two ranks' gradient halves (sum, then / 2) where one process takes the mean of
#: the global batch at once: the same numbers in another order. Measured: at most 3.7e-9 after 4 steps (a gradient
#: that was not averaged over the ranks would be off by about 1e-3).
TOLERANCE = 1e-7


@pytest.fixture(scope="module")
def gptq_checkpoint(quantized):
    return quantized(4)[0]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, gptq_checkpoint):
    """One torchrun launch of two ranks that trains every tuner type, sharded."""
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(WORKER), str(out), str(gptq_checkpoint), *KINDS, "trainer"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, "".join(f.read_text() for f in out.glob("fault*.log")) + result.stderr[-4000:]
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    [file] = folder.glob("*.safetensors")
    return load_file(file)


def _assert_close(sharded: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> float:
    assert sorted(sharded) == sorted(single)
    worst = 0.0
    for key, value in single.items():
        assert sharded[key].shape == value.shape, key
        worst = max(worst, (sharded[key] - value).abs().max().item())
    assert worst <= TOLERANCE, worst
    return worst


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_training_equals_one_process(kind, sharded_run, gptq_checkpoint, tmp_path):
    out = sharded_run / kind
    ranks = [json.loads((out / f"record{rank}.json").read_text()) for rank in range(2)]
    single = train(kind, gptq_checkpoint, tmp_path)

    # both ranks trained the same subnetworks — the ones of one process — and several of them
    assert ranks[0]["subnetworks"] == ranks[1]["subnetworks"] == single["subnetworks"]
    assert len({json.dumps(s, sort_keys=True) for s in single["subnetworks"]}) > 1
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-6)
    assert single["losses"][-1] != single["losses"][0]
    # an evaluation of the whole held-out batch on every rank (forward only) is one process's
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)

    # the adapter saved from the sharded model (gathered on rank 0) is the single-process adapter, trained
    saved, reference = _tensors(out / "adapter"), _tensors(tmp_path / "adapter")
    _assert_close(saved, reference)
    trained_b = [k for k in reference if ".lora_B." in k]
    assert trained_b and all(torch.count_nonzero(reference[k]) > 0 for k in trained_b)
    # ... and PEFT loads it to the same model
    inputs = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    outputs = []
    for folder in (out / "adapter", tmp_path / "adapter"):
        model = PeftModel.from_pretrained(base_model(kind, gptq_checkpoint), folder).eval()
        peft_elastic.set_subnetwork(model, single["heuristic"])
        with torch.no_grad():
            outputs.append(model(input_ids=inputs).logits)
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-5

    # the exports called on both ranks wrote one folder, equal to one process's
    export = "compressed" if kind.startswith("mode_b") else "sub-adapter"
    _assert_close(_tensors(out / export), _tensors(tmp_path / export))
    assert sorted(p.name for p in (out / export).iterdir()) == sorted(p.name for p in (tmp_path / export).iterdir())

    # what would read shards, or merge into them, refuses with what to do instead
    errors = ranks[0]["errors"]
    assert "sharded by FSDP" in errors["merge_and_unload"]
    assert "PeftModel.from_pretrained(base, folder).merge_and_unload()" in errors["merge_and_unload"]
    assert "sub_adapter_state reads the full weights" in errors["sub_adapter_state"]
    assert "gathered(model)" in errors["sub_adapter_state"]


def test_trainer_fsdp_arguments_on_cpu_refuse_instead_of_training_replicas(sharded_run):
    # accelerate runs FSDP on GPU-type devices only: on CPU the Trainer's fsdp arguments would silently give DDP
    for rank in range(2):
        record = json.loads((sharded_run / "trainer" / f"record{rank}.json").read_text())
        assert record["distributed_type"] == "MULTI_CPU"
        assert record["error"].startswith("FSDP was requested (fsdp=")
        assert "accelerate runs this job as MULTI_CPU, without FSDP" in record["error"]
        assert "peft_elastic.fsdp.shard_model" in record["error"]


def test_helpers_leave_an_unsharded_model_alone(tmp_path):
    model = tiny_llama()
    with gathered(model) as same:
        assert same is model
    with full_parameters(model) as writes:
        assert writes is True
    refuse_sharded(model, "Merging")  # no error: nothing is sharded
    require_gathered(model, "export")


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match=r"needs a process group: call torch\.distributed\.init_process_group"):
        shard_model(tiny_llama())


def _example(command: list[str], out: Path, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [*command, str(EXAMPLE), "--tuner", "sparse_peft", "--steps", "4", "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / "figures.json").read_text()) | {"stdout": result.stdout}


def test_fsdp_example_on_two_ranks_trains_what_one_process_does(tmp_path):
    """examples/fsdp.py under torchrun (two gloo ranks, sharded) and under plain python (a world of one): the same
    training losses, evaluations and saved adapters, the SparsePEFT merge keeps the base's 50 % sparsity."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    sharded = _example([*launch, "--master_port", str(free_port())], tmp_path / "two", tmp_path)
    single = _example([sys.executable], tmp_path / "one", tmp_path)
    assert (sharded["world_size"], single["world_size"]) == (2, 1)
    assert "2 process(es), sparse_peft sharded with FSDP2" in sharded["stdout"]
    # the loss is normalised by the global batch's tokens: each step's loss is one process's on the same batch
    assert len(sharded["losses"]) == 4 and sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert sharded["losses"][-1] < sharded["losses"][0]
    for name in ("maximal", "heuristic", "minimal"):
        assert sharded[name]["subnetwork"] == single[name]["subnetwork"]
        assert sharded[name]["loss"] == pytest.approx(single[name]["loss"], rel=1e-5)
        assert sharded[name]["loss"] < sharded["before"]
    ranks = sorted({v for v in sharded["heuristic"]["subnetwork"].values()})
    assert sharded["maximal"]["adapter_params"] > sharded["heuristic"]["adapter_params"] > 0 and ranks == [6]
    assert sharded["merged_sparsity"] == single["merged_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # saved from the shards by rank 0: the one-process adapter, and a stock LoRA export. AdamW divides each gradient
    # entry by its own running scale, so an entry near zero that rounds differently moves by up to the learning rate
    # (3e-3): measured at most 2.3e-6 after 4 steps, where the trained lora_B entries reach about 1e-2
    for folder in ("super-adapter", "heuristic-lora"):
        two, one = _tensors(tmp_path / "two" / folder), _tensors(tmp_path / "one" / folder)
        assert sorted(two) == sorted(one)
        assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5
        assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # trained: far above the bound
    stock = json.loads((tmp_path / "two" / "heuristic-lora" / "adapter_config.json").read_text())
    assert stock["peft_type"] == "LORA" and set(stock["rank_pattern"].values()) == {6}
    assert (tmp_path / "two" / "super-adapter" / "tokenizer.json").is_file()


def test_fsdp_example_needs_a_global_batch_the_ranks_divide(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--global-batch-size", "3"])
    assert exit_.value.code == 2
    assert "--global-batch-size (3) must be a multiple of the number of processes (2)" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_shard_model_groups_blocks_and_untied_embeddings(tied):
    """The FSDP groups: one per decoder block, the input embeddings and the head each their own (resharded after
    their forward pass) unless tied, and the model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one, in-process
    try:
        model = tiny_llama(num_hidden_layers=3, tie_word_embeddings=tied)
        shard_model(model)
        groups = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
        blocks = [f"model.layers.{i}" for i in range(3)]
        assert groups == sorted(["", *blocks] + ([] if tied else ["lm_head", "model.embed_tokens"]))
        with pytest.raises(ValueError, match="LlamaForCausalLM is already sharded"):
            shard_model(model)
    finally:
        dist.destroy_process_group()


def test_the_accelerate_fsdp2_config_wraps_the_blocks_shard_model_wraps(monkeypatch):
    """examples/accelerate_fsdp2.yaml, read by `accelerate launch`'s own parser into the environment its processes
    get: FSDP version 2, full state dicts, and a wrap policy that picks exactly the decoder blocks of a PEFT model
    (never the adapter's `lora_A` / `lora_B`, which the elastic layer slices without calling)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from peft import get_peft_model

    config = Path(__file__).parents[1] / "examples" / "accelerate_fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for name, value in env.items():
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"

    model = get_peft_model(tiny_llama(num_hidden_layers=3), CONFIGS["nls"]())
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"base_model.model.model.layers.{i}" for i in range(3)]
