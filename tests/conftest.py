"""Test-session setup shared by every test file.

- Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The
  interpreter is chosen when a kernel is *decorated*, i.e. when a kernel module is imported,
  so TRITON_INTERPRET must be set here, before any test module imports sparsellm.kernels.
  With a GPU it is left unset: the kernels then compile for the device.
- Tests marked ``gpu`` are skipped cleanly when no CUDA device is present.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """A test that leaves autograd off (torch.set_grad_enabled(False) outside a context, e.g. a
    benchmark script's main() run in-process) fails itself, instead of every later test that
    trains (Elsa's failed 'element 0 of tensors does not require grad' far from the cause). The
    thread count a script's main() sets (--threads) is put back: a later test of the CPU
    backend's two-thread path ran one thread."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd disabled")
