"""A module kept in host memory, worked on on the compute device, and sent home into the very
host tensors it came with.

The driver runs one decoder layer at a time on the device (and the allocation's pass and the
capture of the first layer's inputs do the same). ``module.to(device)`` and back ``.to(home)``
allocates fresh host memory for every weight on the way home, and a device-to-host copy into
freshly allocated pageable memory pays for the new pages as it goes: on an H200 at commit
f8def43 the weights of random 7B-shaped layers came home at about 0.7 GB/s (SparseGPT's profile:
30 device-to-host copies of 37 ms on average for two layers, about a quarter of its time per
layer; ``benchmarks/results/gpu_h200_f8def43/sparsegpt_0.7_auto.md``). Written into the host
tensors the module already has, whose pages are mapped, the same bytes need no new memory; and a
module the block did not change needs no copy at all, its host tensors still hold its weights.
Measured on an H200 at f1dea5c (benchmarks/RESULTS.md, "SparseLLM at 7B shapes", run 4): the
time outside the layers' records fell by 0.12-0.18 s per 7B layer, less than expected.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor, torch.Tensor]]:
    """Every parameter and buffer of ``module`` as (owner, "_parameters" or "_buffers", name, the
    object, its tensor): ``Module.to`` gives a parameter new ``.data`` (the Parameter stays) and a
    buffer a new tensor in its owner's dict."""
    slots = []
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, obj in getattr(owner, kind).items():
                if obj is not None:
                    slots.append((owner, kind, name, obj, obj.data if kind == "_parameters" else obj))
    return slots


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr()


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, *, changed: bool = True) -> Iterator[nn.Module]:
    """Inside the block ``module`` is on ``device``. When the block ends (also by an exception,
    in the state the block left it in), every parameter and buffer that moved is its original
    tensor again (the same storage, where it was before), holding the block's final values if
    ``changed`` (copied back), untouched otherwise: pass ``changed=False`` only for blocks that
    never write the module's weights. A tensor the block replaced by a new Parameter, or whose
    shape or dtype it changed (as compacting a structured layer does:
    :func:`sparsellm.structure.compact_model`), goes home as a copy of its own."""
    slots = _slots(module)
    try:
        module.to(device)
        yield module
    finally:
        _go_home(slots, changed)


def _go_home(slots, changed: bool) -> None:
    """Each moved tensor of ``slots`` (:func:`_slots`) back into its host tensor, or home as a copy."""
    for owner, kind, name, obj, home in slots:
        table = getattr(owner, kind)
        now = table.get(name)
        if now is None:
            continue
        current = now.data if kind == "_parameters" else now
        if _same_storage(current, home):  # never moved (already on the device)
            continue
        replaced = kind == "_parameters" and now is not obj
        if replaced or current.shape != home.shape or current.dtype != home.dtype:
            moved_home = current.to(home.device)
            if kind == "_parameters":
                now.data = moved_home
            else:
                table[name] = moved_home
            continue
        if changed:
            home.copy_(current)
        if kind == "_parameters":
            now.data = home
        else:
            table[name] = home
