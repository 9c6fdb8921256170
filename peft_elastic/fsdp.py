"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for models with elastic adapters.

FSDP2 keeps each rank's shard of every parameter as a `DTensor` between forward passes and all-gathers a block's
parameters just before it runs, so the adapters' per-step slicing (`A[:k]`, Mode B's narrowed base weights) and
SparsePEFT's masked functions see whole tensors, as in one process. What reads parameters outside a forward pass
(an export, a merge) would see shards: `export_sub_adapter` and `export_compressed_model` gather them first when
called on every rank (`full_parameters`: rank 0 writes, every rank gets its outcome), and merging in place refuses a
sharded model with what to do instead (`refuse_sharded`).

    shard_model(model)                      # every decoder block, embeddings, head, the model: on the default mesh
    ...train...
    export_sub_adapter(model, "sub")        # on every rank: gathered, written once by rank 0
    with gathered(model, all_ranks=False):  # any other read of the full weights (every rank enters)
        if dist.get_rank() == 0:
            model.save_pretrained("adapter")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "full_parameters",
    "gathered",
    "is_sharded",
    "refuse_sharded",
    "require_gathered",
    "shard_model",
    "sharded_parameter",
]


def sharded_parameter(model: nn.Module) -> str | None:
    """The name of a parameter of `model` that FSDP holds as a shard (a `DTensor`), or None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return next((name for name, p in model.named_parameters() if isinstance(p, DTensor)), None)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` or one of its modules."""
    return bool(_fsdp_modules(model))


def shard_model(model: nn.Module, mesh=None, **options) -> nn.Module:
    """Apply FSDP2's `fully_shard` to each decoder block of `model` (a PeftModel or a transformers causal LM), to the
    input embeddings and the head (unless tied: then they stay in the model's group), then to the whole model — one
    all-gather per group in forward and backward, each group resharded after its forward pass but the model's.
    `mesh`: a 1-D `DeviceMesh` (default: every rank of the default process group, on its device); `options` go to
    `fully_shard` (e.g. `reshard_after_forward`, `mp_policy`). Every rank must call it on the same model, after the
    adapters are added (`get_peft_model`) and before the optimizer is built. Returns `model`, sharded in place."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from .blocks import decoder_blocks

    if not dist.is_initialized():
        raise ValueError(
            "shard_model needs a process group: call torch.distributed.init_process_group (backend 'nccl' on GPUs, "
            "'gloo' on CPU) on every rank first, e.g. under `torchrun --nproc_per_node N script.py`."
        )
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded (fully_shard was applied): shard it once.")
    _, blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, **options)
    # the embeddings and the head in groups of their own, resharded after their forward pass: in the root's group
    # they would stay gathered from the forward pass to the end of the backward (FSDP keeps the root unsharded). A
    # tied pair shares one parameter, which can be in one group only: it stays with the root.
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    if all(e is not None for e in embeddings) and embeddings[0].weight is not embeddings[1].weight:
        for module in embeddings:
            fully_shard(module, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, all_ranks: bool = True) -> Iterator[nn.Module]:
    """Inside, the parameters of a sharded `model` are whole tensors (gathered with `DTensor.full_tensor`, on their
    device), for reading its weights — saving, exporting — not for running or training it (FSDP's hooks expect the
    shards); on exit the shards are put back. Collective: every rank must enter. `all_ranks=False` keeps the whole
    tensors on rank 0 only (the others take part in the gathering and keep their shards): one full copy of the
    model's parameters on the rank that writes. A model that is not sharded is yielded as it is."""
    if sharded_parameter(model) is None:
        yield model
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    # FSDP leaves the root's parameters unsharded after a forward pass that no backward follows (an evaluation),
    # and its state-dict hooks reshard them on the rank that calls `state_dict`: reshard every group first, so that
    # every rank gathers the same parameters in the same order
    for module in _fsdp_modules(model):
        module.reshard()
    keep = all_ranks or dist.get_rank() == 0
    swapped, whole = [], {}
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in whole:  # a tied weight is gathered once (in the same order on every rank)
                    full = param.full_tensor()
                    whole[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad) if keep else None
                if keep:
                    module._parameters[name] = whole[id(param)]
                    swapped.append((module, name, param))
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[bool]:
    """For an export that reads the full weights of `model` and writes one folder: yields whether this process is
    the one that writes. Not sharded: True. Sharded (the export is called on every rank): the parameters are
    gathered on every rank, rank 0 writes, and on exit every rank learns whether it succeeded — rank 0's error is
    raised on every rank, so that no rank waits for one that failed."""
    if sharded_parameter(model) is None:
        yield True
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    failure: list[str | None] = [None]
    with gathered(model, all_ranks=False):
        try:
            yield rank == 0
        except Exception as error:
            if rank != 0:
                raise
            failure[0] = f"{type(error).__name__}: {error}"
            dist.broadcast_object_list(failure, src=0)
            raise
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"The export failed on rank 0, which writes it: {failure[0]}")


def require_gathered(model: nn.Module, action: str) -> None:
    """Raise a ValueError naming `action` if parameters of `model` are FSDP shards (outside `gathered`)."""
    name = sharded_parameter(model)
    if name is not None:
        raise ValueError(
            f"{action} reads the full weights, and {name} of this model is an FSDP shard (a DTensor). Call it on "
            "every rank inside `with peft_elastic.fsdp.gathered(model):` (and write from rank 0 only), or use "
            "peft_elastic.export_sub_adapter / export_compressed_model, which gather by themselves."
        )


def refuse_sharded(model: nn.Module, action: str) -> None:
    """Raise a ValueError naming `action` if `model` is sharded by FSDP: changing its modules or weights in place
    (a merge) would change what one rank gathered, not the shards that the model is made of."""
    if not is_sharded(model):
        return
    name = sharded_parameter(model)
    where = f" ({name} is a DTensor shard)" if name else ""
    raise ValueError(
        f"{action} changes the model in place, and this model is sharded by FSDP{where}: its full weights exist on "
        "no rank. Write what you need from every rank instead — peft_elastic.export_sub_adapter or "
        "export_compressed_model (gathered, written once by rank 0), or the adapter with `with "
        "peft_elastic.fsdp.gathered(model): model.save_pretrained(...)` on rank 0 — then merge in one process: "
        "PeftModel.from_pretrained(base, folder).merge_and_unload()."
    )
