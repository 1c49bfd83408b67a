// One block of the SparseGPT (OBS) sweep, with the mask chosen inside it for N:M.
//
// Layout: one warp per row (rows are independent in the sweep); lane l holds columns
// l, l+32, ... of its row in registers (SLOTS = ceil(B/32) of them, a template parameter so
// every register array is indexed statically). The B x B block of the Hinv factor is shared
// by all rows: it is staged once per thread block in shared memory (64 KiB at B = 128) when
// it fits, else read through the read-only cache. Per column the owning lane broadcasts the
// weight and mask bit with a shuffle, every lane updates its later columns with one FMA per
// slot, and the pruned row, the errors and the row loss are written once at the end.
//
// The unstructured mask ranks all rows x B scores of the block together (one threshold);
// that needs a grid-wide selection before the sweep, so it is taken with ATen's topk (the
// device-wide selection the reference also uses) and passed in as a mask.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "sparsellm_ops.h"

namespace sparsellm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxSmemBytes = 96 * 1024;
// launch() instantiates 1, 2, 4 slots and kMaxSlots for the widest blocks
constexpr int kMaxSlots = kObsMaxBlock / kWarp;
static_assert(kObsMaxBlock % kWarp == 0 && kMaxSlots > 4 && kMaxSlots <= 8,
              "SPARSELLM_OBS_MAX_BLOCK must be a multiple of 32 in (128, 256]: 8 register slots per lane at most");

template <int SLOTS>
__device__ __forceinline__ float pick(const float (&v)[SLOTS], int slot) {
  float out = 0.f;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) out = (s == slot) ? v[s] : out;
  return out;
}

template <int SLOTS, bool NM, bool SMEM>
__global__ void obs_block_kernel(const float* __restrict__ W, const float* __restrict__ H,
                                 const bool* __restrict__ mask, float* __restrict__ Q, float* __restrict__ E,
                                 float* __restrict__ loss, int rows, int B, int n, int m) {
  extern __shared__ float h_smem[];
  const float* h = H;
  if (SMEM) {
    for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) h_smem[idx] = H[idx];
    __syncthreads();
    h = h_smem;
  }
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int row = blockIdx.x * kWarpsPerBlock + warp; row < rows; row += gridDim.x * kWarpsPerBlock) {
    const int64_t base = static_cast<int64_t>(row) * B;
    float w[SLOTS], e[SLOTS], pruned[SLOTS];  // pruned as 0/1 floats: shuffled like the weights
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int j = lane + kWarp * s;
      w[s] = j < B ? W[base + j] : 0.f;
      pruned[s] = (!NM && j < B && mask[base + j]) ? 1.f : 0.f;
      e[s] = 0.f;
    }
    float row_loss = 0.f;
    for (int col = 0; col < B; ++col) {
      if (NM && col % m == 0) {
        // scores of this lane's entries in the group [col, col+m), on the updated weights
        float sc[SLOTS];
        int rank[SLOTS];
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
          const int j = lane + kWarp * s;
          const bool in_grp = j >= col && j < col + m && j < B;
          const float d = in_grp ? h[j * B + j] : 1.f;
          sc[s] = in_grp ? __fdiv_rn(w[s] * w[s], d * d) : 0.f;
          rank[s] = 0;
        }
        for (int i = 0; i < m && col + i < B; ++i) {
          const int ci = col + i;
          const float s_i = __shfl_sync(kFull, pick(sc, ci / kWarp), ci % kWarp);
#pragma unroll
          for (int s = 0; s < SLOTS; ++s) {
            const int j = lane + kWarp * s;
            // NaN ranks above every number, NaNs by index, as in nm_mask.cu
            rank[s] += (s_i < sc[s]) || (s_i == sc[s] && ci < j) || (isnan(sc[s]) && (!isnan(s_i) || ci < j));
          }
        }
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
          const int j = lane + kWarp * s;
          if (j >= col && j < col + m && j < B) pruned[s] = rank[s] < n ? 1.f : 0.f;
        }
      }
      const int owner = col % kWarp, slot = col / kWarp;
      const float wc = __shfl_sync(kFull, pick(w, slot), owner);
      const bool pc = __shfl_sync(kFull, pick(pruned, slot), owner) != 0.f;
      const float d = h[col * B + col];
      const float q = pc ? 0.f : wc;
      const float diff = wc - q;
      row_loss += __fdiv_rn(diff * diff, d * d);
      const float err = __fdiv_rn(diff, d);
      const float* h_row = h + static_cast<int64_t>(col) * B;
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        const int j = lane + kWarp * s;
        if (j > col && j < B) w[s] -= err * h_row[j];
        if (j == col) {
          w[s] = q;  // exactly q, not w - err * d (which only rounds to it)
          e[s] = err;
        }
      }
    }
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int j = lane + kWarp * s;
      if (j < B) {
        Q[base + j] = w[s];
        E[base + j] = e[s];
      }
    }
    if (lane == 0) loss[row] = row_loss;
  }
}

template <int SLOTS, bool NM>
void launch_slots(const at::Tensor& W, const at::Tensor& H, const at::Tensor& mask, at::Tensor& Q, at::Tensor& E,
                  at::Tensor& loss, int n, int m) {
  const int rows = static_cast<int>(W.size(0)), B = static_cast<int>(W.size(1));
  const int threads = kWarp * kWarpsPerBlock;
  const int blocks = std::max(1, std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535));
  const size_t smem = static_cast<size_t>(B) * B * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool* mp = NM ? nullptr : mask.data_ptr<bool>();
  // the Hinv block is staged in shared memory where this device lets a block opt in to that
  // much (227 KiB on Hopper, 64 KiB on a T4); otherwise the kernel reads it from global memory
  int device = 0, optin_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem <= static_cast<size_t>(std::min(kMaxSmemBytes, optin_bytes))) {
    auto kernel = obs_block_kernel<SLOTS, NM, true>;
    // above 48 KiB of dynamic shared memory a kernel must opt in explicitly
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<blocks, threads, smem, stream>>>(W.data_ptr<float>(), H.data_ptr<float>(), mp, Q.data_ptr<float>(),
                                              E.data_ptr<float>(), loss.data_ptr<float>(), rows, B, n, m);
  } else {
    obs_block_kernel<SLOTS, NM, false><<<blocks, threads, 0, stream>>>(
        W.data_ptr<float>(), H.data_ptr<float>(), mp, Q.data_ptr<float>(), E.data_ptr<float>(),
        loss.data_ptr<float>(), rows, B, n, m);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool NM>
void launch(const at::Tensor& W, const at::Tensor& H, const at::Tensor& mask, at::Tensor& Q, at::Tensor& E,
            at::Tensor& loss, int n, int m) {
  const int64_t B = W.size(1);
  if (B <= 32) return launch_slots<1, NM>(W, H, mask, Q, E, loss, n, m);
  if (B <= 64) return launch_slots<2, NM>(W, H, mask, Q, E, loss, n, m);
  if (B <= 128) return launch_slots<4, NM>(W, H, mask, Q, E, loss, n, m);
  return launch_slots<kMaxSlots, NM>(W, H, mask, Q, E, loss, n, m);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_prune_block(const at::Tensor& weight, const at::Tensor& hinv,
                                                               double fraction, int64_t n, int64_t m,
                                                               const c10::optional<at::Tensor>& prune_mask) {
  SPARSELLM_CHECK_CUDA(weight);
  SPARSELLM_CHECK_CUDA(hinv);
  TORCH_CHECK(weight.dim() == 2 && hinv.dim() == 2, "obs_prune_block expects 2-D weight and hinv");
  const int64_t rows = weight.size(0), B = weight.size(1);
  TORCH_CHECK(hinv.size(0) == B && hinv.size(1) == B, "hinv must be B x B with B = weight.size(1)");
  TORCH_CHECK(B <= kObsMaxBlock, "obs_prune_block supports blocks of at most ", kObsMaxBlock, " columns");
  // the kernel runs on the weight's device and reads hinv through a raw pointer: a factor on
  // another GPU would be an illegal access there (the reference refuses mixed devices)
  TORCH_CHECK(hinv.device() == weight.device(), "hinv must be on the weight's device (", weight.device(),
              "), got ", hinv.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor W = weight.to(at::kFloat).contiguous();
  const at::Tensor H = hinv.to(at::kFloat).contiguous();
  const bool nm = !prune_mask.has_value() && n > 0;
  at::Tensor mask;
  if (prune_mask.has_value()) {
    // the kernel reads the mask through a device pointer: a host mask would be an illegal access
    TORCH_CHECK(prune_mask->device() == W.device(), "prune_mask must be on the weight's device (",
                W.device(), "), got ", prune_mask->device());
    mask = prune_mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask.sizes() == W.sizes(), "prune_mask must have the weight's shape");
  } else if (!nm) {
    const at::Tensor d = H.diagonal();
    const at::Tensor score = W.pow(2) / d.unsqueeze(0).pow(2);
    // floor with the slack of sparsellm.sparsity.pruned_count (PRUNED_COUNT_SLACK), so both count alike
    const int64_t k = static_cast<int64_t>(static_cast<double>(rows * B) * fraction + 1e-6);
    mask = at::zeros({rows * B}, W.options().dtype(at::kBool));
    if (k > 0) mask.index_fill_(0, std::get<1>(score.flatten().topk(k, -1, /*largest=*/false)), true);
    mask = mask.view({rows, B});
  }
  if (nm) TORCH_CHECK(m >= 1 && n <= m && B % m == 0, "invalid N:M pattern ", n, ":", m, " for width ", B);
  at::Tensor Q = at::empty_like(W), E = at::empty_like(W);
  // zeros, not empty: a block of no columns launches nothing, and its rows' losses are 0
  at::Tensor loss = at::zeros({rows}, W.options());
  if (rows > 0 && B > 0) {
    if (nm) launch<true>(W, H, mask, Q, E, loss, static_cast<int>(n), static_cast<int>(m));
    else launch<false>(W, H, mask, Q, E, loss, 0, 1);
  }
  return {Q.to(weight.scalar_type()), E.to(weight.scalar_type()), (loss.sum() / 2).to(weight.scalar_type())};
}

}  // namespace sparsellm
