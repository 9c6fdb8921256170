"""Training of `test_fsdp.py`: every tuner type, a new random subnetwork per step, SGD — sharded by FSDP2 over the
ranks of `torchrun` (gloo, CPU), or in one process on the same global batch (the reference).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR GPTQ_CHECKPOINT KIND [KIND ...] [trainer]

Writes, per KIND, `OUT_DIR/KIND/record{RANK}.json` (losses of the global batch, the subnetwork of every step, the
errors the sharded model gave where a full model is needed) and, from rank 0 only, the artefacts saved from the
sharded model: `adapter/` (`save_pretrained` of the gathered model), `sub-adapter/` (`export_sub_adapter`) or, for
Mode B, `compressed/` (`export_compressed_model`) — both exports called on every rank. `trainer`: an
`ElasticSFTTrainer` given the Trainer's FSDP2 arguments, which accelerate does not run on CPU; its record holds the
distributed type accelerate chose and the error `train()` gave.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.fsdp import gathered, shard_model
from peft_elastic.toy import tiny_llama
from peft_elastic.training import make_sampler

STEPS, GLOBAL_BATCH, LENGTH, LEARNING_RATE = 4, 8, 16, 0.05
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The tuner types and their configs; the GPTQ one is on the 50 %-sparse INT4 checkpoint of `gptq_fixtures`.
CONFIGS = {
    "mode_a": lambda: ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=ALL),
    "mode_b": lambda: ElasticLoraConfig(
        r=8,
        lora_alpha=16,
        rank_choices=[8, 4],
        target_modules=ALL,
        width_choices=[1.0, 0.5],
        head_choices=[4, 2],
        droppable_layers=[1],
    ),
    "mode_b_widths": lambda: ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, width_choices=[1.0, 0.5], head_choices=[4, 2]
    ),
    "nls": lambda: NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=ALL),
    # tied embeddings: one parameter in two modules, which shard_model leaves in the root's group
    "nls_tied": lambda: NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=ALL),
    "sparse_peft": lambda: SparsePEFTConfig(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL),
    "qa_sparse_peft": lambda: SparsePEFTConfig(
        r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, quantization_aware=True
    ),
}


def base_model(kind: str, gptq: Path):
    """The frozen base of `kind`: a tiny Llama, 50 % magnitude-sparse for SparsePEFT, the GPTQ checkpoint for QA."""
    if kind == "qa_sparse_peft":
        from transformers import AutoModelForCausalLM, GPTQConfig

        config = GPTQConfig(bits=4, backend="gptq_torch")
        return AutoModelForCausalLM.from_pretrained(
            gptq, quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
    model = tiny_llama(tie_word_embeddings=kind == "nls_tied")
    if kind == "sparse_peft":
        peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    return model


def train(kind: str, gptq: Path, out: Path, rank: int = 0, world: int = 1) -> dict:
    """Train `kind`'s adapter for STEPS steps, sharded over `world` ranks (1: one process), and save it to `out`."""
    torch.manual_seed(0)  # the same adapter initialisation everywhere
    model = get_peft_model(base_model(kind, gptq), CONFIGS[kind]())
    vocab = model.config.vocab_size
    sampler = make_sampler("random", seed=0)
    sampler.setup(model)
    if world > 1:
        shard_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    data = torch.Generator().manual_seed(1)
    record: dict = {"rank": rank, "world": world, "losses": [], "subnetworks": [], "errors": {}}
    model.train()
    for step in range(STEPS):
        [subnetwork] = sampler.sample(step, STEPS)  # "random": one pass per step
        peft_elastic.set_subnetwork(model, subnetwork)
        batch = torch.randint(3, vocab, (GLOBAL_BATCH, LENGTH), generator=data)
        local = batch.chunk(world)[rank]  # the same number of tokens per rank: the mean of the means is the mean
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        record["losses"].append(total.item())
        record["subnetworks"].append(peft_elastic.get_subnetwork(model))
    model.eval()
    # an evaluation forward pass (no backward follows: FSDP keeps the root's parameters unsharded after it)
    with torch.no_grad():
        held_out = torch.randint(3, vocab, (GLOBAL_BATCH, LENGTH), generator=data)
        record["eval_loss"] = model(input_ids=held_out, labels=held_out).loss.item()
    if world > 1:  # what needs the full model says so instead of reading shards
        for name, action in {
            "merge_and_unload": lambda: model.merge_and_unload(),
            "sub_adapter_state": lambda: peft_elastic.sub_adapter_state(model),
        }.items():
            try:
                action()
                record["errors"][name] = None
            except ValueError as error:
                record["errors"][name] = str(error)
    heuristic = peft_elastic.heuristic_subnetwork(model)
    record["heuristic"] = heuristic
    with gathered(model, all_ranks=False):
        if rank == 0:
            model.save_pretrained(out / "adapter")
    if kind.startswith("mode_b"):
        peft_elastic.export_compressed_model(model, out / "compressed", heuristic)
    else:
        peft_elastic.export_sub_adapter(model, out / "sub-adapter", heuristic)
    return record


def trainer_with_fsdp_arguments(out: Path) -> dict:
    """The Trainer path asked for FSDP2 on CPU: what accelerate makes of it, and what `train()` says."""
    from datasets import Dataset
    from trl import SFTConfig

    from peft_elastic.toy import arithmetic_problems, train_tokenizer
    from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback

    data = Dataset.from_list(arithmetic_problems(16, seed=0))
    tokenizer = train_tokenizer([*data["prompt"], *data["completion"]], vocab_size=96)
    args = SFTConfig(
        output_dir=str(out / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
        fsdp="full_shard auto_wrap",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    trainer = ElasticSFTTrainer(
        model=tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=NLSConfig(r=4, lora_alpha=8, rank_choices=[4, 2]),
        callbacks=[SubnetworkSamplingCallback(strategy="random", seed=0)],
    )
    record = {"distributed_type": trainer.accelerator.state.distributed_type.value, "error": None}
    try:
        trainer.train()
    except ValueError as error:
        record["error"] = str(error)
    return record


def main(out_dir: str, gptq: str, kinds: list[str]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    faulthandler.enable(open(os.path.join(out_dir, f"fault{rank}.log"), "w"), all_threads=True)
    dist.init_process_group("gloo")
    for kind in kinds:
        out = Path(out_dir) / kind
        out.mkdir(parents=True, exist_ok=True)
        if kind == "trainer":
            record = trainer_with_fsdp_arguments(out)
        else:
            record = train(kind, Path(gptq), out, rank, world)
        (out / f"record{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:  # as distributed_worker.py: no interpreter teardown while gloo's threads may be alive
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
