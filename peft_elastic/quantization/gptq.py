"""GPTQ quantization through gptqmodel that keeps a sparse model's zeros (`quantize_gptq`).

GPTQ quantizes a layer column by column and spreads each column's rounding error over the columns not yet
quantized — pruned weights included, which come back nonzero (in a 50 %-sparse tiny Llama quantized to 4 bits,
4.8 % of the zeros were filled). `quantize_gptq` records the sparsity mask of the float model first, lets gptqmodel
quantize, then sets the code of every pruned weight to its group's zero-point `z`, so that it dequantizes to exactly 0
(`s · (z − z)`), and stores the mask bit-packed next to the checkpoint (`sparsity_mask.safetensors`). The
checkpoint is a standard GPTQ one that `AutoModelForCausalLM.from_pretrained` loads.

Nothing else of the model changes: gptqmodel calibrates in the input's dtype (left to itself it calibrates a float32
model in bfloat16 on CPU and stores the embeddings, norms and `lm_head` so), and the input's generation config is
written as it was (gptqmodel's rewrites `do_sample` to true). gptqmodel's output and the environment variables it sets
stay out of the caller's process (`gptqmodel_env`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic_folders import check_export_target, export_directory
from ..calibration import calibration_batches
from .gptqmodel_env import GPTQMODEL_ENV, import_gptqmodel, quieted, release_gptqmodel_threads, restored_environment
from .mask import MASK_FILE, SparsityMaskWriter, load_sparsity_mask
from .packing import check_bits, pack_cols, pack_rows, unpack_rows, zero_points


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize_gptq` did: per quantized layer, `(pruned weights, weights, pruned weights GPTQ had filled and
    that were set back to the zero-point)`."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    modules: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    checkpoint_format: str = "gptq"  # "gptq" (v1) unless a zero-point is 0, which only "gptq_v2" can store
    dtype: str = "float32"  # the input's dtype: gptqmodel calibrated in it, the non-quantized tensors are stored in it

    @property
    def sparsity(self) -> float:
        """Fraction of the quantized layers' weights that are exactly zero."""
        total = sum(n for _, n, _ in self.modules.values())
        return sum(z for z, _, _ in self.modules.values()) / total if total else 0.0

    @property
    def restored(self) -> int:
        """Pruned weights that GPTQ had filled and that were set back to zero."""
        return sum(r for _, _, r in self.modules.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sparsity": self.sparsity, "restored": self.restored}

    def __str__(self) -> str:
        return (
            f"GPTQ {self.bits}-bit, group size {self.group_size}, sym={self.sym}, desc_act={self.desc_act}: "
            f"{len(self.modules)} layers, sparsity {self.sparsity:.2%}, {self.restored:,} pruned weights that GPTQ "
            f"had filled set back to zero; checkpoint format {self.checkpoint_format!r}; calibrated in {self.dtype}, "
            "the non-quantized tensors stored in it"
        )


#: gptqmodel (7.6) drops calibration samples of this many tokens or fewer, whatever `calibration_data_min_length` says.
GPTQMODEL_MIN_TOKENS = 10
#: The group sizes gptqmodel (7.6) packs besides -1 (one group per row); it refuses others after calibrating.
GPTQMODEL_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
#: The group sizes of torch's CPU int4 matmul (`_weight_int4pack_mm_cpu`), behind the 4-bit kernels that transformers
#: and gptqmodel pick on CPU by default (`TorchAtenLinear`, and `TorchFusedLinear` for -1, whose group is a whole row).
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
#: The dtypes gptqmodel calibrates in; `quantize_gptq` calibrates in the input's.
CALIBRATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Files of the input checkpoint that `quantize_gptq` writes unchanged (gptqmodel rewrites them).
CARRIED_FILES = ("generation_config.json",)


@restored_environment((*GPTQMODEL_ENV, "GPTQMODEL_CPU_WORKERS"))  # as they were before the call
def quantize_gptq(
    model_or_path,
    save_directory: str | os.PathLike,
    calibration_data,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    desc_act: bool = False,
    *,
    tokenizer=None,
    text_column: str = "text",
    max_length: int = 512,
    num_samples: int = 128,
    damp_percent: float = 0.05,
    device: str | torch.device | None = None,
    verbose: bool = False,
    overwrite: bool = False,
) -> QuantizationReport:
    """Quantize a causal LM with GPTQ (gptqmodel) into `save_directory`, keeping its sparsity exactly.

    `model_or_path`: a model id, a local checkpoint (with its tokenizer, or pass `tokenizer=`), or a model object
    (pass `tokenizer=`). `calibration_data`: as for `sparsify` — input_ids tensors or dicts, a tokenized
    `datasets.Dataset`, or texts with `tokenizer=`. `bits` in 2/4/8; `group_size` -1 (one group per row) or a power
    of two from 16 to 1024 that divides the in-features of every layer gptqmodel quantizes (checked from the model's
    config before any work; the error lists the sizes that do; at 4 bits, transformers' default CPU kernel reads 32,
    64, 128 and 256 only, and a warning says so); `sym`/`desc_act` as in GPTQ (`desc_act` = act-order, which
    permutes `g_idx`). `device`: where gptqmodel quantizes (default: CUDA if available, else CPU; on CPU its worker
    count is set to the number of cores, at least 2 (its model loader needs two), unless `GPTQMODEL_CPU_WORKERS` is
    set, for the call). gptqmodel calibrates in the input's dtype (a model object's, or the `dtype` of its config;
    float32, bfloat16 or float16), in which the embeddings, norms and `lm_head` are stored too; the input's
    `generation_config.json` is written unchanged. `verbose`: show gptqmodel's banner, logs and progress bars
    (default: none of it; the environment variables it sets on import are restored either way). Writes the
    checkpoint, the tokenizer, `sparsity_mask.safetensors` (pruned positions of every quantized layer) and
    `quantization_report.json`, atomically; returns the report. `save_directory` must be new or empty (checked before
    any work); a non-empty one is refused unless `overwrite`, which replaces it whole."""
    check_export_target(save_directory, overwrite)
    check_bits(bits)
    power_of_two = isinstance(group_size, int) and group_size > 0 and group_size & (group_size - 1) == 0
    if not (group_size == -1 or power_of_two):
        raise ValueError(f"group_size must be -1 (one group per row) or a positive power of two, got {group_size!r}")
    if group_size != -1 and group_size not in GPTQMODEL_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size} is not one gptqmodel packs; use -1 (one group per row) or one of "
            f"{', '.join(map(str, GPTQMODEL_GROUP_SIZES))}."
        )
    for flag, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    source = _checked_source(model_or_path, tokenizer)
    dtype = _source_dtype(source)
    import_gptqmodel(verbose)
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        # packed with the zero-points as they are (v2): gptqmodel's conversion to v1 (z - 1) borrows from the
        # neighbouring zero-point where z = 0; v1 is written below only when it can hold every zero-point
        format="gptq_v2",
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        damp_percent=damp_percent,
        offload_to_disk=False,
        # gptqmodel's group-aware reordering needs groups; leave its default otherwise
        **({"act_group_aware": False} if group_size == -1 else {}),
    )
    in_features = _planned_in_features(source, config)
    _check_group_size(group_size, in_features)
    _warn_if_cpu_int4_kernel_fails(bits, group_size, in_features)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))

    with contextlib.ExitStack() as stack:
        # gptqmodel's idle workers would keep OpenMP thread teams alive and slow every later torch op of the process
        stack.callback(release_gptqmodel_threads)
        stack.enter_context(quieted(verbose))
        source = _source_checkpoint(source, tokenizer, stack)
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(source)
        batches = calibration_batches(
            calibration_data, tokenizer, text_column=text_column, max_length=max_length, num_samples=num_samples
        )
        calibration = [
            {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
            for batch in batches
            for ids, mask in zip(
                batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"])), strict=True
            )
        ]
        if not any(len(row["input_ids"]) > GPTQMODEL_MIN_TOKENS for row in calibration):
            longest = max((len(row["input_ids"]) for row in calibration), default=0)
            raise ValueError(
                f"GPTQ calibration needs samples of more than {GPTQMODEL_MIN_TOKENS} tokens (gptqmodel drops shorter "
                f"ones), but the longest of the {len(calibration)} samples has {longest}; use longer texts (e.g. "
                "join several) or a larger max_length."
            )
        quantizer = GPTQModel.load(str(source), config, device=str(device), dtype=dtype)
        logs = stack.enter_context(tempfile.TemporaryDirectory(prefix="peft_elastic_gptq_logs_"))
        with _working_directory(logs):  # gptqmodel writes its log to ./logs
            quantizer.quantize(calibration, tokenizer=tokenizer, calibration_data_min_length=1)
        layers = _quantized_layers(quantizer.model)
        if not layers:
            raise RuntimeError("gptqmodel quantized no linear layer of this model; nothing was written.")
        # the layers gptqmodel did quantize, for a model whose definition gptqmodel detects itself (not planned above)
        _check_group_size(group_size, {name: layer.in_features for name, layer in layers.items()})
        folder = _source_folder(source)
        report = QuantizationReport(bits, group_size, sym, desc_act, dtype=str(dtype).removeprefix("torch."))
        with export_directory(save_directory, overwrite) as staging:
            # one layer at a time (memory independent of depth): its mask read from the float checkpoint, its
            # pruned weights set back to the zero-point, its mask appended to the file unless it keeps every weight
            with SparsityMaskWriter(staging / MASK_FILE) as writer:
                for name, mask in _read_masks(folder, layers):
                    report.modules[name] = _restore_zeros(layers[name], mask)
                    if not bool(mask.all()):
                        writer.add(name, mask)
            report.checkpoint_format = _choose_checkpoint_format(quantizer, layers)
            quantizer.save(str(staging))  # it replaces its own weight files only (model*.safetensors)
            _carry_files(folder, staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (staging / "quantization_report.json").write_text(json.dumps(report.to_dict(), indent=2))
            _verify_pruned_codes(staging, load_sparsity_mask(staging / MASK_FILE), bits)
    return report


def _checked_source(model_or_path, tokenizer) -> nn.Module | Path | str:
    """The model object, checkpoint folder or hub id to quantize, checked before any work."""
    if isinstance(model_or_path, nn.Module):
        if not (hasattr(model_or_path, "save_pretrained") and hasattr(model_or_path, "config")):
            raise ValueError(
                "model_or_path must be a transformers model (with a config and save_pretrained) when it is a model "
                f"object, got {type(model_or_path).__name__}"
            )
        if tokenizer is None:
            raise ValueError("quantize_gptq needs tokenizer= with a model object (gptqmodel loads the tokenizer too).")
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ValueError(
            "model_or_path must be a model id, a checkpoint folder or a model object, got "
            f"{type(model_or_path).__name__}"
        )
    path = Path(model_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a model checkpoint folder (no config.json).")
    return path if path.exists() else str(model_or_path)


def _source_dtype(source) -> torch.dtype:
    """The dtype of the input: a model object's, or the `dtype` its checkpoint's config records (float32 when it
    records none, as transformers then loads it). Raises unless gptqmodel calibrates in it."""
    if isinstance(source, nn.Module):
        dtype = source.dtype
    else:
        from transformers import AutoConfig

        dtype = AutoConfig.from_pretrained(str(source)).dtype or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in CALIBRATION_DTYPES:
        raise ValueError(
            f"The model is in {dtype}, which gptqmodel does not calibrate in; quantize_gptq calibrates in the model's "
            f"dtype: cast it to one of {', '.join(str(d).removeprefix('torch.') for d in CALIBRATION_DTYPES)} first."
        )
    return dtype


def _source_checkpoint(source, tokenizer, stack: contextlib.ExitStack) -> Path | str:
    """A path (or hub id) gptqmodel can load: a model object is saved to a temporary folder with its tokenizer."""
    if not isinstance(source, nn.Module):
        return source
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peft_elastic_gptq_src_")))
    source.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _planned_in_features(source, quantize_config) -> dict[str, int]:
    """`{module name: in-features}` of the layers gptqmodel will quantize, in module order: the linear layers that its
    model definition lists inside the decoder blocks (for Llama `model.layers.N.self_attn.{q,k,v,o}_proj` and
    `model.layers.N.mlp.{gate,up,down}_proj`; not `lm_head` nor the embeddings). A checkpoint folder or hub id is
    built from its config on the meta device: no weights are read. Empty for a model type gptqmodel has no
    definition of (it then detects the layers itself; they are checked after quantizing)."""
    from gptqmodel.models.auto import MODEL_MAP

    if isinstance(source, nn.Module):
        model = source
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)))
    definition = MODEL_MAP.get(model.config.model_type.lower())
    if definition is None or definition.module_tree is None:
        return {}
    prefixes = tuple(definition.extract_layers_node())
    blocks = definition.simple_layer_modules(model.config, quantize_config)
    suffixes = tuple(suffix for block in blocks for suffix in block)
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith(prefixes)
        and name.endswith(suffixes)
        and not name.startswith(definition.lm_head)
        and definition.should_quantize_module(model, name, module, quantize_config)
    }


def _fitting_group_sizes(widths) -> list[int]:
    """The group sizes gptqmodel packs (besides -1) that divide every one of `widths`, largest first."""
    return [g for g in reversed(GPTQMODEL_GROUP_SIZES) if all(w % g == 0 for w in widths)]


def _check_group_size(group_size: int, in_features: dict[str, int]) -> None:
    """Raise unless `group_size` (-1 or a power of two) divides the in-features of every layer of `in_features`
    (`{module name: in-features}`); the error names the first layer it does not divide and lists the sizes that
    divide them all."""
    bad = next((name for name, width in in_features.items() if group_size != -1 and width % group_size), None)
    if bad is None:
        return
    widths = sorted(set(in_features.values()))
    fitting = ", ".join(map(str, _fitting_group_sizes(widths)))
    raise ValueError(
        f"group_size={group_size} does not divide the in-features of {bad} ({in_features[bad]}): GPTQ groups must "
        "tile the input of every quantized layer (on such a checkpoint transformers' default 4-bit CPU kernel fails "
        "with 'expect K to be divisible by qGroupSize'). Group sizes that divide the in-features of every quantized "
        f"layer ({', '.join(map(str, widths))}): {fitting + ' or ' if fitting else ''}-1 (one group per row)."
    )


def _warn_if_cpu_int4_kernel_fails(bits: int, group_size: int, in_features: dict[str, int]) -> None:
    """Warn when the 4-bit CPU kernels that transformers picks by default cannot run the checkpoint: torch's int4
    matmul takes groups of 32, 64, 128 or 256 only (-1 makes a group of a whole row)."""
    if bits != 4 or not in_features:
        return
    widths = sorted(set(in_features.values()))
    groups = widths if group_size == -1 else [group_size]
    if all(g in CPU_INT4_GROUP_SIZES for g in groups):
        return
    runs = [g for g in _fitting_group_sizes(widths) if g in CPU_INT4_GROUP_SIZES]
    warnings.warn(
        f"group_size={group_size}: transformers' default 4-bit CPU kernels (gptqmodel's TorchAtenLinear / "
        f"TorchFusedLinear) cannot run this checkpoint (torch's int4 matmul takes groups of "
        f"{', '.join(map(str, CPU_INT4_GROUP_SIZES))}; in-features here: {', '.join(map(str, widths))}); on CPU "
        f"load it with GPTQConfig(bits=4, backend='gptq_torch'), or quantize with group_size "
        f"{' or '.join(map(str, runs)) or '(none fits these widths)'}.",
        stacklevel=3,
    )


def _load_tokenizer(source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"No tokenizer could be loaded from {str(source)!r} ({error}); gptqmodel needs one: pass tokenizer=."
        ) from None


@contextlib.contextmanager
def _working_directory(path):
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """gptqmodel's packed GPTQ layers by module name."""
    layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "qzeros") and hasattr(module, "g_idx"):
            if getattr(module, "planar", False):
                raise ValueError(f"{name}: gptqmodel's planar packing is not supported; use the standard GPTQ format.")
            layers[name] = module
    return layers


def _source_folder(source) -> Path:
    """The local folder of the float checkpoint gptqmodel loaded: `source`, or for a hub id its snapshot in the
    local cache (where gptqmodel's load put the files)."""
    folder = Path(source)
    if folder.exists():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=["*.safetensors", "*.json"]))


def _carry_files(source: Path, staging: Path) -> None:
    """Write the `CARRIED_FILES` of the input checkpoint into `staging` as they were (gptqmodel's save rewrites the
    generation config: `do_sample` becomes true); one the input does not have is not written either."""
    for name in CARRIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
        else:
            (staging / name).unlink(missing_ok=True)


#: Weights `_restore_zeros` and `_verify_pruned_codes` unpack at a time (a block of output columns): their int32 and
#: int64 working tensors (~30 bytes per weight) then take ~60 MB, not ~30 bytes per weight of the largest layer.
CHUNK_WEIGHTS = 1 << 21


def _column_chunks(rows: int, columns: int) -> list[slice]:
    """Blocks of output columns of about `CHUNK_WEIGHTS` weights for a layer of `rows` inputs; each but the last a
    multiple of 16 columns (a whole number of `qzeros` words at 2, 4 and 8 bits)."""
    step = max(16, CHUNK_WEIGHTS // max(rows, 1) // 16 * 16)
    return [slice(start, start + step) for start in range(0, columns, step)]


def _tensor_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """`{tensor name: safetensors file of folder that holds it}`, from the files' headers (no tensor is read)."""
    from safetensors import safe_open

    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name not in skip:
            with safe_open(str(file), "pt") as handle:
                files.update(dict.fromkeys(handle.keys(), file))
    return files


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, opened for it alone: a handle kept open for many tensors keeps every page it
    has read mapped, and so resident (a whole shard's worth by the last tensor)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return handle.get_tensor(key)


def _read_masks(folder: Path, layers: Mapping[str, object]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(layer name, weight != 0)` (out × in, bool) from the float checkpoint in `folder` for each of `layers`, in
    their order, one layer read at a time. Raises before reading any weight if one is missing."""
    files = _tensor_files(folder)
    missing = sorted(name for name in layers if f"{name}.weight" not in files)
    if missing:
        raise RuntimeError(
            f"The float weights of {missing[:3]} were not found in the safetensors files of {str(folder)!r}; "
            "save the model with safetensors (save_pretrained does by default) and try again."
        )
    return ((name, _read_tensor(files[f"{name}.weight"], f"{name}.weight") != 0) for name in layers)


def _restore_zeros(layer: nn.Module, mask: torch.Tensor) -> tuple[int, int, int]:
    """Set the code of every pruned weight (`mask` False) of a gptqmodel layer (packed in the v2 format, `z`) to its
    group's zero-point, in place, a block of output columns at a time (`CHUNK_WEIGHTS`). Returns (pruned, total,
    how many pruned weights GPTQ had filled)."""
    bits, rows, out = layer.bits, layer.g_idx.shape[0], layer.scales.shape[1]
    check_bits(bits)
    if mask.shape != (out, rows):
        raise RuntimeError(f"mask {tuple(mask.shape)} does not fit the layer ({out} × {rows})")
    zeros = zero_points(layer.qzeros, bits, out, 2)  # (groups, out)
    groups = layer.g_idx.long()
    filled = 0
    for columns in _column_chunks(rows, out):
        codes = unpack_rows(layer.qweight[:, columns], bits, rows)  # (in, columns)
        pruned = ~mask[columns].T.to(codes.device)
        target = zeros[:, columns][groups]  # (in, columns): the zero-point of each weight's group
        refill = int(torch.count_nonzero(pruned & (codes != target)))
        if refill:
            filled += refill
            packed = pack_rows(torch.where(pruned, target, codes), bits)
            layer.qweight.data[:, columns] = packed[: layer.qweight.shape[0]]
    return mask.numel() - int(torch.count_nonzero(mask)), mask.numel(), filled  # (a bool sum copies to int64)


def _choose_checkpoint_format(quantizer, layers: dict[str, nn.Module]) -> str:
    """Write "gptq" (v1, `z − 1`: the format every GPTQ reader takes) when every zero-point is at least 1, converting
    the layers' `qzeros` in place; else keep "gptq_v2" (`z`; transformers loads it through gptqmodel), since v1
    cannot store a zero-point of 0 (asymmetric groups whose weights are all of one sign, frequent in sparse models).
    The zero-points are unpacked one layer at a time."""
    from gptqmodel.quantization import FORMAT

    def zeros(layer: nn.Module) -> torch.Tensor:  # (groups, out)
        return zero_points(layer.qzeros, layer.bits, layer.scales.shape[1], 2)

    if any(int(zeros(layer).min()) < 1 for layer in layers.values()):
        return "gptq_v2"
    for layer in layers.values():
        layer.qzeros.data.copy_(pack_cols(zeros(layer) - 1, layer.bits))
    quantizer.quantize_config.format = FORMAT.GPTQ
    return "gptq"


def _verify_pruned_codes(directory: Path, masks: Mapping[str, torch.Tensor], bits: int) -> None:
    """Every pruned weight of the saved checkpoint dequantizes to exactly 0, for each layer of `masks` (module name:
    bool (out × in) mask, e.g. the saved mask file read back). One layer's tensors are read at a time, and
    dequantized a block of output columns at a time (`CHUNK_WEIGHTS`)."""
    from .packing import dequantize

    config = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    zero_format = 2 if config.get("checkpoint_format", config.get("format")) == "gptq_v2" else 1
    files = _tensor_files(directory, skip=(MASK_FILE,))
    per_word = 32 // bits
    for name, mask in masks.items():
        keys = [f"{name}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")]
        if any(key not in files for key in keys):
            raise RuntimeError(f"The saved checkpoint lacks the GPTQ tensors of {name}; nothing was written.")
        qweight, qzeros, scales, g_idx = (_read_tensor(files[key], key) for key in keys)
        for columns in _column_chunks(g_idx.shape[0], scales.shape[1]):
            words = slice(columns.start // per_word, columns.stop // per_word)
            weight = dequantize(qweight[:, columns], qzeros[:, words], scales[:, columns], g_idx, bits, zero_format)
            if bool((weight[~mask[columns]] != 0).any()):
                raise RuntimeError(
                    f"{name}: pruned weights do not dequantize to 0 in the saved checkpoint; nothing was written."
                )


__all__ = ["QuantizationReport", "quantize_gptq"]
