"""The ElasticLoRA user flow, end to end, on a tiny offline model (or any causal LM id/path with --model).

python examples/quickstart.py [--model MODEL_ID_OR_PATH] [--output-dir out]
"""

import argparse
import copy

import torch
from peft import PeftModel, get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument(
    "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
)
parser.add_argument("--output-dir", default="out", help="where to write the checkpoints (default: out)")
args = parser.parse_args()

base = peft_elastic.load_causal_lm(args.model)[0] if args.model else tiny_llama()
base2 = copy.deepcopy(base)  # a second copy of the base, to reload the super-adapter onto

model = get_peft_model(
    base,
    ElasticLoraConfig(
        r=32,
        lora_alpha=64,
        rank_choices=[32, 24, 16],
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    ),
)
space = peft_elastic.search_space(model)  # {group name: [32, 24, 16], ...}
peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
print(
    f"{len(space)} groups; heuristic subnetwork uses {peft_elastic.num_adapter_parameters(model):,} adapter parameters"
)

# ... train, evaluate ... (here: one optimizer step on random tokens)
input_ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model(input_ids, labels=input_ids).loss.backward()
optimizer.step()
expected = model(input_ids).logits

peft_elastic.export_sub_adapter(model, f"{args.output_dir}/sub", overwrite=True)  # a stock LoRA checkpoint
model.save_pretrained(f"{args.output_dir}/super")
again = PeftModel.from_pretrained(base2, f"{args.output_dir}/super")  # search space and weights restored
assert peft_elastic.search_space(again) == space
print("reloaded super-adapter, max logit difference:", float((again(input_ids).logits - expected).abs().max()))
merged = model.merge_and_unload()  # merges the active subnetwork
print("merged model, max logit difference:", float((merged(input_ids).logits - expected).abs().max()))
