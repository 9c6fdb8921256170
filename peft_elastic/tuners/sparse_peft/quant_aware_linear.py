"""QA-SparsePEFT: the masked low-rank update trained against the frozen GPTQ grid of the base, with a
straight-through estimator, and merged into the integer weights (SQFT, Muñoz et al. 2024).

For a GPTQ base with codes `q`, per-group scales `S` and zero-points `Z` (`W = S · (q − Z)`), `b` bits and the
update `ΔW = s · (B A) ⊙ M`, SQFT trains with the merged, fake-quantized weight

    Ŵ = clamp(round((W + ΔW) / S) + Z, 0, 2ᵇ − 1),    W̃ = S · (Ŵ − Z),

and merging writes `Ŵ` into `qweight` with `S`, `Z` and `g_idx` untouched. Since `(W + ΔW) / S + Z = q + ΔW / S`
exactly and `q` is an integer, this computes `Ŵ = clamp(q + ⌊ΔW / S + ½⌋, 0, 2ᵇ − 1)` (rounding half up), straight
from the packed codes: the base is never dequantized into a float copy, and a zero update gives back `q` bit for
bit. Rounding passes the gradient straight through; the clamp passes it only where `Ŵ` was not clipped:
`∂L/∂ΔW = (∂L/∂W̃) ⊙ [0 ≤ q + ⌊ΔW / S + ½⌋ ≤ 2ᵇ − 1]`.

Everything runs in the GPTQ (in × out) layout, so `y = x W̃ + bias` is one matmul without a transpose, and in
float32 (the scales times small integers are exact there). Between forward and backward the function keeps `Ŵ` as
uint8 and the gradient pattern (`M` and not clipped) as bool: 2 bytes per weight, what stock LoRA on the same GPTQ
layer keeps (its dequantized bfloat16 weight).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from ...quantization.packing import unpack_mask
from ...scratch import scratch

_WORD_BITS = 32


@dataclasses.dataclass(frozen=True)
class QuantGrid:
    """The frozen GPTQ grid of one layer. `qweight` (in / pf × out) int32 codes packed along the rows, `scales` and
    `zeros` (groups × out) float32, `group_size` > 0 when input `i` is in group `i // group_size` (a reshape then
    broadcasts the per-group values), else `g_idx` (in,) long for act-order."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    in_features: int
    group_size: int
    g_idx: torch.Tensor | None
    dtype: torch.dtype = torch.float32

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (in × out) as a view that the per-group tensors of `per_group` broadcast against."""
        if self.g_idx is not None:
            return weight
        return weight.view(-1, self.group_size, weight.shape[1])

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        """`scales` or `zeros` (groups × out) shaped to broadcast against `grouped(...)`."""
        return values[self.g_idx] if self.g_idx is not None else values.unsqueeze(1)

    def codes_into(self, out: torch.Tensor) -> torch.Tensor:
        """The integer codes `q` (in × out) unpacked into `out` (float32, in × out)."""
        pf = _WORD_BITS // self.bits
        words, cols = self.qweight.shape
        shifts = torch.arange(0, _WORD_BITS, self.bits, dtype=torch.int32, device=self.qweight.device)
        unpacked = scratch((words, pf, cols), torch.int32, self.qweight.device, slot=2)
        torch.bitwise_right_shift(self.qweight.unsqueeze(1), shifts.view(1, -1, 1), out=unpacked)
        unpacked.bitwise_and_(self.maxq)
        return out.copy_(unpacked.view(-1, cols)[: self.in_features])


def grid_of(layer, scales_dtype: torch.dtype = torch.float32) -> QuantGrid:
    """The `QuantGrid` of a standard-layout gptqmodel layer (see `peft_elastic.quantization.layers`)."""
    from ...quantization.layers import zeros

    g_idx = layer.g_idx.long()
    rows, groups = g_idx.shape[0], layer.scales.shape[0]
    size = -(-rows // groups)
    contiguous = rows % groups == 0 and torch.equal(g_idx, torch.arange(rows, device=g_idx.device) // size)
    return QuantGrid(
        qweight=layer.qweight,
        scales=layer.scales.detach().to(scales_dtype),
        zeros=zeros(layer).to(scales_dtype),
        bits=layer.bits,
        in_features=rows,
        group_size=size if contiguous else 0,
        g_idx=None if contiguous else g_idx,
        dtype=layer.scales.dtype,
    )


def requantize(grid: QuantGrid, delta: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given `delta` = `s · (B A)ᵀ` (in × out, float32, overwritten) and `mask` = `Mᵀ` (in × out, bool): the new
    codes `Ŵ` (in × out, uint8) and the gradient pattern `Mᵀ ⊙ [not clipped]` (bool). `delta` ends up holding
    `q + ⌊ΔW / S + ½⌋` clamped, as float32."""
    view = grid.grouped(delta)
    delta.mul_(mask)
    view.div_(grid.per_group(grid.scales)).add_(0.5).floor_()
    codes = grid.codes_into(scratch(delta.shape, torch.float32, delta.device, slot=1))
    delta.add_(codes)  # q + round(ΔW / S), not yet clamped
    flow = (delta >= 0).logical_and_(delta <= grid.maxq).logical_and_(mask)
    return delta.clamp_(0, grid.maxq).to(torch.uint8), flow


def dequantize_into(grid: QuantGrid, new_codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`W̃ = S · (Ŵ − Z)` (in × out, float32, rounded to `grid.dtype` as the layer's own kernel does) written into
    `out`. In float32 the product of a scale and a small integer is exact, so the rounding is the kernel's."""
    view = grid.grouped(out.copy_(new_codes))
    view.sub_(grid.per_group(grid.zeros)).mul_(grid.per_group(grid.scales))
    if grid.dtype != torch.float32:
        out.copy_(out.to(grid.dtype))
    return out


def delta_into(out: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`s · (B A)ᵀ = s · Aᵀ Bᵀ` (in × out, float32) written into `out`."""
    return torch.mm(weight_a.T.float() * scaling, weight_b.T.float(), out=out)


def _work(grid: QuantGrid, device: torch.device) -> torch.Tensor:
    return scratch((grid.in_features, grid.scales.shape[1]), torch.float32, device, slot=0)


class QuantAwareLowRankLinear(torch.autograd.Function):
    """`y = x W̃ + bias` with `W̃ = S · (clamp(q + ⌊s · ((B A) ⊙ M)ᵀ / S + ½⌋, 0, 2ᵇ − 1) − Z)` (in × out): the
    QA-SparsePEFT forward of one GPTQ layer. `packed_mask_t` is `Mᵀ` bit-packed (in × ⌈out / 8⌉, `pack_mask`).
    Gradients reach `x`, `weight_a` (k × in) and `weight_b` (out × k) — slices of the factors at an elastic rank."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling, grid, packed_mask_t, bias=None):
        # float32 under autocast too (TRL's SFTConfig turns bf16 autocast on by default, also on CPUs): in bfloat16
        # the update `s · B A` would round codes differently from the merge, and on CPUs without bfloat16 units the
        # matmul runs about ten times slower
        with torch.autocast(x.device.type, enabled=False):
            mask = unpack_mask(packed_mask_t, grid.scales.shape[1])
            weight = _work(grid, x.device)
            new_codes, flow = requantize(grid, delta_into(weight, weight_a, weight_b, scaling), mask)
            dequantize_into(grid, new_codes, weight)
            out = x.to(torch.float32) @ weight
            if bias is not None:
                out = out + bias.to(out.dtype)
        ctx.save_for_backward(x, weight_a, weight_b, new_codes, flow)
        ctx.scaling, ctx.grid = scaling, grid
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # float32, as the forward
            return QuantAwareLowRankLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight_a, weight_b, new_codes, flow = ctx.saved_tensors
        scaling, grid = ctx.scaling, ctx.grid
        grad_out = grad_out.to(torch.float32)
        grad_x = grad_a = grad_b = None
        work = _work(grid, grad_out.device)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ dequantize_into(grid, new_codes, work).T).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_delta = torch.mm(flat_x.T, flat_grad, out=work).mul_(flow)  # (in × out): ∂L/∂(ΔWᵀ) through the STE
            if ctx.needs_input_grad[1]:
                grad_a = (grad_delta @ weight_b.float()).T.mul_(scaling).to(weight_a.dtype)  # (k × in)
            if ctx.needs_input_grad[2]:
                grad_b = (weight_a.float() @ grad_delta).T.mul_(scaling).to(weight_b.dtype)  # (out × k)
        return grad_x, grad_a, grad_b, None, None, None, None


def quant_aware_low_rank_linear(x, weight_a, weight_b, scaling, grid, packed_mask_t, bias=None):
    """Functional form of `QuantAwareLowRankLinear`."""
    return QuantAwareLowRankLinear.apply(x, weight_a, weight_b, scaling, grid, packed_mask_t, bias)


@torch.no_grad()
def merged_codes(grid: QuantGrid, weight_a, weight_b, scaling: float, mask_t: torch.Tensor) -> torch.Tensor:
    """The codes `Ŵ` (in × out, int32) that the QA forward computes with, for writing into `qweight`."""
    with torch.autocast(weight_a.device.type, enabled=False):
        delta = delta_into(_work(grid, weight_a.device), weight_a, weight_b, scaling)
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("The adapter's update contains NaN or infinite values; refusing to merge it.")
    new_codes, _ = requantize(grid, delta, mask_t)
    return new_codes.to(torch.int32)
