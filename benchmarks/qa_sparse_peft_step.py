"""QA-SparsePEFT training step against stock LoRA on the same GPTQ base, and the time of its merge, on CPU.

A 50 %-sparse Llama (magnitude pruning, `sparse_peft_step`'s shapes) is quantized to 4 bits with
`peft_elastic.quantize_gptq` and loaded twice with gptqmodel's `TorchLinear` kernel (`backend="gptq_torch"`, the
standard packed layout), in float32. Two variants train it with the same adapter weights on q/k/v/o/gate/up/down:

- `lora`: stock PEFT LoRA (`GPTQLoraLinear`: the base's dequantizing matmul plus `x Aᵀ Bᵀ s`; it cannot be merged);
- `qa_sparse_peft`: `SparsePEFTConfig(quantization_aware=True)`, the masked update requantized onto the base's
  frozen GPTQ grid at every forward (`QuantAwareLowRankLinear`), so that the merge is exact.

Step times are measured side by side in one process, interleaved (see `step_time.py`). Then the trained
QA-SparsePEFT adapter is merged into the integer weights: `merge_adapter()` and `unmerge_adapter()` a few times
(unmerging restores `qweight` exactly), timed per million parameters of the adapted layers, and finally
`merge_and_unload()`, whose logits are compared with the unmerged model's.

    python benchmarks/qa_sparse_peft_step.py --seq-len 256                    # tiny model, updates RESULTS.md
    python benchmarks/qa_sparse_peft_step.py --model 1b-block --seq-len 256   # LLM-shaped blocks
    python benchmarks/qa_sparse_peft_step.py --quick --results /tmp/R.md       # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from sparse_peft_step import MODELS, ROUNDS, SPARSITY, base_parser, batch, resolved_shape, sparse_base
from step_time import (
    QUICK,
    RESULTS,
    TARGET_MODULES,
    THREADS,
    Setup,
    Variant,
    check_same_weights,
    cpu_model,
    run,
    summarize,
    table,
    write_section,
)
from transformers import AutoModelForCausalLM, GPTQConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.quantization import unpack_rows
from peft_elastic.toy import arithmetic_problems, train_tokenizer
from peft_elastic.tuners.sparse_peft import is_quant_aware_layer

SCRIPT = "benchmarks/qa_sparse_peft_step.py"
GOAL = 2.0  # qa_sparse_peft / lora step time
BITS = 4
GROUP_SIZES = (128, 32)  # the larger that divides every quantized layer's in-features is used
VARIANTS = ("lora", "qa_sparse_peft")
MERGE_REPEATS = {"quick": 3, "tiny": 5, "1b-block": 5}
TEXTS = [p["prompt"] + p["completion"] for p in arithmetic_problems(128, seed=1)]
CALIBRATION = [" ".join(TEXTS[i : i + 8]) for i in range(0, len(TEXTS), 8)]  # 16 texts of about 80 tokens


def markers(model: str, seq_len: int) -> tuple[str, str]:
    """This run's section markers in RESULTS.md: one section per model shape and sequence length."""
    name = f"qa_sparse_peft_step_{model}_seq{seq_len}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def group_size(setup: Setup) -> int:
    """GPTQ's group size for `setup`: 128, or 32 when 128 does not divide the hidden and the intermediate size
    (`quantize_gptq` refuses a group size that does not divide the in-features of every quantized layer, which
    transformers' default CPU kernel cannot run; `tiny`'s intermediate 1376 takes 32)."""
    fitting = [g for g in GROUP_SIZES if setup.hidden_size % g == 0 and setup.intermediate_size % g == 0]
    if not fitting:
        raise ValueError(f"No group size of {GROUP_SIZES} divides {setup.hidden_size} and {setup.intermediate_size}.")
    return fitting[0]


# ----------------------------------------------------------------------------------------------------- models


def quantize(setup: Setup, folder: Path) -> tuple[peft_elastic.QuantizationReport, float]:
    """`sparse_peft_step`'s sparse Llama of `setup`, GPTQ-quantized into `folder`; returns the report and seconds."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=96)  # its token ids are all below the models' vocab sizes
    start = time.perf_counter()
    report = peft_elastic.quantize_gptq(
        sparse_base(setup), folder, CALIBRATION, bits=BITS, group_size=group_size(setup), tokenizer=tokenizer
    )
    return report, time.perf_counter() - start


def load_gptq(folder: Path):
    """The GPTQ checkpoint in float32 with gptqmodel's `TorchLinear` (standard layout, differentiable)."""
    config = GPTQConfig(bits=BITS, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", dtype=torch.float32, quantization_config=config
    )


def build(name: str, setup: Setup, folder: Path):
    """The model of variant `name` on a fresh load of the checkpoint, with the same adapter weights as the other."""
    torch.manual_seed(1)
    kwargs = dict(r=setup.r, lora_alpha=2 * setup.r, target_modules=TARGET_MODULES)
    config = LoraConfig(**kwargs) if name == "lora" else SparsePEFTConfig(**kwargs, quantization_aware=True)
    model = get_peft_model(load_gptq(folder), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:  # B = 0 would make the adapters trivial (and the merge a no-op)
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.train()
    return model


def make_variant(name: str, setup: Setup, folder: Path) -> Variant:
    model = build(name, setup, folder)
    params = [p for p in model.parameters() if p.requires_grad]
    return Variant(name, model, torch.optim.AdamW(params, lr=1e-4), str(setup.r), sum(p.numel() for p in params), [])


# ------------------------------------------------------------------------------------------------------ merge


@dataclasses.dataclass
class MergeResult:
    """The merge's timings (seconds), the size of the adapted layers and what the exactness checks found."""

    merge_seconds: list[float]
    unload_seconds: float
    layers: int
    base_params: int  # in × out summed over the adapted GPTQ layers
    codes_changed: int
    logits_diff: float
    grid_identical: bool  # qzeros, scales and g_idx bit for bit


def qa_layers(model) -> dict[str, torch.nn.Module]:
    """The QA-SparsePEFT GPTQ layers of `model` by module name."""
    return {name: module for name, module in model.named_modules() if is_quant_aware_layer(module)}


def snapshot(layers: dict[str, torch.nn.Module], parts: tuple[str, ...]) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of the GPTQ tensors `parts` (e.g. "qweight") of each layer's base, by (layer name, part)."""
    return {(n, p): getattr(m.get_base_layer(), p).detach().clone() for n, m in layers.items() for p in parts}


def time_merge(model, input_ids: torch.Tensor, repeats: int) -> MergeResult:
    """Merge the QA-SparsePEFT adapter of `model` `repeats` times (unmerging in between), then `merge_and_unload()`;
    check that the merged model computes the QA forward's logits and that only `qweight` was written."""
    model.eval()
    layers = qa_layers(model)
    base_params = sum(m.get_base_layer().in_features * m.get_base_layer().out_features for m in layers.values())
    before = snapshot(layers, ("qweight", "qzeros", "scales", "g_idx"))
    merge_seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.merge_adapter()
        merge_seconds.append(time.perf_counter() - start)
        model.unmerge_adapter()
        if any(not torch.equal(m.get_base_layer().qweight, before[n, "qweight"]) for n, m in layers.items()):
            raise RuntimeError("unmerge_adapter() did not restore qweight exactly")
    with torch.no_grad():
        qa_logits = model(input_ids=input_ids).logits
    bases = {name: module.get_base_layer() for name, module in layers.items()}
    start = time.perf_counter()
    merged = model.merge_and_unload()
    unload_seconds = time.perf_counter() - start
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
    codes_changed = 0
    for name, base in bases.items():
        old = unpack_rows(before[name, "qweight"], base.bits, base.in_features)
        new = unpack_rows(base.qweight, base.bits, base.in_features)
        codes_changed += int((old != new).sum())
    grid_identical = all(
        torch.equal(getattr(bases[name], part), tensor) for (name, part), tensor in before.items() if part != "qweight"
    )
    return MergeResult(
        merge_seconds=merge_seconds,
        unload_seconds=unload_seconds,
        layers=len(layers),
        base_params=base_params,
        codes_changed=codes_changed,
        logits_diff=float((qa_logits - merged_logits).abs().max()),
        grid_identical=grid_identical,
    )


# ----------------------------------------------------------------------------------------------------- report


def section(model: str, setup: Setup, rows, merge: MergeResult, quantization, seconds: float) -> str:
    start_marker, end_marker = markers(model, setup.seq_len)
    report, quantize_seconds = quantization
    by_name = {row["variant"]: row for row in rows}
    ratio, best_ratio = by_name["qa_sparse_peft"]["ratio"], by_name["qa_sparse_peft"]["best_ratio"]
    verdict = "meets" if max(ratio, best_ratio) <= GOAL else "misses"
    merge_median = statistics.median(merge.merge_seconds)
    millions = merge.base_params / 1e6
    s = setup
    return f"""{start_marker}
## QA-SparsePEFT training step vs LoRA on GPTQ, {model} model, {s.batch_size} x {s.seq_len} tokens (`{SCRIPT}`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{shlex.join(["python", SCRIPT, *sys.argv[1:]])}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({THREADS} threads); peft
  {peft.__version__}, transformers {transformers.__version__}, gptqmodel {_gptqmodel_version()}, peft_elastic
  {peft_elastic.__version__}, Python {platform.python_version()}
- Model: Llama (`tiny_llama`), hidden {s.hidden_size}, intermediate {s.intermediate_size}, {s.num_hidden_layers}
  layers, {s.num_attention_heads} heads ({s.num_key_value_heads} KV heads), vocab {s.vocab_size}, {SPARSITY:.0%}
  magnitude-sparse
- Quantization: `peft_elastic.quantize_gptq` on {len(CALIBRATION)} arithmetic texts (a tokenizer trained on them),
  {quantize_seconds:.0f} s:
  {report}
- Loaded with `GPTQConfig(bits={BITS}, backend="gptq_torch")` (gptqmodel `TorchLinear`), float32
- Adapters: r={s.r}, lora_alpha={2 * s.r} on q/k/v/o/gate/up/down ({merge.layers} layers); the same weights in both
  variants (B drawn with std 0.01, so that the update is not zero); `lora` is stock PEFT LoRA (`GPTQLoraLinear`),
  `qa_sparse_peft` is `SparsePEFTConfig(quantization_aware=True)`
- Step: forward + causal LM loss (batch {s.batch_size} x {s.seq_len}), backward, AdamW, zero_grad; interleaved,
  {s.warmup} warm-up step(s), {s.rounds} rounds x {s.steps} step(s) per variant; {seconds:.0f} s

{table(rows)}

- qa_sparse_peft / lora = {ratio:.3f} (medians), {best_ratio:.3f} (minima): {verdict} the goal of <= {GOAL}.
- Merge of the trained QA-SparsePEFT adapter into the {merge.layers} GPTQ layers ({merge.base_params:,} weights):
  `merge_adapter()` {merge_median:.3f} s (median of {len(merge.merge_seconds)}, each undone by `unmerge_adapter()`)
  = {merge_median / millions:.4f} s per million parameters; `merge_and_unload()` {merge.unload_seconds:.3f} s =
  {merge.unload_seconds / millions:.4f} s per million parameters.
- Exactness: max |logits(QA-SparsePEFT) - logits(merged)| = {merge.logits_diff:.3g} on the step's batch (eval
  mode); qzeros, scales and g_idx {"bit-identical" if merge.grid_identical else "CHANGED"} after the merge; the
  merge changed {merge.codes_changed:,} of {merge.base_params:,} codes; unmerge restored qweight exactly.
{end_marker}
"""


def _gptqmodel_version() -> str:
    import gptqmodel

    return gptqmodel.__version__


def parse_args(argv=None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default: {ROUNDS}, 4 with --quick)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, seq_len = resolved_shape(args)
    rounds = args.rounds if args.rounds is not None else (4 if args.quick else ROUNDS[model])
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    setup = dataclasses.replace(QUICK if args.quick else MODELS[model], rounds=rounds, steps=1, seq_len=seq_len)
    results = args.results if args.results is not None or args.quick else RESULTS
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(THREADS))  # before gptqmodel is imported
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="qa_sparse_peft_step_") as tmp:
        folder = Path(tmp) / "gptq"
        quantization = quantize(setup, folder)
        variants = [make_variant(name, setup, folder) for name in VARIANTS]
        torch.set_num_threads(THREADS)  # loading and wrapping the models may import libraries that touch threading
        check_same_weights(variants[0].model, variants[1].model)
        input_ids = batch(setup)
        print(f"timing {len(variants)} variants: {setup.rounds} rounds ...", flush=True)
        start = time.perf_counter()
        rows = summarize(variants, run(variants, setup, input_ids))
        seconds = time.perf_counter() - start
        merge = time_merge(variants[1].model, input_ids, MERGE_REPEATS[model])
    text = section(model, setup, rows, merge, quantization, seconds)
    print(text.split("\n", 1)[1].rsplit(markers(model, setup.seq_len)[1], 1)[0].strip())
    if results is not None:
        write_section(results, text, markers(model, setup.seq_len))
        print(f"\nwrote the qa_sparse_peft_step section of {results}")


if __name__ == "__main__":
    main()
