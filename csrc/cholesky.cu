// Batched dampened Cholesky with per-matrix retry, and the upper Cholesky factor of the
// inverse (what the OBS sweep walks along).
//
// Hand-written: the gather-and-damp kernel that builds G_b + lambda_b I for exactly the
// matrices still being (re)tried, in one pass (no index_select + diagonal add round trip),
// so a retry touches only the matrices that failed.
// Library calls, on purpose: the factorisation (at::linalg_cholesky_ex -> cuSOLVER potrf,
// batched) and the triangular inverse (at::linalg_solve_triangular -> cuBLAS trsm). Both are
// blocked, tensor-core-backed and report per-matrix failure (info); a hand-written Cholesky
// is a chain of n dependent panel steps that would be slower and less robust.
//
// The inverse factor avoids the reference's explicit inverse and second Cholesky: with J the
// index reversal, factor J G J = L L^T; then G = R R^T with R = J L J upper, so
// G^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J, which has a positive diagonal and therefore is
// the unique upper Cholesky factor of G^-1.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <c10/util/accumulate.h>

#include <limits>

#include "sparsellm_ops.h"

namespace sparsellm {
namespace {

// out[k] = gram[idx[k]] + damp[idx[k]] * mean_diag[idx[k]] * I
template <typename T>
__global__ void gather_damp_kernel(const T* __restrict__ gram, const int64_t* __restrict__ idx,
                                   const T* __restrict__ damp, const T* __restrict__ mean_diag, T* __restrict__ out,
                                   int64_t count, int64_t n) {
  const int64_t nn = n * n;
  const int64_t total = count * nn;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = t / nn, within = t % nn;
    const int64_t src = idx[k];
    T v = gram[src * nn + within];
    if (within / n == within % n) v += damp[src] * mean_diag[src];
    out[t] = v;
  }
}

at::Tensor gather_damp(const at::Tensor& gram, const at::Tensor& idx, const at::Tensor& damp,
                       const at::Tensor& mean_diag) {
  const int64_t count = idx.numel(), n = gram.size(-1);
  at::Tensor out = at::empty({count, n, n}, gram.options());
  if (count == 0 || n == 0) return out;  // nothing to write: a launch of 0 blocks would be an error
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((count * n * n + threads - 1) / threads, 65535LL * 4);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "gather_damp", [&] {
    gather_damp_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        gram.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), damp.data_ptr<scalar_t>(),
        mean_diag.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), count, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t> damped_cholesky(const at::Tensor& gram_in, double percdamp,
                                                            int64_t max_tries) {
  SPARSELLM_CHECK_CUDA(gram_in);
  TORCH_CHECK(gram_in.dim() >= 2 && gram_in.size(-1) == gram_in.size(-2), "damped_cholesky expects [..., n, n]");
  TORCH_CHECK(gram_in.scalar_type() == at::kFloat || gram_in.scalar_type() == at::kDouble,
              "damped_cholesky supports float32 and float64");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const int64_t n = gram_in.size(-1);
  const auto batch_shape = gram_in.sizes().slice(0, gram_in.dim() - 2);
  // the batch size from the batch shape, not reshape's -1, which is ambiguous for n = 0 (no elements)
  const int64_t batch = c10::multiply_integers(batch_shape);
  const at::Tensor gram = gram_in.reshape({batch, n, n}).contiguous();
  const double tiny = gram.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                       : std::numeric_limits<double>::min();
  const at::Tensor mean_diag = gram.diagonal(0, -2, -1).mean(-1).clamp_min(tiny).contiguous();
  at::Tensor damp = at::full({batch}, percdamp, gram.options());
  at::Tensor lower = at::empty_like(gram);
  at::Tensor todo = at::arange(batch, gram.options().dtype(at::kLong));
  for (int64_t attempt = 0; attempt < max_tries; ++attempt) {
    const at::Tensor damped = gather_damp(gram, todo, damp, mean_diag);
    auto [chol, info] = at::linalg_cholesky_ex(damped);
    lower.index_copy_(0, todo, chol);
    const at::Tensor failed = info.ne(0);
    if (!failed.any().item<bool>()) {
      std::vector<int64_t> lshape(gram_in.sizes().begin(), gram_in.sizes().end());
      return {lower.view(lshape), damp.view(batch_shape), attempt};
    }
    todo = todo.masked_select(failed);            // only the failed matrices are retried
    damp.index_copy_(0, todo, damp.index_select(0, todo) * 10);
  }
  std::vector<int64_t> lshape(gram_in.sizes().begin(), gram_in.sizes().end());
  return {lower.view(lshape), damp.view(batch_shape), -1};
}

std::tuple<at::Tensor, at::Tensor, int64_t> cholesky_inverse_upper(const at::Tensor& gram, double percdamp,
                                                                   int64_t max_tries) {
  // damping adds lambda I, which commutes with the reversal; the mean diagonal is unchanged
  auto [lower, damp, attempts] = damped_cholesky(gram.flip({-2, -1}), percdamp, max_tries);
  if (attempts < 0) return {lower, damp, attempts};
  const int64_t n = gram.size(-1);
  const at::Tensor eye = at::eye(n, lower.options()).expand_as(lower);
  const at::Tensor inv_lower = at::linalg_solve_triangular(lower, eye, /*upper=*/false);
  return {inv_lower.flip({-2, -1}), damp, attempts};
}

}  // namespace sparsellm
