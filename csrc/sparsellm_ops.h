// Declarations shared by the .cu files and the bindings.
#pragma once
// ATen only (not torch/extension.h): the .cu files need tensors, not pybind11 and the C++
// frontend, which would multiply nvcc time and drag in their header warnings.
#include <ATen/ATen.h>

#include <tuple>

// The constants shared with the Python side have one definition, sparsellm/kernel_constants.py,
// and reach this code as -D definitions (setup.py and sparsellm/_extension.py pass them): a
// compile without them is an error, never a silent default.
#if !defined(SPARSELLM_MAX_M) || !defined(SPARSELLM_SCORE_RAW) || !defined(SPARSELLM_SCORE_WANDA) || \
    !defined(SPARSELLM_OBS_MAX_BLOCK)
#error "compile with the -DSPARSELLM_* definitions of sparsellm/kernel_constants.py (compile_definitions())"
#endif

namespace sparsellm {

// Score modes of the mask kernels.
enum ScoreMode : int { kScoreRaw = SPARSELLM_SCORE_RAW, kScoreWanda = SPARSELLM_SCORE_WANDA };
// Largest M of an N:M mask (nm_mask.cu) and widest block of the OBS sweep (obs_block.cu).
constexpr int kMaxM = SPARSELLM_MAX_M;
constexpr int kObsMaxBlock = SPARSELLM_OBS_MAX_BLOCK;

// obs_block.cu: one block of the SparseGPT sweep. prune_mask: bool [rows, B] or None (then
// N:M chosen inside the sweep when n > 0, else the unstructured mask over the whole block).
std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_prune_block(
    const at::Tensor& weight, const at::Tensor& hinv, double fraction, int64_t n, int64_t m,
    const c10::optional<at::Tensor>& prune_mask);

// cholesky.cu: returns (L, percdamp_used, attempts); attempts = -1 when even the largest
// dampening failed (the Python side raises NotPositiveDefinite, as the reference does).
std::tuple<at::Tensor, at::Tensor, int64_t> damped_cholesky(const at::Tensor& gram, double percdamp,
                                                            int64_t max_tries);
std::tuple<at::Tensor, at::Tensor, int64_t> cholesky_inverse_upper(const at::Tensor& gram, double percdamp,
                                                                   int64_t max_tries);

// nm_mask.cu: N:M prune mask of x scored by mode (raw: x is the score; Wanda: aux is the input norm).
at::Tensor nm_mask(const at::Tensor& x, const c10::optional<at::Tensor>& aux, int64_t n, int64_t m,
                   int64_t mode);

}  // namespace sparsellm

#define SPARSELLM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
