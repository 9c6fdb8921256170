"""The math of one elastic-rank LoRA layer.

LoRA computes `y = base(x) + s · B(A(dropout(x)))` with `A` (r × in), `B` (out × r) and `s = alpha / r`. Here the
factors are `LoraA` / `LoraB` modules that use only a prefix of their rank: `A[:k, :]` and `B[:, :k]`, where `k` is
the active rank of the adapter. Slicing gives views (no copies, no masks) and autograd sends gradient only to the
active slice; at full rank the weights are used as they are, so the maximal subnetwork costs what LoRA costs.
Because every PEFT LoRA layer (dense, Conv1D, bitsandbytes, GPTQ, ...) calls `lora_B(lora_A(x))`,
replacing the two factor modules makes all of them elastic; `ElasticLoraLayer` adds the rank bookkeeping and a
delta weight (for merging) of the active rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from torch import nn


class LoraA(nn.Linear):
    """LoRA's down-projection `A` (weight r × in) whose forward uses only the first `active_rank` rows.

    It also holds the adapter's active output width of its layer (`active_out`, Mode B; None: all outputs), which the
    layer reads. Both are saved with the adapter weights (as the module's extra state), so a reloaded super-adapter
    comes back with the subnetwork it was saved with.
    """

    active_rank: int
    active_out: int | None = None
    block_dropped: bool = False  # the adapter drops the decoder block of this layer (read by the block's hook)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> LoraA:
        """A `LoraA` that shares `linear`'s parameters (no copy), at full rank."""
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight = linear.weight
        module.active_rank = linear.out_features
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., i) -> (..., k), i <= in: a narrower input (Mode B)
        weight = self.weight if self.active_rank == self.out_features else self.weight[: self.active_rank]
        if x.shape[-1] != self.in_features:
            weight = weight[:, : x.shape[-1]]
        return F.linear(x, weight)

    def get_extra_state(self) -> torch.Tensor:
        """The active rank (a scalar); `[rank, output width]` when the layer is narrowed; `[rank, output width or 0,
        1]` when its block is dropped."""
        if self.block_dropped:
            return torch.tensor([self.active_rank, self.active_out or 0, 1], dtype=torch.int64)
        if self.active_out is None:
            return torch.tensor(self.active_rank, dtype=torch.int64)
        return torch.tensor([self.active_rank, self.active_out], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        values = [int(v) for v in torch.as_tensor(state).reshape(-1)]
        if not 1 <= len(values) <= 3 or not 0 < values[0] <= self.out_features:
            raise ValueError(f"Saved state {values} does not fit a LoRA A factor of rank {self.out_features}.")
        self.active_rank = values[0]
        self.active_out = (values[1] or None) if len(values) >= 2 else None
        self.block_dropped = len(values) == 3 and bool(values[2])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}"


class LoraB(nn.Linear):
    """LoRA's up-projection `B` (weight out × r) whose forward uses the first `k` columns, `k` = its input width."""

    @classmethod
    def sharing(cls, linear: nn.Linear) -> LoraB:
        """A `LoraB` that shares `linear`'s parameters (no copy)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., out)
        k = h.shape[-1]
        weight = self.weight if k == self.in_features else self.weight[:, :k]
        return F.linear(h, weight, self.bias)


class ElasticLoraLayer(LoraLayer):
    """Mixin that makes a PEFT LoRA layer class rank-elastic; put it first in the bases of the concrete class.

    The active rank of each adapter is module state set from outside `forward` (see `set_active_rank`), never
    sampled inside it, so gradient checkpointing recomputes exactly the forward that made the loss.
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.lora_A[adapter_name] = LoraA.sharing(self.lora_A[adapter_name])
        self.lora_B[adapter_name] = LoraB.sharing(self.lora_B[adapter_name])

    def active_rank(self, adapter_name: str) -> int:
        """The rank `k` that `adapter_name` uses now."""
        return self.lora_A[adapter_name].active_rank

    def set_active_rank(self, adapter_name: str, rank: int) -> None:
        """Use the first `rank` rows of `A` and columns of `B` of `adapter_name` from now on."""
        if not 0 < rank <= self.r[adapter_name]:
            raise ValueError(f"rank={rank} is outside 1..{self.r[adapter_name]} for adapter {adapter_name!r}.")
        if adapter_name in self.merged_adapters and rank != self.active_rank(adapter_name):
            raise ValueError(
                f"Adapter {adapter_name!r} is merged with rank {self.active_rank(adapter_name)}; unmerge it "
                f"(model.unmerge_adapter()) before changing its rank to {rank}."
            )
        self.lora_A[adapter_name].active_rank = rank

    def resolve_lora_variant(self, *, config, **kwargs):
        """The adapter's variant, as its config names it (`layer_variant`): PEFT's own variants are refused by
        `ElasticLoraConfig`, and this one method serves every base backend."""
        return config.layer_variant()

    def active_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`A[:k]` and `B[:, :k]` of `adapter` at its active rank `k` (the whole factors, unsliced, at full rank)."""
        k = self.active_rank(adapter)
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if k == weight_a.shape[0]:
            return weight_a, weight_b
        return weight_a[:k], weight_b[:, :k]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`s · B[:, :k] @ A[:k, :]` (out × in, transposed for Conv1D) for the active rank `k` of `adapter`, as the
        adapter's variant changes it (a mask, for SparsePEFT)."""
        weight_a, weight_b = self.active_factors(adapter)
        dtype = weight_b.dtype
        # Half-precision matmuls are slow on CPU: compute in float32 there, as LoRA does.
        upcast = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            weight_a, weight_b = weight_a.float(), weight_b.float()
        delta = transpose(weight_b @ weight_a, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]
        variant = self.lora_variant.get(adapter)
        if variant is not None:
            delta = variant.delta_weight(self, adapter, delta)
        return delta.to(dtype) if upcast else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's forward of the base backend, unless the variant of the first active adapter computes the whole
        output itself (`ElasticVariant.whole_forward`)."""
        if self.lora_variant and not self.disable_adapters and not self.merged:  # plain adapters: straight to PEFT
            adapters = [a for a in self.active_adapters if a in self.lora_A]
            variant = self.lora_variant.get(adapters[0]) if adapters else None
            if variant is not None:
                result = variant.whole_forward(self, adapters, x, *args, **kwargs)
                if result is not None:
                    return result
        return super().forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "elastic_" + super().__repr__()


class Linear(ElasticLoraLayer, LoraLinear):
    """Elastic LoRA on `torch.nn.Linear` and transformers' `Conv1D` (with `fan_in_fan_out`).

    Widths (Mode B, LoNAS): with `set_active_out_features(adapter, o)` the layer computes only its first `o` outputs
    while that adapter is active, with `W[:o]`, `b[:o]` and `B[:o]`; given an input narrower than `in_features` (the
    output of a narrowed layer) it uses the first columns of `W` and `A` to match. Both are views of the full
    weights, so every width shares them, and a merge (of the full matrices) serves every width. With the adapters
    disabled the layer is the full base layer."""

    def active_out_features(self, adapter_name: str) -> int:
        """The number of outputs `adapter_name`'s subnetwork computes (all of them unless narrowed)."""
        return self.lora_A[adapter_name].active_out or self.out_features

    def set_active_out_features(self, adapter_name: str, out_features: int | None) -> None:
        """Compute only the first `out_features` outputs while `adapter_name` is active (None: all)."""
        base = self.get_base_layer()
        if out_features is not None:
            if type(base) is not nn.Linear:
                raise ValueError(
                    f"Elastic widths slice torch.nn.Linear bases; this layer's base is a {type(base).__name__}."
                )
            full = self.out_features
            if isinstance(out_features, bool) or not isinstance(out_features, int) or not 0 < out_features <= full:
                raise ValueError(f"out_features={out_features!r} is outside 1..{full} for this layer.")
            if out_features == full:
                out_features = None
        self.lora_A[adapter_name].active_out = out_features

    def _width(self, x: torch.Tensor) -> int | None:
        """The output width of this forward (None: all outputs and a full-width input, the plain LoRA path)."""
        if self.disable_adapters:
            widths = set()
        else:
            widths = {self.lora_A[a].active_out for a in self.active_adapters if a in self.lora_A}
        if len(widths) > 1:
            raise ValueError(f"The active adapters of this layer have different output widths {sorted(widths)}.")
        width = next(iter(widths), None)
        if width is None and x.shape[-1] == self.in_features:
            return None
        return width or self.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out_width = self._width(x)
        if out_width is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if type(base) is not nn.Linear or args or kwargs:
            raise ValueError(
                f"Elastic widths slice torch.nn.Linear bases called with one input; got a {type(base).__name__} "
                f"with an input of width {x.shape[-1]} (of {self.in_features})."
            )
        if self.disable_adapters and self.merged:
            self.unmerge()
        in_width = x.shape[-1]
        bias = None if base.bias is None else base.bias[:out_width]
        result = F.linear(x, base.weight[:out_width, :in_width], bias)
        if self.disable_adapters or self.merged:
            return result
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype)))  # (..., k)
            weight_b = lora_b.weight[:out_width, : h.shape[-1]]
            bias_b = None if lora_b.bias is None else lora_b.bias[:out_width]
            result = result + F.linear(h, weight_b, bias_b).to(dtype) * self.scaling[adapter]
        return result
