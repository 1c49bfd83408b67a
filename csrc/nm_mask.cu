// N:M prune masks fused with their score: one thread per group of m <= kMaxM consecutive entries
// of a row. The m scores live in registers (the loops are unrolled to the maximum m with
// guards, so the arrays are indexed statically and never spill to local memory); each entry's
// rank is the number of group entries before it in the pruning order (lower score, ties by
// position) and the n lowest ranks are pruned. The score is never written to memory.
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h): the latter pulls in the
// cuSPARSE/cuBLAS headers, which a compiler-only toolkit (as on the build machine) lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "sparsellm_ops.h"

namespace sparsellm {
namespace {

// float64 raw scores are compared in double; everything else in float (exact for fp16/bf16).
template <typename T>
using score_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T, int MODE>
__device__ __forceinline__ score_t<T> group_score(T x, float aux) {
  if (MODE == kScoreWanda) return fabsf(static_cast<float>(x)) * aux;
  return static_cast<score_t<T>>(x);
}

template <typename T, int MODE>
__global__ void nm_mask_kernel(const T* __restrict__ x, const float* __restrict__ aux, bool* __restrict__ out,
                               int64_t rows, int64_t cols, int n, int m) {
  const int64_t groups_per_row = cols / m;
  const int64_t total = rows * groups_per_row;
  for (int64_t gid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gid < total;
       gid += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = gid / groups_per_row;
    const int64_t col0 = (gid % groups_per_row) * m;
    const T* src = x + row * cols + col0;
    score_t<T> s[kMaxM];
#pragma unroll
    for (int j = 0; j < kMaxM; ++j) {
      if (j < m) s[j] = group_score<T, MODE>(src[j], MODE == kScoreRaw ? 0.f : __ldg(aux + col0 + j));
    }
    bool* dst = out + row * cols + col0;
#pragma unroll
    for (int j = 0; j < kMaxM; ++j) {
      if (j >= m) break;
      int rank = 0;
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i >= m) break;
        // NaN ranks above every number, NaNs by index (torch.topk's order, the reference's):
        // without the last clause a NaN would rank first and its group lose more than n
        rank += (s[i] < s[j]) || (s[i] == s[j] && i < j) || (isnan(s[j]) && (!isnan(s[i]) || i < j));
      }
      dst[j] = rank < n;
    }
  }
}

template <typename T>
void launch(const at::Tensor& x, const float* aux, at::Tensor& out, int n, int m, int mode) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t total = rows * (cols / m);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = x.data_ptr<T>();
  bool* op = out.data_ptr<bool>();
  switch (mode) {
    case kScoreWanda:
      nm_mask_kernel<T, kScoreWanda><<<blocks, threads, 0, stream>>>(xp, aux, op, rows, cols, n, m);
      break;
    default:
      nm_mask_kernel<T, kScoreRaw><<<blocks, threads, 0, stream>>>(xp, aux, op, rows, cols, n, m);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor nm_mask(const at::Tensor& x_in, const c10::optional<at::Tensor>& aux_in, int64_t n, int64_t m,
                   int64_t mode) {
  SPARSELLM_CHECK_CUDA(x_in);
  TORCH_CHECK(x_in.dim() == 2, "nm_mask expects a 2-D tensor");
  TORCH_CHECK(m >= 1 && m <= kMaxM, "nm_mask supports 1 <= m <= ", kMaxM, ", got m=", m);
  TORCH_CHECK(n >= 0 && n <= m, "need 0 <= n <= m, got ", n, ":", m);
  TORCH_CHECK(x_in.size(1) % m == 0, x_in.size(1), " columns are not a multiple of m=", m);
  TORCH_CHECK(mode == kScoreRaw || mode == kScoreWanda, "unknown score mode ", mode);
  TORCH_CHECK(mode == kScoreRaw || aux_in.has_value(), "the Wanda score needs aux (the input norms)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor aux;
  if (mode != kScoreRaw) {
    aux = aux_in->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(aux.numel() == x.size(1), "aux must have one entry per column");
  }
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  if (x.numel() == 0) return out;
  const float* auxp = mode != kScoreRaw ? aux.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nm_mask",
                                  [&] { launch<scalar_t>(x, auxp, out, static_cast<int>(n), static_cast<int>(m),
                                                         static_cast<int>(mode)); });
  return out;
}

}  // namespace sparsellm
