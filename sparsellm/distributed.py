"""Processes of a ``torchrun`` job: which one this is, and which one writes the outputs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size). Joins the process group that torchrun describes in the environment
    (gloo for CPU tensors, nccl where CUDA is available) on first use; (0, 1) for one process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in a single-process run and in rank 0: the process that saves and reports."""
    return not dist.is_initialized() or dist.get_rank() == 0
