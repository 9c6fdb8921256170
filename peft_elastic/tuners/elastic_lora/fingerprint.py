"""A Mode B adapter's *base fingerprint*: a few row norms and projections of each elastic producer's base weight,
saved in the adapter's config (`ElasticLoraConfig.base_fingerprint`) and checked whenever the adapter is loaded or
exported, so that an adapter trained on an importance-ordered base (`peft_elastic.reorder_by_importance`) is not used
on the original one. The tuner takes and checks it; `peft_elastic.importance` re-exports it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

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
