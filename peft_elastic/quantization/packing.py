"""The GPTQ packed layout, read and written with plain torch: codes, zero-points and dequantization.

A GPTQ linear layer of `in` inputs and `out` outputs, `b`-bit codes (b in 2, 4, 8; `pf = 32 / b` codes per int32
word) and groups of `g` inputs stores

- `qweight` int32 (in / pf, out): code `q[i, o]` is bits `b·(i % pf) …` of word `qweight[i // pf, o]`;
- `qzeros` int32 (groups, out / pf): zero-point `z[j, o]` is bits `b·(o % pf) …` of word `qzeros[j, o // pf]`;
- `scales` (groups, out) and `g_idx` int32 (in): input `i` belongs to group `g_idx[i]` (`i // g` without act-order);

and computes with `W[o, i] = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o])`. Checkpoint format "gptq" (v1)
stores `z − 1` in `qzeros`, "gptq_v2" stores `z`; gptqmodel's modules say which with `qzero_format()`.
"""

from __future__ import annotations

import torch

from ..choices import GPTQ_BITS

_WORD_BITS = 32


def check_bits(bits: int) -> None:
    """Raise a clear error for bit widths whose codes do not tile a 32-bit word."""
    if bits not in GPTQ_BITS:
        raise ValueError(
            f"{bits}-bit GPTQ layers are not supported; supported: {list(GPTQ_BITS)} (3-bit codes straddle "
            "32-bit words in a layout this package does not read or write)."
        )


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, _WORD_BITS, bits, dtype=torch.int32, device=device)


def unpack_rows(qweight: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes (rows × out) as int32 from `qweight` (rows / pf × out), packed along the rows."""
    check_bits(bits)
    shifts = _shifts(bits, qweight.device)
    codes = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # (words, pf, out)
    return codes.reshape(-1, qweight.shape[1])[:rows]


def unpack_cols(qzeros: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codes (groups × cols) as int32 from `qzeros` (groups × cols / pf), packed along the columns."""
    check_bits(bits)
    shifts = _shifts(bits, qzeros.device)
    codes = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # (groups, words, pf)
    return codes.reshape(qzeros.shape[0], -1)[:, :cols]


def _to_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., pf) codes -> (...) int32 words, code `k` at bit `bits·k` (two's complement for the top bit)."""
    maxq = (1 << bits) - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise ValueError(f"{bits}-bit codes must be in [0, {maxq}], got [{int(codes.min())}, {int(codes.max())}]")
    shifts = torch.arange(0, _WORD_BITS, bits, dtype=torch.int64, device=codes.device)
    words = (codes.to(torch.int64) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`qweight` (ceil(rows / pf) × out) int32 from codes (rows × out); the inverse of `unpack_rows`."""
    check_bits(bits)
    pf = _WORD_BITS // bits
    rows, cols = codes.shape
    padded = torch.zeros((rows + pf - 1) // pf * pf, cols, dtype=torch.int64, device=codes.device)
    padded[:rows] = codes
    return _to_words(padded.reshape(-1, pf, cols).transpose(1, 2), bits)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`qzeros` (groups × ceil(cols / pf)) int32 from codes (groups × cols); the inverse of `unpack_cols`."""
    check_bits(bits)
    pf = _WORD_BITS // bits
    groups, cols = codes.shape
    padded = torch.zeros(groups, (cols + pf - 1) // pf * pf, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    return _to_words(padded.reshape(groups, -1, pf), bits)


def zero_points(qzeros: torch.Tensor, bits: int, cols: int, zero_format: int) -> torch.Tensor:
    """The zero-points `z` (groups × cols) int32 that dequantization subtracts, from `qzeros` in format 1 (v1,
    stores `z − 1`) or 2 (v2, stores `z`)."""
    if zero_format not in (1, 2):
        raise ValueError(f"GPTQ zero-point format must be 1 (v1, 'gptq') or 2 (v2, 'gptq_v2'), got {zero_format!r}")
    codes = unpack_cols(qzeros, bits, cols)
    return codes + 1 if zero_format == 1 else codes


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_format: int,
) -> torch.Tensor:
    """The float weight (out × in) in the dtype of `scales`: `scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o])`."""
    rows, cols = g_idx.shape[0], scales.shape[1]
    codes = unpack_rows(qweight, bits, rows)
    zeros = zero_points(qzeros, bits, cols, zero_format)
    groups = g_idx.long()
    return (scales[groups] * (codes - zeros[groups]).to(scales.dtype)).T


# ------------------------------------------------------------------------------------------- bit-packed masks

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool (out × in) mask as uint8 (out × ceil(in / 8)): bit `j % 8` of byte `j // 8` is `mask[:, j]`."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    shifts = _BIT_SHIFTS.to(mask.device)
    return (padded.reshape(rows, -1, 8) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool (out × cols) mask that `pack_mask` packed."""
    shifts = _BIT_SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()
