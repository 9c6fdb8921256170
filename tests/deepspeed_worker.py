"""Training of `test_deepspeed.py`: every tuner type of `fsdp_worker.py`, with the same steps, subnetworks, data and
SGD, under DeepSpeed ZeRO (stage given) over the ranks of `torchrun` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR GPTQ_CHECKPOINT STAGE KIND [KIND ...]

Writes, per KIND, `OUT_DIR/KIND/record{RANK}.json` (the global batch's loss and the subnetwork of every step, or
the error the kind gave) and, from rank 0, `adapter/`: `save_pretrained` of the adapter, its parameters gathered
(`deepspeed.zero.GatheredParameters`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from fsdp_worker import CONFIGS, GLOBAL_BATCH, LEARNING_RATE, LENGTH, STEPS, base_model
from peft import get_peft_model

import peft_elastic
from peft_elastic.training import make_sampler


def train(kind: str, gptq: Path, out: Path, stage: int, rank: int, world: int) -> dict:
    torch.manual_seed(0)  # the same adapter initialisation everywhere (fsdp_worker.train's)
    model = get_peft_model(base_model(kind, gptq), CONFIGS[kind]())
    vocab = model.config.vocab_size
    sampler = make_sampler("random", seed=0)
    sampler.setup(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's SGD, as the reference
    }
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable, config=config)
    data = torch.Generator().manual_seed(1)
    record: dict = {"rank": rank, "world": world, "losses": [], "subnetworks": []}
    engine.train()
    for step in range(STEPS):
        [subnetwork] = sampler.sample(step, STEPS)
        peft_elastic.set_subnetwork(model, subnetwork)
        batch = torch.randint(3, vocab, (GLOBAL_BATCH, LENGTH), generator=data)
        local = batch.chunk(world)[rank]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        record["losses"].append(total.item())
        record["subnetworks"].append(peft_elastic.get_subnetwork(model))
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=stage == 3):
        if rank == 0:
            model.save_pretrained(out / "adapter")
    return record


def main(out_dir: str, gptq: str, stage: str, kinds: list[str]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    faulthandler.enable(open(os.path.join(out_dir, f"fault{rank}.log"), "w"), all_threads=True)
    deepspeed.init_distributed(dist_backend="gloo")
    for kind in kinds:
        out = Path(out_dir) / kind
        out.mkdir(parents=True, exist_ok=True)
        try:
            record = train(kind, Path(gptq), out, int(stage), rank, world)
        except Exception as error:  # a kind ZeRO cannot run: recorded, the others still run
            record = {"rank": rank, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
        (out / f"record{rank}.json").write_text(json.dumps(record))
        dist.barrier()


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
