"""Importance ordering for Mode B (Sukthanker et al.): permute MLP channels and attention heads so that the first
ones — the ones every narrower subnetwork keeps — are the most important, without changing what the model computes.

An MLP channel `j` lives in row `j` of every producer (gate, up) and column `j` of every consumer (down); moving it
everywhere at once leaves the output unchanged. Attention heads move as whole key/value groups (a key/value head
with the query heads that read it, rows of q, k, v and columns of o), which keeps grouped-query attention intact;
rotary embeddings act on each head alike. Importance of a channel or group:

- `"magnitude"`: `‖W_c[:, j]‖₂ · mean over producers of ‖W_p[j, :]‖₂` (its output weights times its input weights;
  for attention the producer is the query projection), summed over a head group's channels;
- `"activation"` (with calibration data): `‖X_j‖₂ · ‖W_c[:, j]‖₂`, with `‖X_j‖₂` the norm of the consumer's input
  channel `j` over the calibration tokens (as Wanda scores weights), summed over a head group's channels.

Apply it to the base model before `get_peft_model` (and before training). The returned `{block: order}` (save it as
JSON) reproduces the ordered base from the original one with `apply_importance_order`.

A Mode B adapter belongs to the base it was trained on: its *base fingerprint* (`base_fingerprint`, a few row norms
and projections of each elastic producer's weight, saved in its config) is checked when it is loaded and exported
(`check_base_fingerprint`), so that an adapter of an ordered base is not used on the original one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .sparsity.calibration import calibration_batches
from .tuners.elastic_lora.config import DEFAULT_HEAD_MODULES, DEFAULT_WIDTH_MODULES

METHODS = ("magnitude", "activation")


@dataclasses.dataclass
class _Block:
    """One permutable unit: an MLP (`unit` 1: channels) or an attention block (`unit`: a key/value group's
    channels in q/o; `kv_unit`: its channels in k/v)."""

    parent: str
    producers: list[nn.Linear]
    consumers: list[nn.Linear]
    unit: int = 1
    kv_unit: int = 0  # attention: channels of one key/value head (the k/v producers are the last two)


def reorder_by_importance(
    model: nn.Module,
    calibration_data=None,
    *,
    method: str | None = None,
    tokenizer=None,
    width_modules=DEFAULT_WIDTH_MODULES,
    head_modules=DEFAULT_HEAD_MODULES,
    text_column: str = "text",
    max_length: int = 512,
    num_samples: int = 128,
    progress: bool = True,
) -> dict[str, list[int]]:
    """Permute, in place, the MLP channels and attention key/value groups of every block of `model` (a plain
    transformers model) by decreasing importance. `method`: "magnitude" (default without calibration data) or
    "activation" (default with it; calibration data as for `sparsify`). `progress`: show progress bars over the
    calibration batches and the blocks. Returns `{block: new order}` (the old index of each new position: channels
    for MLPs, key/value groups for attention)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError(
            "reorder_by_importance permutes the base model's weights: call it on the model before get_peft_model."
        )
    method = method or ("magnitude" if calibration_data is None else "activation")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    if method == "activation" and calibration_data is None:
        raise ValueError("method='activation' needs calibration_data (method='magnitude' does not).")
    blocks = _blocks(model, width_modules, head_modules)
    if not blocks:
        raise ValueError(
            f"No MLP ({list(width_modules)}) or attention ({list(head_modules)}) block of torch.nn.Linear layers was "
            "found in this model; set width_modules/head_modules to its module-name suffixes."
        )
    norms = None
    if method == "activation":
        batches = calibration_batches(
            calibration_data, tokenizer, text_column=text_column, max_length=max_length, num_samples=num_samples
        )
        norms = _consumer_input_norms(model, blocks, batches, progress)
    orders = {}
    with torch.no_grad():
        for block in tqdm(blocks, desc="importance (reordering)", unit="block", disable=not progress):
            scores = _scores(block, None if norms is None else norms[block.parent])
            order = torch.argsort(scores, descending=True, stable=True)
            _permute(block, order)
            orders[block.parent] = order.tolist()
    return orders


def apply_importance_order(
    model: nn.Module,
    order: Mapping[str, Sequence[int]],
    *,
    width_modules=DEFAULT_WIDTH_MODULES,
    head_modules=DEFAULT_HEAD_MODULES,
) -> None:
    """Permute, in place, the blocks of `model` (a plain transformers model) by `order`, a `{block: new order}` that
    `reorder_by_importance` returned for the same model (e.g. saved as JSON next to the adapter and read back): the
    original base, as loaded, becomes the importance-ordered one, bit for bit. Apply it once, to the original base
    (applying it to an ordered base permutes it again). Blocks not in `order` stay as they are."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError(
            "apply_importance_order permutes the base model's weights: call it on the model before "
            "get_peft_model / PeftModel.from_pretrained."
        )
    blocks = {block.parent: block for block in _blocks(model, width_modules, head_modules)}
    unknown = [name for name in order if name not in blocks]
    if unknown:
        raise ValueError(
            f"apply_importance_order: {unknown[0]!r} is not a block of this model (its blocks: "
            f"{_abridged(list(blocks), 4)}); pass the order reorder_by_importance returned for this model, with the "
            "same width_modules/head_modules."
        )
    checked = {}
    for name, new_order in order.items():
        block = blocks[name]
        units = block.producers[0].out_features // block.unit
        positions = [int(i) for i in new_order]
        if sorted(positions) != list(range(units)):
            what = "key/value groups" if block.kv_unit else "channels"
            raise ValueError(
                f"apply_importance_order: the order of {name!r} must be a permutation of its {units} {what} "
                f"(0..{units - 1}), got {len(positions)} entries: {_abridged(positions)}."
            )
        checked[name] = torch.tensor(positions)
    with torch.no_grad():
        for name, positions in checked.items():
            _permute(blocks[name], positions)


def _abridged(values: list, count: int = 8) -> str:
    return f"{values[:count]}"[:-1] + (", ...]" if len(values) > count else "]")


def _blocks(model: nn.Module, width_modules, head_modules) -> list[_Block]:
    (mlp_out, mlp_in), (attn_out, attn_in) = width_modules, head_modules
    blocks = []

    def linear(children: dict[str, nn.Module], suffixes) -> list[nn.Linear] | None:
        found = [children.get(s) for s in suffixes]
        return found if all(type(m) is nn.Linear for m in found) else None

    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        producers, consumers = linear(children, mlp_out), linear(children, mlp_in)
        if producers and consumers:
            blocks.append(_Block(parent_name, producers, consumers))
        producers, consumers = linear(children, attn_out), linear(children, attn_in)
        head_dim = getattr(parent, "head_dim", None)
        if producers and consumers and isinstance(head_dim, int):
            query, key, _ = producers
            per_kv = query.out_features // key.out_features
            blocks.append(_Block(parent_name, producers, consumers, unit=per_kv * head_dim, kv_unit=head_dim))
    return blocks


def _consumer_input_norms(model, blocks, batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """`{block: ‖X_j‖₂ over the calibration tokens}` of the first consumer's input channels."""
    squares = {block.parent: None for block in blocks}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            total = x.pow(2).sum(dim=0)
            squares[name] = total if squares[name] is None else squares[name] + total

        return record

    handles = [block.consumers[0].register_forward_pre_hook(hook(block.parent)) for block in blocks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="importance (calibration)", unit="batch", disable=not progress):
                model(**{k: v.to(model.device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: total.sqrt() for name, total in squares.items()}


def _scores(block: _Block, input_norms: torch.Tensor | None) -> torch.Tensor:
    """Importance of each unit of `block` (channel, or key/value group)."""
    out_weight = sum(c.weight.float().norm(dim=0) for c in block.consumers)  # (channels,)
    if input_norms is None:
        producers = block.producers[:1] if block.kv_unit else block.producers
        in_weight = sum(p.weight.float().norm(dim=1) for p in producers) / len(producers)
        channel = out_weight * in_weight
    else:
        channel = out_weight * input_norms.to(out_weight.device)
    return channel.reshape(-1, block.unit).sum(dim=1)


def _permute(block: _Block, order: torch.Tensor) -> None:
    """Move unit `order[i]` to position `i` in every producer (rows) and consumer (columns)."""

    def index(unit: int) -> torch.Tensor:
        return (order.view(-1, 1) * unit + torch.arange(unit)).reshape(-1)

    main = index(block.unit)
    kv = index(block.kv_unit) if block.kv_unit else main
    for position, producer in enumerate(block.producers):
        rows = kv if block.kv_unit and position > 0 else main  # attention: k and v move by key/value head
        producer.weight.copy_(producer.weight[rows.to(producer.weight.device)])
        if producer.bias is not None:
            producer.bias.copy_(producer.bias[rows.to(producer.bias.device)])
    for consumer in block.consumers:
        consumer.weight.copy_(consumer.weight[:, main.to(consumer.weight.device)])


# ------------------------------------------------------------------------------------------ base fingerprint

#: Rows read from each fingerprinted weight: evenly spaced, the first and the last included.
FINGERPRINT_ROWS = 8
#: How far a row's norm and projection may move, relative to its norm, and still count as the same row: loading the
#: same weights in bfloat16 (8 significant bits) moves them by about 0.2 % of the norm, another row by tens of percent.
FINGERPRINT_TOLERANCE = 2e-2


def base_fingerprint(layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """`{module name: fingerprint}` of the base weights of `layers` (`nn.Linear` layers, or adapter layers wrapping
    one; others, and weights on the meta device, are left out). For a weight `W` (out × in) it reads
    `FINGERPRINT_ROWS` evenly spaced rows `i` and records each row's L2 norm and its projection `W[i] · v` on a fixed
    ±1 vector `v`, as `"<out>x<in> i:norm,projection ..."`: `FINGERPRINT_ROWS · in` weights per layer, any dtype."""
    fingerprint = {}
    for name, layer in layers.items():
        weight = _fingerprinted_weight(layer)
        if weight is None:
            continue
        out_features, in_features = weight.shape
        rows = [k * (out_features - 1) // (FINGERPRINT_ROWS - 1) for k in range(FINGERPRINT_ROWS)]
        rows = sorted(set(rows))
        stats = " ".join(f"{i}:{n:.6g},{p:.6g}" for i, (n, p) in zip(rows, _row_stats(weight, rows), strict=True))
        fingerprint[name] = f"{out_features}x{in_features} {stats}"
    return fingerprint


def check_base_fingerprint(model: nn.Module, fingerprint: Mapping[str, str], adapter_name: str) -> None:
    """Raise a `ValueError` naming the first layer of `model` (its module names as in `fingerprint`) whose weight
    does not match `fingerprint` (see `base_fingerprint`), and the fix. Layers that cannot be read (not `nn.Linear`,
    on the meta device, or holding merged adapters) are not checked."""
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    differing = []
    for name in sorted(fingerprint, key=lambda n: position.get(n, -1)):
        shape, rows = _parsed_fingerprint(name, fingerprint[name])
        if name not in position:
            differing.append(f"{name!r} (not a module of this model)")
            continue
        weight = _fingerprinted_weight(model.get_submodule(name))
        if weight is None:
            continue
        if tuple(weight.shape) != shape:
            differing.append(f"{name!r} (shape {weight.shape[0]}x{weight.shape[1]}, {shape[0]}x{shape[1]} saved)")
            continue
        now = _row_stats(weight, [i for i, _, _ in rows])
        for (i, norm, projection), (norm_now, projection_now) in zip(rows, now, strict=True):
            scale = FINGERPRINT_TOLERANCE * max(norm, norm_now)
            if abs(norm - norm_now) > scale or abs(projection - projection_now) > scale:
                differing.append(f"{name!r} (row {i})")
                break
    if not differing:
        return
    others = f"and {len(differing) - 1} more" if len(differing) > 1 else "1"
    raise ValueError(
        f"Adapter {adapter_name!r} does not fit this base model: its base_fingerprint (taken from the base it was "
        f"trained on) differs at {differing[0]}, {others} of its {len(fingerprint)} fingerprinted layers. A Mode B "
        "adapter slices the base by channel and head position, so it only works on the base it was trained on, "
        "usually one ordered by peft_elastic.reorder_by_importance: pass that ordered base (e.g. the folder it was "
        "saved to), or order this one as it was, peft_elastic.importance.apply_importance_order(base, order), with "
        "the {block: order} reorder_by_importance returned (e.g. json.load of the importance_order.json saved next "
        "to the adapter). To use the adapter on this base anyway, give it a config whose base_fingerprint is None."
    )


def _fingerprinted_weight(layer: nn.Module) -> torch.Tensor | None:
    """The base weight (out × in) of `layer`, or None when it cannot be fingerprinted as it is."""
    if getattr(layer, "merged", False):  # an adapter layer whose base weight holds merged updates
        return None
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if type(base) is not nn.Linear or base.weight.is_meta:
        return None
    return base.weight


def _row_stats(weight: torch.Tensor, rows: list[int]) -> list[tuple[float, float]]:
    """`(‖W[i]‖₂, W[i] · v)` of each row `i`, in float32 on the CPU; `v_j = ±1` by the top bit of Knuth's
    multiplicative hash of `j` (fixed, no random state)."""
    with torch.no_grad():
        picked = weight.detach()[torch.tensor(rows, device=weight.device)].cpu().float()  # (rows, in)
        j = torch.arange(weight.shape[1], dtype=torch.int64)
        probe = 1.0 - 2.0 * ((j * 2654435769) % 2**32 >= 2**31).float()  # (in,)
        return list(zip(picked.norm(dim=1).tolist(), (picked @ probe).tolist(), strict=True))


def _parsed_fingerprint(name: str, entry: str) -> tuple[tuple[int, int], list[tuple[int, float, float]]]:
    try:
        shape, *stats = entry.split()
        out_features, in_features = (int(size) for size in shape.split("x"))
        rows = []
        for stat in stats:
            row, values = stat.split(":")
            norm, projection = values.split(",")
            rows.append((int(row), float(norm), float(projection)))
    except (AttributeError, ValueError):
        raise ValueError(
            f"base_fingerprint[{name!r}] = {entry!r} is not a fingerprint ('<out>x<in> row:norm,projection ...', as "
            "peft_elastic writes it); set base_fingerprint to None to skip the check."
        ) from None
    if not rows or any(not 0 <= row < out_features for row, _, _ in rows):
        raise ValueError(f"base_fingerprint[{name!r}] = {entry!r} lists rows outside 0..{out_features - 1}.")
    return (out_features, in_features), rows
