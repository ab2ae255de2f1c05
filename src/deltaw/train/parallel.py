"""Data parallelism applied to a model that carries a trainable adapter, with PyTorch's own engines.

    objective = CausalLMLoss(model)             the module whose forward is one micro-batch's loss

    one process   objective, on the device
    DDP           DistributedDataParallel(objective): the adapter is the only thing in the reducer; the frozen
                  base and every buffer are on DDP's ignore list, so they are neither broadcast nor all-reduced
    FSDP2         fully_shard(every decoder layer), then fully_shard(objective): each rank holds 1/N of every
                  parameter, NF4 codes and scales included (NF4Weight.hold_as_parameters); a layer is
                  all-gathered just before its forward (and again before its backward) and freed after it

Both sum gradients over ranks instead of averaging them: every rank divides its loss sum by the token count
of the whole step (all ranks together), so the sum is the one-process gradient.

Tensors that FSDP shards are DTensors; `full` gathers one whole (a collective: every rank calls it, in the
same order), `shard_like` turns a whole tensor read from a checkpoint back into this rank's shard, and
`whole_parameters` shows the adapter whole to code that reads it from the model (saving it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from deltaw import compat
from deltaw.adapters.fingerprint import pin_fingerprint
from deltaw.quant.linear import quantized_layers
from deltaw.runtime import release_free_memory
from deltaw.train.distributed import Ranks
from deltaw.train.losses import CausalLMLoss


def parallelize(model: nn.Module, ranks: Ranks, fsdp: bool) -> nn.Module:
    """Place `model` (adapter attached) on this rank's device and return the objective to call: plain for
    one process, DDP over the adapter, or FSDP2-sharded with `fsdp` (see the module docstring)."""
    objective = CausalLMLoss(model)
    if fsdp:
        return _fully_shard(objective, model, ranks)
    model.to(ranks.device)
    if not ranks.distributed:
        return objective
    return _data_parallel(objective, ranks)


def _data_parallel(objective: CausalLMLoss, ranks: Ranks) -> DistributedDataParallel:
    frozen = [name for name, param in objective.named_parameters() if not param.requires_grad]
    frozen += [name for name, _ in objective.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    wrapped = DistributedDataParallel(objective, device_ids=[ranks.device] if ranks.device.type == "cuda" else None)
    wrapped.register_comm_hook(None, _summed)
    return wrapped


def _summed(state, bucket):  # (None, dist.GradBucket) -> torch.futures.Future[torch.Tensor]
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default divides by the world size).

    No annotations: DDP compares them with dist.GradBucket and Future[Tensor], and this module's annotations
    are strings (`from __future__ import annotations`), which it would reject."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda done: done.value()[0])


def _fully_shard(objective: CausalLMLoss, model: nn.Module, ranks: Ranks) -> CausalLMLoss:
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    pin_fingerprint(model)  # from here on no rank holds the whole embedding the fingerprint samples
    for weight in quantized_layers(model).values():
        weight.hold_as_parameters()
    for layer in compat.decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    for module in objective.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not average
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    release_free_memory()  # the whole weights each rank loaded are gone; hand the pages back
    return objective


def held_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this rank holds: its shards of the frozen parameters under FSDP, else all of them,
    and the buffers (NF4 codes and scales are buffers until FSDP makes them parameters)."""
    tensors = {id(t): t for t in model.parameters() if not t.requires_grad}
    tensors.update({id(t): t for t in model.buffers()})
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors.values())


def describe(ranks: Ranks, fsdp: bool, whole: int, held: int) -> str:
    """One line on how the ranks hold the base (`whole` bytes in all, `held` on this rank)."""
    if fsdp:
        return f"FSDP over {ranks.world} ranks: each holds {held / 2**20:,.1f} MiB of the {whole / 2**20:,.1f} MiB base"
    return f"DDP over {ranks.world} ranks: each holds the whole {whole / 2**20:,.1f} MiB base; the adapter is all-reduced"


def accumulating(objective: nn.Module, last: bool) -> ContextManager:
    """The context for one micro-batch's forward and backward: DDP skips its all-reduce on all but the last
    micro-batch of a step (gradients accumulate locally, then one all-reduce); otherwise nothing."""
    if isinstance(objective, DistributedDataParallel) and not last:
        return objective.no_sync()
    return nullcontext()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when FSDP shards it (a collective), else `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`value` (whole, as a checkpoint holds it) laid out as `reference` is: this rank's shard of it when
    `reference` is sharded (every rank holds the whole value, so nothing is sent), else `value` on its device."""
    if isinstance(reference, DTensor):
        return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements, src_data_rank=None)
    return value.to(reference.device)


@contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block every sharded trainable parameter of `model` is a whole, plain tensor, so code that
    reads the adapter from the model (save_adapter) works as for one process. Enter on every rank (it gathers)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and param.requires_grad:
                    module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=True)
                    swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
