"""One DDP rank of `test_ddp.py`: SFTTrainer-style super-network training of a tiny model on CPU (gloo).

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR STRATEGY

Writes `OUT_DIR/rank{RANK}.json` (world size, the subnetwork at every micro-batch, the first batch's token ids) and
`OUT_DIR/rank{RANK}.safetensors` (the adapter weights after training, and before as `initial.*`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from trl import SFTConfig

import peft_elastic
from peft_elastic import NLSConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback

STEPS = 4


class RecordingTrainer(ElasticSFTTrainer):
    """Records the active subnetwork and the token ids of every forward pass it trains on."""

    calls: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.calls.append(
            {
                "step": self.state.global_step,
                "subnetwork": peft_elastic.get_subnetwork(self.model),
                "input_ids": inputs["input_ids"].tolist(),
            }
        )
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out_dir: str, strategy: str) -> None:
    faulthandler.enable(open(os.path.join(out_dir, f"fault{os.environ['RANK']}.log"), "w"), all_threads=True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world_size == 2, world_size
    problems = arithmetic_problems(128)
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    torch.manual_seed(0)  # the same adapter initialisation on every rank (DDP would broadcast rank 0's anyway)
    trainer = RecordingTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=SFTConfig(
            output_dir=os.path.join(out_dir, "run"),
            max_steps=STEPS,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            max_length=32,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=Dataset.from_list(problems),
        processing_class=tokenizer,
        peft_config=NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4]),
        callbacks=[SubnetworkSamplingCallback(strategy=strategy, seed=0)],
    )
    trainer.calls = []
    assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    assert trainer.accelerator.num_processes == 2
    initial = {f"initial.{n}": p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert isinstance(trainer.model_wrapped, DistributedDataParallel), type(trainer.model_wrapped)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    save_file({**initial, **final}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    record = {
        "rank": rank,
        "world_size": world_size,
        "backend": dist.get_backend(),
        "calls": trainer.calls,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # A rank sometimes aborted after training (SIGABRT, "terminate called without an active exception", about
        # one run in 15; gloo's threads can outlive the interpreter at exit, pytorch/pytorch#179291): destroy the
        # process group, then leave without the interpreter's teardown. The results are written and closed by now.
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
