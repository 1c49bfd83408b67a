"""CPU sparse inference: float32 CSR linears (:class:`CSRLinear`, :func:`to_csr`)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..sparsity import reaches_sparsity, zero_fraction
from .errors import ExportError
from .targets import ON_META, replace_module, resolve_targets

# CPU float32 CSR matmul (MKL) measured faster than dense from about this sparsity on for
# 4096x4096 linears at token batches 1..128 (benchmarks/export_table.py; RESULTS.md, "Sparse export").
CSR_MIN_SPARSITY = 0.9


class CSRLinear(nn.Module):
    """A linear whose weight is a float32 sparse CSR matrix: y = x W^T + b computed as
    (W @ x^T)^T with torch's sparse-dense matmul (MKL on x86 CPUs). Inputs of any float dtype
    are computed in float32 and returned in their own dtype.

    The CSR arrays are kept as three plain buffers and the sparse tensor is assembled from them
    on each call (about 2 us, no copy, against milliseconds for the product): a buffer holding
    a CSR tensor cannot be deep-copied, and a model-wide ``.half()`` would make it one that
    MKL cannot multiply; plain buffers copy, move and cast like any other (the product still
    runs in float32)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(torch.float32)
        self.sparsity = zero_fraction(weight)
        with warnings.catch_warnings():  # torch flags all CSR use as "beta" on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        # (out, 1) so addmm broadcasts it over the token columns of W @ x^T
        self.register_buffer("bias_col", None if bias is None else bias.unsqueeze(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The number of stored values is the pattern's, not the module's: a state dict of
        # another pruning of the same linear has other lengths. The incoming arrays are checked
        # first as a CSR matrix of this shape (forward skips that check), so a bad state dict
        # changes nothing; then the two per-value buffers take the incoming length
        # (load_state_dict copies in place and would refuse it) and the recorded sparsity
        # follows the loaded pattern.
        names = ("crow_indices", "col_indices", "values")
        incoming = [state_dict.get(prefix + name) for name in names]
        if all(isinstance(t, torch.Tensor) for t in incoming):
            crow, col, values = incoming
            try:
                self._csr(crow, col, values, check=True)
            except RuntimeError as err:
                error_msgs.append(f"the arrays at {prefix or '(root)'} are not a CSR matrix of shape "
                                  f"({self.out_features}, {self.in_features}): {err}")
                return
            for name, tensor in zip(names[1:], (col, values)):
                own = self._buffers[name]
                if own.shape != tensor.shape:
                    self._buffers[name] = own.new_empty(tensor.shape)
            self.sparsity = 1.0 - int(torch.count_nonzero(values)) / (self.out_features * self.in_features)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _csr(self, crow, col, values, check: bool = False) -> torch.Tensor:
        return torch.sparse_csr_tensor(crow, col, values.float(), (self.out_features, self.in_features),
                                       check_invariants=check)

    def weight_csr(self) -> torch.Tensor:
        """The float32 CSR weight [out_features, in_features], over the buffers."""
        # the buffers came from to_sparse_csr (or were checked when loaded): no invariant check per call
        return self._csr(self.crow_indices, self.col_indices, self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self.bias_col is None:
            y = torch.sparse.mm(self.weight_csr(), x2.t())
        else:
            y = torch.addmm(self.bias_col.float(), self.weight_csr(), x2.t())
        return y.t().reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_col is not None}, sparsity={self.sparsity:.3f}")


def to_csr(model, *, min_sparsity: float = CSR_MIN_SPARSITY, targets: list[str] | None = None) -> dict:
    """Replace targeted linears pruned to at least ``min_sparsity`` (up to the pruners' rounding:
    :func:`~sparsellm.sparsity.reaches_sparsity`) by :class:`CSRLinear`; below it CSR measured
    slower than dense, so those stay dense. Returns a JSON-able report."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ExportError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
    selected, _, _ = resolve_targets(model, targets)
    report = {"kind": "csr", "min_sparsity": min_sparsity, "converted": {}, "dense": {}}
    for name, lin in selected.items():
        if lin.weight.device.type == "meta":
            report["dense"][name] = ON_META
            continue
        sparsity = zero_fraction(lin.weight.detach())
        if not reaches_sparsity(sparsity, min_sparsity, lin.weight.shape[-1]):
            report["dense"][name] = f"sparsity {sparsity:.5f} < {min_sparsity:g}, where CSR stops beating dense"
            continue
        replace_module(model, name, CSRLinear(lin))
        report["converted"][name] = round(sparsity, 6)
    report["n_converted"] = len(report["converted"])
    report["n_dense"] = len(report["dense"])
    return report
