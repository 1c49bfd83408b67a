// Python bindings of the CUDA extension sparsellm._C. Registered with sparsellm.ops by
// sparsellm/_cuda_backend.py, which adapts them to the reference signatures.
#include <torch/extension.h>

#include "sparsellm_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "sparsellm CUDA kernels: OBS block sweep, damped Cholesky / inverse factor, N:M masks";
  mod.def("obs_prune_block", &sparsellm::obs_prune_block, "OBS block sweep -> (q, err, loss)",
          pybind11::arg("weight"), pybind11::arg("hinv"), pybind11::arg("fraction"), pybind11::arg("n"),
          pybind11::arg("m"), pybind11::arg("prune_mask") = pybind11::none());
  mod.def("damped_cholesky", &sparsellm::damped_cholesky,
          "batched damped Cholesky with per-matrix retry -> (L, percdamp_used, attempts)",
          pybind11::arg("gram"), pybind11::arg("percdamp"), pybind11::arg("max_tries") = 6);
  mod.def("cholesky_inverse_upper", &sparsellm::cholesky_inverse_upper,
          "upper Cholesky factor of the inverse of the damped Gram matrix -> (U, percdamp_used, attempts)",
          pybind11::arg("gram"), pybind11::arg("percdamp"), pybind11::arg("max_tries") = 6);
  mod.def("nm_mask", &sparsellm::nm_mask, "N:M prune mask fused with the score",
          pybind11::arg("x"), pybind11::arg("aux"), pybind11::arg("n"), pybind11::arg("m"),
          pybind11::arg("mode") = static_cast<int64_t>(sparsellm::kScoreRaw));
  // the values of sparsellm/kernel_constants.py this build was compiled with; the CUDA backend
  // refuses an extension whose values differ from the Python side's
  mod.def("compiled_constants", [] {
    pybind11::dict out;
    out["MAX_M"] = SPARSELLM_MAX_M;
    out["SCORE_RAW"] = SPARSELLM_SCORE_RAW;
    out["SCORE_WANDA"] = SPARSELLM_SCORE_WANDA;
    out["OBS_MAX_BLOCK"] = SPARSELLM_OBS_MAX_BLOCK;
    return out;
  }, "the SPARSELLM_* constants this extension was compiled with");
}
