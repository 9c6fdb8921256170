"""The cost of a subnetwork: parameters and multiply-accumulates (MACs) of the model it deploys as, computed
analytically from the layer sizes, and a measured latency helper.

The *deployed model* of a subnetwork is the physically sliced base with the adapters merged into it: every adapted
linear layer at its active (output, input) widths (`subnetwork.module_widths`), the LoRA factors gone, every other
module as it is. The counts below are those of that model, so they can be compared with the exported model and with
the base. A model without an elastic adapter (a plain transformers model, or a PeftModel with other adapters) is
counted at full size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checks import check_int
from .quantization.layers import is_gptq_layer
from .tuners.elastic_lora.config import DEFAULT_HEAD_MODULES
from .tuners.elastic_lora.search_space import SearchSpace, elastic_tuner

#: Sequence length of `count_macs` and of the inputs `measure_latency` makes, unless given.
DEFAULT_SEQ_LEN = 128


@dataclass(frozen=True)
class Cost:
    """The analytic cost of a subnetwork: parameters and MACs of one forward pass (see `subnetwork_cost`)."""

    params: int
    macs: int


@dataclass(frozen=True)
class Latency:
    """Measured forward-pass times in seconds: `times` of every timed call, in order, their `median` and `min`."""

    median: float
    min: float
    times: tuple[float, ...]


# ------------------------------------------------------------------------------------------ the deployed model


def _modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`(name, module)` of every module of the deployed model, adapter wrappers collapsed: a layer wrapped by an
    adapter is one leaf (its adapter weights get merged), a `modules_to_save` wrapper its original module (the
    trained copy that replaces it has the same shapes). A module registered at two places is yielded twice."""
    yield prefix, module
    if isinstance(module, BaseTunerLayer):
        return
    if isinstance(module, ModulesToSaveWrapper):
        children = [("original_module", module.original_module)]
    else:
        children = module.named_children()
    for name, child in children:
        yield from _modules(child, f"{prefix}.{name}" if prefix else name)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """`(out, in)` of a linear layer at full width, or None if `module` is not one. Linear layers: `torch.nn.Linear`
    (bitsandbytes' included), transformers' `Conv1D` and GPTQ layers, bare or wrapped by an adapter; sizes come
    from their attributes, not from their (maybe packed) weights."""
    layer = _unwrapped(module)
    if isinstance(layer, nn.Linear) or is_gptq_layer(layer):
        return layer.out_features, layer.in_features
    if isinstance(layer, Conv1D):
        return layer.nf, layer.nx
    return None


def check_count(name: str, value: object, minimum: int) -> int:
    """`check_int` in the cost model's words ("an integer >= minimum"), for its counts (seq_len, repeats, ...)."""
    return check_int(name, value, minimum, valid=f"an integer >= {minimum}")


def _inside(name: str, blocks: frozenset[str]) -> bool:
    """Whether module `name` is one of `blocks` or in one of them."""
    return any(name == block or name.startswith(block + ".") for block in blocks)


class CostModel:
    """The analytic costs of the subnetworks of one model, with the model walked once: `params(subnetwork)`,
    `macs(subnetwork, seq_len)` and `adapter_params(subnetwork)` — what `count_parameters`, `count_macs` and
    `num_adapter_parameters` return, in a fraction of a millisecond each (a search prices every trial with one).
    Valid while the model's modules stay as they are (switching subnetworks is fine; adding or merging adapters,
    exporting or reordering is not)."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        try:
            tuner = elastic_tuner(model)
        except ValueError as error:  # no elastic adapter: everything at full size
            if adapter_name is not None:
                raise
            self._no_tuner = error
            self._root = model.get_base_model() if isinstance(model, PeftModel) else model
            self._space, self._qkv = None, DEFAULT_HEAD_MODULES[0]
        else:
            self._no_tuner = None
            self._space = SearchSpace.of(tuner, adapter_name)
            self._root, self._qkv = tuner.model, tuple(self._space.config.head_modules[0])
        self._walk = list(_modules(self._root))
        self._tensors = self._parameter_items()
        self._attention: list[tuple[str, int, str, tuple[int, int]]] | None = None  # built by the first `macs`

    def _parameter_items(self) -> list[tuple[str, tuple[int, int] | None, list[tuple[int, int]]]]:
        """`(name, full (out, in) or None, [(tensor id, size)])` per module of the walk: for a linear layer its
        weight's and bias's ids (sizes follow the widths), for any other leaf its own parameters."""
        items = []
        for name, module in self._walk:
            layer = _unwrapped(module)
            shape = _linear_shape(module)
            if shape is not None:
                bias = getattr(layer, "bias", None)
                ids = [(id(getattr(layer, "weight", layer)), 0)] + ([(id(bias), 0)] if bias is not None else [])
                items.append((name, shape, ids))
            else:  # a wrapped base layer is a leaf of the walk: count its children here
                items.append((name, None, [(id(p), p.numel()) for p in layer.parameters(recurse=layer is not module)]))
        return items

    def _deployed(self, subnetwork: Mapping[str, int] | None) -> tuple[dict[str, tuple[int, int]], frozenset[str]]:
        """`{module name: (out, in)}` of the elastic layers under `subnetwork` and the decoder blocks it drops."""
        if self._no_tuner is not None:
            if subnetwork is not None:
                raise self._no_tuner
            return {}, frozenset()
        chosen = self._space.validated(subnetwork)
        return self._space.widths(chosen), frozenset(self._space.dropped(chosen))

    def params(self, subnetwork: Mapping[str, int] | None = None) -> int:
        """`count_parameters(model, subnetwork)`."""
        widths, dropped = self._deployed(subnetwork)
        counted: set[int] = set()  # ids of the tensors (or GPTQ layers) already counted
        total = 0
        for name, shape, tensors in self._tensors:
            if dropped and _inside(name, dropped):
                continue
            if shape is not None:
                out_width, in_width = widths.get(name, shape)
                tensors = [(tensors[0][0], out_width * in_width)] + [(t, out_width) for t, _ in tensors[1:]]
            for tensor, size in tensors:
                if tensor not in counted:
                    counted.add(tensor)
                    total += size
        return total

    def macs(self, subnetwork: Mapping[str, int] | None = None, seq_len: int = DEFAULT_SEQ_LEN) -> int:
        """`count_macs(model, subnetwork, seq_len)`."""
        check_count("seq_len", seq_len, 1)
        widths, dropped = self._deployed(subnetwork)
        linear = attention = 0
        for name, shape, _ in self._tensors:
            if shape is not None and not (dropped and _inside(name, dropped)):
                out_width, in_width = widths.get(name, shape)
                linear += seq_len * out_width * in_width
        for name, head_dim, query, shape in self._attention_items():
            if dropped and _inside(name, dropped):
                continue
            heads = widths.get(query, shape)[0] // head_dim
            attention += 2 * seq_len * seq_len * heads * head_dim
        return linear + attention

    def _attention_items(self) -> list[tuple[str, int, str, tuple[int, int]]]:
        """`(name, head_dim, query projection name, its full (out, in))` of every attention module (a module with a
        `head_dim`)."""
        if self._attention is None:
            items, qkv = [], self._qkv
            for name, module in self._walk:
                head_dim = getattr(module, "head_dim", None)
                if head_dim is None:
                    continue
                if not all(isinstance(getattr(module, suffix, None), nn.Module) for suffix in qkv):
                    raise ValueError(
                        f"count_macs counts the heads of attention module {name!r} ({type(module).__name__}, it has "
                        f"a head_dim) from its query projection, which needs the children {list(qkv)}; it has "
                        f"{[n for n, _ in module.named_children()]}. Fused projections are not supported."
                    )
                query = f"{name}.{qkv[0]}" if name else qkv[0]
                items.append((name, head_dim, query, _linear_shape(module.get_submodule(qkv[0]))))
            self._attention = items
        return self._attention

    def adapter_params(self, subnetwork: Mapping[str, int] | None = None) -> int:
        """`num_adapter_parameters(model, subnetwork)`."""
        if self._no_tuner is not None:
            raise self._no_tuner
        return self._space.adapter_parameters(self._space.validated(subnetwork))


# ------------------------------------------------------------------------------------------ analytic counts


def count_parameters(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> int:
    """The number of parameters of the model `subnetwork` deploys as (default: the active subnetwork; groups it does
    not name keep their active choice).

    Every linear layer counts `out · in` for its weight and `out` for its bias, at its active widths if it is
    elastic (the weight's logical size: a 4-bit or GPTQ layer counts like a float one). Every other parameter
    tensor (embeddings, norms, ...) counts its `numel()`. Adapter parameters (LoRA factors) are not counted: they
    are merged into the base weights. A tensor used at two places (tied input/output embeddings) is counted once.
    Buffers are not counted. `modules_to_save` count once, like the module they replace.

    `model`: a PeftModel with an elastic adapter (or its tuner), or any other `nn.Module`, counted at full size
    (then `subnetwork` and `adapter_name` must be None). Raises ValueError for a subnetwork that does not fit the
    model (unknown group names or choices, as `set_subnetwork`). To price many subnetworks, use one `CostModel`.
    """
    return CostModel(model, adapter_name).params(subnetwork)


def count_macs(
    model: nn.Module,
    subnetwork: Mapping[str, int] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    adapter_name: str | None = None,
) -> int:
    """The multiply-accumulates of one forward pass of the model `subnetwork` deploys as (default: the active
    subnetwork) over one sequence of `seq_len` tokens, computing the logits of every position:

        sum over linear layers        seq_len · in · out             (active widths; lm_head included)
      + sum over attention blocks     2 · seq_len² · heads · head_dim

    The attention term is `Q Kᵀ` (`seq_len · seq_len · head_dim` per query head) plus `softmax(...) V` (the same):
    the full score matrix, as scaled-dot-product attention computes it; the causal mask does not halve it, and
    grouped-query attention does not reduce it (key/value heads are shared, the products are per query head).
    `heads` is the active output width of the block's query projection divided by its `head_dim`. Attention blocks
    are the modules with a `head_dim` attribute (transformers' attention modules); their query/key/value
    projections are found by the elastic config's `head_modules` suffixes (default q_proj, k_proj, v_proj).

    Not counted: embedding lookups (0 MACs), element-wise work (norms, activations, rotary embeddings, residuals,
    softmax, biases), adapters (merged). A module called twice per forward is counted once per place it is
    registered. Raises ValueError for a bad subnetwork (as `count_parameters`), `seq_len < 1`, or an attention
    module whose projections are not named like that (e.g. fused `c_attn`). To price many subnetworks, use one
    `CostModel`.
    """
    return CostModel(model, adapter_name).macs(subnetwork, seq_len)


def subnetwork_cost(
    model: nn.Module,
    subnetwork: Mapping[str, int] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    adapter_name: str | None = None,
) -> Cost:
    """`Cost(params=count_parameters(...), macs=count_macs(...))` of `subnetwork` (default: the active one)."""
    costs = CostModel(model, adapter_name)
    return Cost(params=costs.params(subnetwork), macs=costs.macs(subnetwork, seq_len))


# ------------------------------------------------------------------------------------------ measured latency


def measure_latency(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> Latency:
    """Time `model(input_ids)`: `warmup` calls that are discarded, then `repeats` timed ones (`time.perf_counter`,
    seconds), in eval mode under `torch.no_grad()`. Every module's training flag is restored afterwards.

    `model`: any module called with a `(batch, seq)` tensor of token ids — a PeftModel with its subnetwork set (with
    unmerged adapters it also times the LoRA products), or the exported plain model. `input_ids`: the tokens to use;
    without them, random ones (fixed seed) of shape `(batch_size, seq_len)`, default `(1, DEFAULT_SEQ_LEN)`, drawn
    from the model's input-embedding vocabulary and put on the embeddings' device.
    """
    check_count("warmup", warmup, 0)
    check_count("repeats", repeats, 1)
    if input_ids is None:
        input_ids = random_tokens(model, seq_len, batch_size)
    elif seq_len is not None or batch_size is not None:
        raise ValueError(
            f"Pass either input_ids or seq_len/batch_size, not both (got input_ids of shape {tuple(input_ids.shape)}, "
            f"seq_len={seq_len!r}, batch_size={batch_size!r})."
        )
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for index in range(warmup + repeats):
                start = time.perf_counter()
                model(input_ids)
                if input_ids.device.type == "cuda":  # kernels run asynchronously: wait for them
                    torch.cuda.synchronize(input_ids.device)
                if index >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        for module, training in modes:
            module.training = training
    return Latency(median=statistics.median(times), min=min(times), times=tuple(times))


def random_tokens(model: nn.Module, seq_len: int | None, batch_size: int | None) -> torch.Tensor:
    """Token ids (batch_size × seq_len, defaults 1 × DEFAULT_SEQ_LEN) drawn from `model`'s vocabulary, for timing."""
    seq_len = check_count("seq_len", DEFAULT_SEQ_LEN if seq_len is None else seq_len, 1)
    batch_size = check_count("batch_size", 1 if batch_size is None else batch_size, 1)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"Cannot draw token ids for a {type(model).__name__}: it has no get_input_embeddings() returning an "
            "nn.Embedding; pass input_ids."
        )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(embeddings.num_embeddings, (batch_size, seq_len), generator=generator)
    return tokens.to(embeddings.weight.device)
