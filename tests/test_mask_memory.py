"""The memory of mask handling does not grow with depth: reading the float model's masks and writing
`sparsity_mask.safetensors` (quantize_gptq), loading it and handing each GPTQ layer its mask (SparsePEFT), and
checking the zeros of a saved GPTQ or sparsified checkpoint each hold one layer's tensors at a time.

Measured in a child process per depth (2 and 8 decoder blocks of the same width) as the growth of its resident set
during each step: Linux's peak-RSS counter (VmHWM) is reset before the step (`/proc/self/clear_refs`), and large
allocations are returned to the system when freed (`MALLOC_MMAP_THRESHOLD_`), so what a step held at once is what it
shows. RSS also counts the pages of a safetensors file mapped while it is open, which a reader keeping one open
handle for all tensors accumulates.

Also the pieces that make it so: the mask file written as masks come and read one layer per access, and the zeros
restored and checked in blocks of output columns, with the results of whole layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HIDDEN, INTERMEDIATE, HEADS = 1024, 2048, 8
DEPTHS = (2, 8)
BITS = 4
#: What one block's bool masks take (q, k, v, o: hidden²; gate, up, down: hidden × intermediate), in MB.
BLOCK_MASK_MB = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) / 2**20
STEPS = ("gptq_mask_pass", "tuner_masks", "verify_gptq", "verify_sparsified")


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(step) -> dict[str, float]:
    """`{"peak": MB the resident set grew by at its highest during step(), "retained": MB it grew by after}`."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kb("VmRSS")
    kept = step()
    gc.collect()
    result = {"peak": (_kb("VmHWM") - before) / 1024, "retained": (_kb("VmRSS") - before) / 1024}
    del kept
    return result


def _fake_gptq_tensors(out: int, rows: int, bits: int) -> dict:
    """A GPTQ layer (v2 zero-points, one group per row) whose codes are all the zero-point: every weight dequantizes
    to 0, so its pruned ones do."""
    import torch

    from peft_elastic.quantization import pack_cols, pack_rows

    zero, per_word = 1 << (bits - 1), 32 // bits
    word = pack_rows(torch.full((per_word, out), zero, dtype=torch.int32), bits)  # (1, out)
    return {
        "qweight": word.expand(rows // per_word, out).contiguous(),
        "qzeros": pack_cols(torch.full((1, out), zero, dtype=torch.int32), bits),
        "scales": torch.ones(1, out, dtype=torch.float16),
        "g_idx": torch.zeros(rows, dtype=torch.int32),
    }


def child(depth: int, folder: Path) -> dict[str, dict[str, float]]:
    """Build a 50 %-sparse Llama of `depth` blocks, its checkpoints and mask file in `folder`, then measure each
    mask-handling step."""
    import importlib
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from peft_elastic.quantization import MASK_FILE, gptq, load_sparsity_mask, save_sparsity_mask
    from peft_elastic.quantization.packing import pack_mask
    from peft_elastic.toy import tiny_llama
    from peft_elastic.tuners.sparse_peft.model import SparsePEFTModel

    sparsify_module = importlib.import_module("peft_elastic.sparsity.sparsify")  # the package exports the function

    model = tiny_llama(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
    )
    names = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]
    assert len(names) == 7 * depth
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:  # half of the weights pruned, at random
            weight = model.get_submodule(name).weight
            weight.mul_(torch.rand(weight.shape, generator=generator) < 0.5)
    float_dir, gptq_dir = folder / "float", folder / "gptq"
    model.save_pretrained(float_dir)
    gptq_dir.mkdir()
    tensors = {}
    for name in names:
        for part, tensor in _fake_gptq_tensors(*model.get_submodule(name).weight.shape, BITS).items():
            tensors[f"{name}.{part}"] = tensor
    save_file(tensors, str(gptq_dir / "model.safetensors"))
    del tensors
    quantization_config = {"quantization_config": {"bits": BITS, "checkpoint_format": "gptq_v2"}}
    (gptq_dir / "config.json").write_text(json.dumps(quantization_config))
    save_sparsity_mask({name: model.get_submodule(name).weight != 0 for name in names}, gptq_dir / MASK_FILE)

    def gptq_mask_pass():  # quantize_gptq: the float model's masks read, then stored bit-packed
        save_sparsity_mask(gptq._read_masks(float_dir, dict.fromkeys(names)), folder / "written.safetensors")

    def tuner_masks():  # SparsePEFT on a GPTQ base: each layer takes its mask and keeps it packed; the tuner lives
        tuner = SimpleNamespace(model=model)
        config = SimpleNamespace(sparsity_mask=str(gptq_dir / MASK_FILE))
        for name in names:
            pack_mask(SparsePEFTModel._gptq_masks(tuner, config).get(name))
        return tuner

    def verify_gptq():
        gptq._verify_pruned_codes(gptq_dir, load_sparsity_mask(gptq_dir), BITS)

    def verify_sparsified():
        sparsify_module._verify_saved_zero_counts(float_dir, model)

    steps = {step.__name__: step for step in (gptq_mask_pass, tuner_masks, verify_gptq, verify_sparsified)}
    return {name: _measure(steps[name]) for name in STEPS}


def test_mask_file_is_written_streaming_and_read_on_access(tmp_path):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file

    from peft_elastic.quantization import MASK_FILE, load_sparsity_mask, save_sparsity_mask
    from peft_elastic.quantization.packing import pack_mask
    from peft_elastic.tuners.sparse_peft.model import SparsePEFTModel

    g = torch.Generator().manual_seed(0)
    masks = {f"layer{i}": torch.rand(5 + i, 13 + 3 * i, generator=g) < 0.5 for i in range(3)}
    save_sparsity_mask(iter(masks.items()), tmp_path)  # (name, mask) pairs, taken one at a time
    assert {k: v.shape for k, v in load_file(tmp_path / MASK_FILE).items()} == {
        name: pack_mask(mask).shape for name, mask in masks.items()
    }  # a safetensors file that safetensors itself reads
    loaded = load_sparsity_mask(tmp_path)
    assert list(loaded) == list(masks) and "layer1" in loaded and "other" not in loaded
    assert all(torch.equal(loaded[name], mask) for name, mask in masks.items()) and loaded.get("other") is None
    save_sparsity_mask({}, tmp_path / "empty.safetensors")
    assert len(load_sparsity_mask(tmp_path / "empty.safetensors")) == 0
    with pytest.raises(ValueError, match="'layer0' was given twice"):
        save_sparsity_mask([("layer0", masks["layer0"])] * 2, tmp_path / "twice.safetensors")
    tuner = SimpleNamespace(model=torch.nn.ModuleDict({name: torch.nn.Identity() for name in masks}))
    config = SimpleNamespace(sparsity_mask=str(tmp_path / MASK_FILE))
    assert torch.equal(SparsePEFTModel._gptq_masks(tuner, config)["layer0"], masks["layer0"])
    save_sparsity_mask({"layer0": masks["layer1"]}, tmp_path / "other.safetensors")
    (tmp_path / "other.safetensors").replace(tmp_path / MASK_FILE)  # quantized again into the same folder
    assert loaded.changed() and not load_sparsity_mask(tmp_path).changed()
    with pytest.raises(RuntimeError, match="was changed after it was opened"):
        loaded["layer0"]
    assert torch.equal(SparsePEFTModel._gptq_masks(tuner, config)["layer0"], masks["layer1"])  # the tuner reads again
    (tmp_path / MASK_FILE).unlink()
    with pytest.raises(RuntimeError, match="was removed after it was opened"):
        loaded["layer0"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zeros_restored_and_verified_in_column_blocks(monkeypatch, tmp_path, bits):
    """Blocks of 16 columns (and a last one of 8): the same codes as restoring the whole layer at once."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from peft_elastic.quantization import dequantize, gptq, pack_rows, unpack_rows, zero_points

    monkeypatch.setattr(gptq, "CHUNK_WEIGHTS", 16 * 64)
    g = torch.Generator().manual_seed(bits)
    rows, out, group = 64, 40, 16
    words = (-(2**31), 2**31 - 1)
    layer = SimpleNamespace(
        bits=bits,
        g_idx=(torch.arange(rows) // group).int(),
        qweight=torch.randint(*words, (rows * bits // 32, out), dtype=torch.int32, generator=g),
        qzeros=torch.randint(*words, (rows // group, -(-out * bits // 32)), dtype=torch.int32, generator=g),
        scales=torch.rand(rows // group, out, generator=g) + 0.5,
    )
    mask = torch.rand(out, rows, generator=g) < 0.5
    zeros = zero_points(layer.qzeros, bits, out, 2)[layer.g_idx.long()]  # (in, out)
    codes = unpack_rows(layer.qweight, bits, rows)
    expected = pack_rows(torch.where(~mask.T, zeros, codes), bits)
    filled = int((~mask.T & (codes != zeros)).sum())
    assert gptq._restore_zeros(layer, mask) == (int((~mask).sum()), mask.numel(), filled) and filled
    assert torch.equal(layer.qweight, expected)
    assert bool((dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 2)[~mask] == 0).all())
    tensors = {f"m.{part}": getattr(layer, part) for part in ("qweight", "qzeros", "scales", "g_idx")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"checkpoint_format": "gptq_v2"}}))
    gptq._verify_pruned_codes(tmp_path, {"m": mask}, bits)
    nonzero = (unpack_rows(layer.qweight, bits, rows) != zeros).T & mask  # kept weights that are not 0
    row, column = (int(i) for i in nonzero.nonzero()[-1])
    assert row >= 32  # in the last block of columns
    mask[row, column] = False
    with pytest.raises(RuntimeError, match="m: pruned weights do not dequantize to 0"):
        gptq._verify_pruned_codes(tmp_path, {"m": mask}, bits)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_mask_memory_does_not_grow_with_depth(tmp_path):
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for depth in DEPTHS:  # in parallel: each child measures itself
        (tmp_path / str(depth)).mkdir()
        command = [sys.executable, __file__, str(depth), str(tmp_path / str(depth))]
        runs[depth] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    measured = {}
    for depth, run in runs.items():
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
        measured[depth] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(measured, indent=1))
    small, large = (measured[depth] for depth in DEPTHS)
    # 6 more blocks: an implementation holding every layer's bool masks at once grows by 6 x BLOCK_MASK_MB (60 MB)
    growth = {
        f"{step} {what}": large[step][what] - small[step][what] for step in STEPS for what in ("peak", "retained")
    }
    too_much = {key: round(mb, 1) for key, mb in growth.items() if mb > BLOCK_MASK_MB / 2}
    assert not too_much, f"MB grown from {DEPTHS[0]} to {DEPTHS[1]} blocks: {too_much}; measured {measured}"


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), Path(sys.argv[2]))))
