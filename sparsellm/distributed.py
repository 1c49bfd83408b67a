"""Processes of a ``torchrun`` job: which one this is, and which one writes the outputs; and the
FSDP2 sharding of a model for the whole-model methods (:class:`Shards`)."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn


def launched_processes() -> int:
    """How many processes torchrun started for this job (its WORLD_SIZE; 1 without torchrun),
    known before any process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world(device: torch.device, join_single: bool = False) -> tuple[int, int]:
    """(rank, world size). Joins the process group that torchrun describes in the environment
    on first use, for the run's ``device``: nccl for a CUDA device, each process on the GPU of its
    LOCAL_RANK, else gloo (a CPU run on a machine with GPUs communicates CPU tensors, which nccl
    refuses); (0, 1) for one process. A torchrun job of one process joins its (one-process)
    group only with ``join_single``: FSDP shards over it, nothing else needs it."""
    size = launched_processes()
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ  # as torchrun starts a process
    if not dist.is_initialized() and (size > 1 or (join_single and launched)):
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" = this process's GPU
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def use_local_gpu(device: torch.device) -> None:
    """In a torchrun job of several processes, make a CUDA run's "cuda" this process's GPU (that
    of its LOCAL_RANK) from the start, as :func:`world` does when the method joins the group:
    what runs before that (the memory check and the dense evaluation) ran every process on GPU 0,
    N copies of the model on one GPU."""
    if device.type == "cuda" and launched_processes() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            # every process would put its tensors on that one GPU while nccl talks through each
            # process's own: torchrun gives each process its GPU
            raise ValueError(f"device {device}: under torchrun each process runs on the GPU of its LOCAL_RANK "
                             f"(this one: cuda:{local}); give --device cuda")
        torch.cuda.set_device(local)


def is_main_process() -> bool:
    """True in a single-process run and in rank 0: the process that saves and reports. Only a
    whole-model method joins a process group; the run refuses a layer-wise one under a torchrun
    of several processes (:func:`check_method_fits_job`), so each of those is the main one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def check_method_fits_job(method: str) -> None:
    """Refuse a layer-wise ``method`` under a torchrun job of several processes, before any work:
    it joins no process group, so every process would repeat the whole prune and write the same
    outputs (the slower one then fails on the other's --save folder)."""
    from .methods import METHODS, WHOLE_MODEL_METHODS  # late: Elsa imports this module

    processes = launched_processes()
    if processes > 1 and not METHODS[method].whole_model:
        raise ValueError(f"method {method} prunes one layer at a time in one process, but torchrun started "
                         f"{processes} processes (WORLD_SIZE={processes}); only {', '.join(WHOLE_MODEL_METHODS)} "
                         "run distributed: run it as one process (without torchrun, or --nproc-per-node 1), "
                         "or choose one of those")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise (an
    alias: in-place changes under ``torch.no_grad`` change the parameter)."""
    return t.to_local() if hasattr(t, "to_local") else t


# gloo reduces and gathers neither bool nor float8: those travel as bytes of the same size
_AS_BYTES = {torch.bool} | {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}


class Shards:
    """FSDP2 over all processes of the job, on a 1-D mesh of the run's device type.

    :meth:`shard` builds a sharded copy of a model (each of the given layers, then the root,
    ``fully_shard``-ed: every parameter is a DTensor whose local part is a block of rows, dim 0,
    torch.chunk's split) that starts from rank 0's weights, and frees the original's parameters;
    :meth:`unshard` writes the full trained weights back into the original model on every
    process, which is never wrapped itself (evaluation and saving after the prune see an
    ordinary model). :meth:`full` and :meth:`scatter` go between a parameter-shaped full tensor
    and this process's rows of it, for tensors kept alongside a parameter (z, u, masks)."""

    def __init__(self, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.mesh = init_device_mesh(device.type, (self.world,))

    def shard(self, model: nn.Module, layers) -> nn.Module:
        """The sharded copy of ``model``; ``layers(copy)`` lists the modules sharded one by one
        (the decoder layers). Parameters keep their requires_grad; gradients are summed over the
        processes by the reduce-scatter (not averaged: callers scale the loss by the global
        batch, as the data-parallel path does)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # The copy's parameters start on the meta device (no second full copy of the weights);
        # each gets its rows of the original after sharding, and the original's are freed.
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in model.parameters()}
        sharded = copy.deepcopy(model, memo)
        for layer in layers(sharded):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(sharded, mesh=self.mesh)
        for module in sharded.modules():
            if isinstance(module, FSDPModule):
                # a plain SUM reduce-scatter (FSDP's default averages; gloo has no PREMUL_SUM)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        sharded.to_empty(device=self.device)
        originals = dict(model.named_parameters())
        self._homes = {name: p.device for name, p in originals.items()}
        with torch.no_grad():
            for name, p in sharded.named_parameters():
                source = originals[name]
                local(p).copy_(self.scatter(source.detach(), p))  # rank 0's weights on every process
                source.data = torch.empty(0, dtype=source.dtype, device=source.device)
            buffers = dict(model.named_buffers())  # to_empty left them uninitialised
            for name, b in sharded.named_buffers():
                b.copy_(buffers[name])
        return sharded

    def unshard(self, model: nn.Module, sharded: nn.Module) -> None:
        """Every parameter of ``sharded`` gathered (one at a time) into ``model``, on every process."""
        originals = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in sharded.named_parameters():
                originals[name].data = self.full(local(p.detach()), p).to(self._homes[name])

    def full(self, part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The whole tensor whose rows ``part`` holds here, split like parameter ``like`` (a
        collective: every process calls it, in the same order)."""
        from torch.distributed.tensor import DTensor

        as_bytes = part.dtype in _AS_BYTES
        data = part.view(torch.uint8) if as_bytes else part
        whole = DTensor.from_local(data.to(like.device), like.device_mesh, like.placements,
                                   shape=like.shape, stride=like.stride()).full_tensor()
        return whole.view(part.dtype) if as_bytes else whole

    def scatter(self, whole: torch.Tensor, like: torch.Tensor, src: int | None = 0) -> torch.Tensor:
        """This process's rows of ``whole``, split like parameter ``like``: rank ``src``'s values
        (a collective), or with ``src`` None this process's own (no communication)."""
        from torch.distributed.tensor import distribute_tensor

        as_bytes = whole.dtype in _AS_BYTES
        data = whole.view(torch.uint8) if as_bytes else whole
        part = distribute_tensor(data.to(like.device), like.device_mesh, like.placements,
                                 src_data_rank=src).to_local()
        return part.view(whole.dtype) if as_bytes else part

    def distribute(self, whole: torch.Tensor, like: torch.Tensor):
        """``whole`` as a DTensor split like ``like`` (e.g. a loaded Adam moment)."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
