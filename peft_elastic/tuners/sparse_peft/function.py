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


def masked_delta(weight_a: torch.Tensor, weight_b: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """`s · (B A) ⊙ M` (out × in)."""
    delta = weight_b @ weight_a
    delta.mul_(mask)
    if scaling != 1:
        delta.mul_(scaling)
    return delta


class MaskedLowRankLinear(torch.autograd.Function):
    """`y = x (W + s · (B A) ⊙ M)ᵀ + bias`, or `y = x (s · (B A) ⊙ M)ᵀ` when `weight` is None.

    `weight` and `bias` are frozen (no gradient). `weight_a` (k × in) and `weight_b` (out × k) may be slices of
    larger factors; their gradients flow back into those. All math runs in the dtype of `weight_a`."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
        mask = unpack_mask(packed_mask, in_features)
        effective = masked_delta(weight_a, weight_b, mask, scaling)
        del mask
        if weight is not None:
            effective.add_(weight.to(effective.dtype))
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
        mask = unpack_mask(packed_mask, ctx.in_features)
        grad_out = grad_out.to(dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            effective = masked_delta(weight_a, weight_b, mask, scaling)
            if weight is not None:
                effective.add_(weight.to(dtype))
            grad_x = (grad_out @ effective).to(x.dtype)
            del effective
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_delta = flat_grad.T @ flat_x  # (out × in)
            grad_delta.mul_(mask)
            if scaling != 1:
                grad_delta.mul_(scaling)
            if ctx.needs_input_grad[1]:
                grad_a = weight_b.T @ grad_delta
            if ctx.needs_input_grad[2]:
                grad_b = grad_delta @ weight_a.T
        return grad_x, grad_a, grad_b, None, None, None, None, None


def masked_low_rank_linear(x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
    """Functional form of `MaskedLowRankLinear`."""
    return MaskedLowRankLinear.apply(x, weight_a, weight_b, packed_mask, in_features, scaling, weight, bias)
