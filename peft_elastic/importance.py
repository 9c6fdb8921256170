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
(`check_base_fingerprint`), so that an adapter of an ordered base is not used on the original one. The tuner takes
and checks it (`peft_elastic.tuners.elastic_lora.fingerprint`); this module re-exports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_batches
from .tuners.elastic_lora.config import DEFAULT_HEAD_MODULES, DEFAULT_WIDTH_MODULES
from .tuners.elastic_lora.fingerprint import (  # noqa: F401  (the fingerprint's public home is this module)
    FINGERPRINT_ROWS,
    FINGERPRINT_TOLERANCE,
    base_fingerprint,
    check_base_fingerprint,
)
from .tuners.elastic_lora.space import children_by_parent

IMPORTANCE_METHODS = ("magnitude", "activation")


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
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {list(IMPORTANCE_METHODS)}, got {method!r}.")
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
    """The permutable units of a base `model`: each parent module holding all of `width_modules` (an MLP) or all of
    `head_modules` (an attention block with a `head_dim`) as torch.nn.Linear layers, as Mode B finds them."""
    (mlp_out, mlp_in), (attn_out, attn_in) = width_modules, head_modules
    blocks = []

    def linear(members, suffixes) -> list[nn.Linear] | None:
        return [members[s][1] for s in suffixes] if all(s in members for s in suffixes) else None

    for parent_name, members in children_by_parent(model, lambda module: type(module) is nn.Linear).items():
        producers, consumers = linear(members, mlp_out), linear(members, mlp_in)
        if producers and consumers:
            blocks.append(_Block(parent_name, producers, consumers))
        producers, consumers = linear(members, attn_out), linear(members, attn_in)
        head_dim = getattr(model.get_submodule(parent_name), "head_dim", None)
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
