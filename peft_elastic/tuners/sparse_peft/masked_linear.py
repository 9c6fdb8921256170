"""The masked low-rank update of SparsePEFT as one autograd function, and the bit-packed mask it uses.

SQFT's adapter update is `ΔW = s · (B A) ⊙ M` with `M = (W ≠ 0)`, so that merging keeps the base's zeros. Written
with autograd (`x Wᵀ + x ((B A) s ⊙ M)ᵀ`) it keeps the dense `B A`, the masked product and the mask alive for the
backward pass and runs two dense matmuls forward. `MaskedLowRankLinear` instead

- forward: builds `W_eff = W + s · (B A) ⊙ M` in a scratch buffer and computes `y = x W_effᵀ + b` with one matmul
  (or `y = x ΔWᵀ` when no base weight is given, for bases that run their own matmul);
- backward: rebuilds `W_eff` for `∂L/∂x = g W_eff`, and with `G = s · (gᵀ x) ⊙ M` (in the same buffer) gives
  `∂L/∂B = G Aᵀ` and `∂L/∂A = Bᵀ G`. It saves only `x`, `A`, `B` (and references to `W` and the packed mask).

So a step costs LoRA's matmuls plus one weight-sized gradient matmul `gᵀ x` and four rank-`k` products, and keeps no
weight-sized tensor between forward and backward. The weight-sized temporaries (the effective weight or `G`, and the
0/1 mask) live in two scratch buffers that are reused from call to call (`peft_elastic.scratch`): on CPU, a fresh
weight-sized tensor costs more in page faults than the arithmetic done in it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...quantization.packing import unpack_mask
from ...scratch import scratch


def _mask_into(out, packed_mask, in_features, weight) -> torch.Tensor:
    """`M` as 0/1 in `out`'s dtype, written into `out` (bool arithmetic is several times slower on CPU). With a dense
    float `W`, `M` is read from `W` itself (`W ≠ 0`, one pass) instead of unpacking the cached mask: the two agree
    while the adapter is unmerged, which is when this runs."""
    if weight is not None:
        return torch.ne(weight, 0, out=out)
    return out.copy_(unpack_mask(packed_mask, in_features))


def _effective_into(out, mask, weight_a, weight_b, scaling, weight) -> torch.Tensor:
    """`W + s · (B A) ⊙ M` (or `s · (B A) ⊙ M` without `W`) written into `out` (out × in, dtype of `weight_a`)."""
    torch.mm(weight_b * scaling, weight_a, out=out)  # the scaling on the small factor: no extra weight-sized pass
    if weight is None:
        return out.mul_(mask)
    return torch.addcmul(weight, out, mask, out=out)


def _scratch_pair(weight_a, weight_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (out × in) temporaries in the dtype of the factors: the effective weight (or `G`) and the mask."""
    shape = (weight_b.shape[0], weight_a.shape[1])
    return tuple(scratch(shape, weight_a.dtype, weight_a.device, slot) for slot in (0, 1))


class MaskedLowRankLinear(torch.autograd.Function):
    """`y = x (W + s · (B A) ⊙ M)ᵀ + bias`, or `y = x (s · (B A) ⊙ M)ᵀ` when `weight` is None.

    `weight` (dense, float, with the zero pattern of the mask) and `bias` are frozen (no gradient). `weight_a`
    (k × in) and `weight_b` (out × k) may be slices of larger factors; their gradients flow back into those. All
    math runs in the dtype of `weight_a`. The weight-sized temporaries live in reused scratch buffers (see
    `peft_elastic.scratch`) and none is kept between forward and backward."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
        effective, mask = _scratch_pair(weight_a, weight_b)
        _mask_into(mask, packed_mask, in_features, weight)
        _effective_into(effective, mask, weight_a, weight_b, scaling, weight)
        out = x.to(effective.dtype) @ effective.T
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(x, weight_a, weight_b, packed_mask, weight)
        ctx.in_features, ctx.scaling = in_features, scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight_a, weight_b, packed_mask, weight = ctx.saved_tensors
        scaling = ctx.scaling
        grad_out = grad_out.to(weight_a.dtype)
        grad_x = grad_a = grad_b = None
        work, mask = _scratch_pair(weight_a, weight_b)
        _mask_into(mask, packed_mask, ctx.in_features, weight)
        if ctx.needs_input_grad[0]:
            _effective_into(work, mask, weight_a, weight_b, scaling, weight)
            grad_x = (grad_out @ work).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            flat_x = x.reshape(-1, x.shape[-1]).to(weight_a.dtype)
            grad_delta = torch.mm(flat_grad.T, flat_x, out=work).mul_(mask)  # (out × in); the scaling on the factors
            if ctx.needs_input_grad[1]:
                grad_a = (weight_b * scaling).T @ grad_delta
            if ctx.needs_input_grad[2]:
                grad_b = (grad_delta @ weight_a.T).mul_(scaling)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def masked_low_rank_linear(x, weight_a, weight_b, packed_mask, in_features, scaling, weight=None, bias=None):
    """Functional form of `MaskedLowRankLinear`."""
    return MaskedLowRankLinear.apply(x, weight_a, weight_b, packed_mask, in_features, scaling, weight, bias)
