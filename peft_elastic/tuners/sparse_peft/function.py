"""The masked low-rank update of SparsePEFT as one autograd function, and the bit-packed mask it uses.

SQFT's adapter update is `ΔW = s · (B A) ⊙ M` with `M = (W ≠ 0)`, so that merging keeps the base's zeros. Written
with autograd (`x Wᵀ + x ((B A) s ⊙ M)ᵀ`) it keeps the dense `B A`, the masked product and the mask alive for the
backward pass and runs two dense matmuls forward. `MaskedLowRankLinear` instead

- forward: builds `W_eff = W + s · (B A) ⊙ M` in one temporary, computes `y = x W_effᵀ + b` with one matmul and
  frees it (or `y = x ΔWᵀ` when no base weight is given, for bases that run their own matmul);
- backward: rebuilds `W_eff` for `∂L/∂x = g W_eff`, and with `G = s · (gᵀ x) ⊙ M` gives `∂L/∂B = G Aᵀ` and
  `∂L/∂A = Bᵀ G`. It saves only `x`, `A`, `B` (and references to `W` and the packed mask).

So a step costs LoRA's matmuls plus one weight-sized gradient matmul `gᵀ x` and two rank-`k` products, and keeps no
weight-sized tensor between forward and backward.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool (out × in) mask as uint8 (out × ceil(in / 8)): bit `j % 8` of byte `j // 8` is `mask[:, j]`."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    shifts = _SHIFTS.to(mask.device)
    return (padded.reshape(rows, -1, 8) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool (out × cols) mask that `pack_mask` packed."""
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def _float_mask(packed_mask, in_features, weight, dtype) -> torch.Tensor:
    """`M` as 0/1 in `dtype` (bool arithmetic is several times slower on CPU). With a dense float `W`, `M` is read
    from `W` itself (`|sign(W)|`, one pass) instead of unpacking the cached mask: the two agree while the adapter is
    unmerged, which is when this runs."""
    if weight is not None:
        return weight.sign().abs_().to(dtype)
    shifts = _SHIFTS.to(packed_mask.device)
    bits = (packed_mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed_mask.shape[0], -1)[:, :in_features].to(dtype)


def _effective(weight_a, weight_b, scaling, mask, weight):
    """`W + s · (B A) ⊙ M` (or `s · (B A) ⊙ M` without `W`), in the dtype of `weight_a`."""
    delta = (weight_b * scaling) @ weight_a  # the scaling on the small factor: no extra weight-sized pass
    if weight is None:
        return delta.mul_(mask)
    return torch.addcmul(weight.to(delta.dtype), delta, mask)


class MaskedLowRankLinear(torch.autograd.Function):
    """`y = x (W + s · (B A) ⊙ M)ᵀ + bias`, or `y = x (s · (B A) ⊙ M)ᵀ` when `weight` is None.

    `weight` (dense, float, with the zero pattern of the mask) and `bias` are frozen (no gradient). `weight_a`
    (k × in) and `weight_b` (out × k) may be slices of larger factors; their gradients flow back into those. All
    math runs in the dtype of `weight_a`."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
        mask = _float_mask(packed_mask, in_features, weight, weight_a.dtype)
        effective = _effective(weight_a, weight_b, scaling, mask, weight)
        del mask
        out = x.to(effective.dtype) @ effective.T
        del effective
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(x, weight_a, weight_b, packed_mask, weight)
        ctx.in_features, ctx.scaling = in_features, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, packed_mask, weight = ctx.saved_tensors
        scaling, dtype = ctx.scaling, weight_a.dtype
        grad_out = grad_out.to(dtype)
        grad_x = grad_a = grad_b = None
        mask = _float_mask(packed_mask, ctx.in_features, weight, dtype)
        if ctx.needs_input_grad[0]:
            effective = _effective(weight_a, weight_b, scaling, mask, weight)
            grad_x = (grad_out @ effective).to(x.dtype)
            del effective
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_delta = (flat_grad.T @ flat_x).mul_(mask)  # (out × in), masked; the scaling goes on the factors
            if ctx.needs_input_grad[1]:
                grad_a = (weight_b * scaling).T @ grad_delta
            if ctx.needs_input_grad[2]:
                grad_b = (grad_delta @ weight_a.T).mul_(scaling)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def masked_low_rank_linear(x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
    """Functional form of `MaskedLowRankLinear`."""
    return MaskedLowRankLinear.apply(x, weight_a, weight_b, packed_mask, in_features, scaling, weight, bias)
