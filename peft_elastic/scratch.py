"""Reusable scratch buffers for weight-sized temporaries on CPU (the masked and quantization-aware updates of
SparsePEFT borrow theirs here).

PyTorch's CPU allocator does not cache: a tensor above glibc's mmap threshold (at most 32 MiB) is mapped fresh at
every allocation and each of its pages is faulted in and zeroed on first touch. For the weight-sized temporaries of
`MaskedLowRankLinear` (an (11008 × 4096) weight is 180 MiB in float32) that costs more than the arithmetic: on the
project's 2-core machine, filling a fresh (5632 × 2048) float32 tensor took 13 ms, refilling an existing one 0.9 ms.
So on CPU the function borrows its temporaries from one flat buffer per (thread, device, dtype, slot), grown to the
largest size asked for and kept; on other devices (whose allocators cache) it allocates as usual.

The buffers hold at most `slots × (largest adapted weight)` elements per thread and dtype — two slots, e.g.
2 × 45 M floats = 360 MiB for the MLP weights of a 7B Llama in float32 — and `clear_workspace()` frees them.
"""

from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`, reused by later calls with the same `slot`: its contents are
    valid only until the next call for that slot (in this thread). Slots let one computation hold several."""
    numel = math.prod(shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (device, dtype, slot)
    flat = buffers.get(key)
    if flat is None or flat.numel() < numel:
        buffers.pop(key, None)  # free the smaller buffer before allocating the larger one
        flat = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def clear_workspace() -> None:
    """Free this thread's scratch buffers (they are allocated again, at the size needed, on the next use)."""
    _local.buffers = {}


def workspace_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    buffers = getattr(_local, "buffers", None) or {}
    return sum(flat.numel() * flat.element_size() for flat in buffers.values())
