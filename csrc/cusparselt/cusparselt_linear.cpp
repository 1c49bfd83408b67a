// SparseLtLinear: y = x @ W^T with a 2:4 weight W through cuSPARSELt, with the matmul plan built
// once per token count and reused.
//
// Why this exists: torch._cslt_sparse_mm (what to_sparse_semi_structured uses with cuSPARSELt)
// builds the descriptors, algorithm selection and plan on every call, which costs hundreds of
// microseconds on Hopper whatever the size. Here the weight is checked and compressed once, and
// everything that depends on the token count T is built on the first call with that T, kept in a
// map, and reused: a later call is one cusparseLtMatmul launch.
//
// Layout (cuSPARSELt computes D = op(A) op(B) with A structured):
//   A = W   [N, K] row-major, op N, 2:4 along K (groups of 4 inputs, the pattern we prune to)
//   B = x   [T, K] row-major as given, op T, so op(B) = x^T [K, T]
//   D = y^T [N, T] column-major with ld = N, which is exactly y [T, N] row-major in memory: the
//       transpose of the result costs nothing. If a cuSPARSELt build rejects that combination
//       (plan init or the first launch fails), the plan falls back to D row-major [N, T] and the
//       result is transposed with a copy (fused_output(T) says which one a plan uses).
// Shape rules (fp16/bf16): the structured matrix's rows and columns must be multiples of 16 and
// the dense ones' of 8 (torch encodes the same table for its cuSPARSELt backend), and every
// pointer 16-byte aligned. T is padded up to a multiple of 8 with zero rows when needed.
//
// Built by sparsellm/export/cusparselt.py (JIT, separately from sparsellm._C: cuSPARSELt may be
// missing where the main extension builds). Not thread-safe for concurrent calls on several
// streams with the same T: a plan's workspace is shared by its calls.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusparseLt.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr uint32_t kAlignment = 16;      // bytes; caching-allocator blocks are 512-aligned
constexpr int64_t kSparseMultiple = 16;  // rows/cols of the structured matrix, fp16/bf16
constexpr int64_t kDenseMultiple = 8;    // rows/cols of the dense matrices, fp16/bf16

std::string status_text(cusparseStatus_t status) {
  const char* name = cusparseLtGetErrorName(status);
  const char* text = cusparseLtGetErrorString(status);
  return std::string(name ? name : "?") + " (" + (text ? text : "?") + ", code " +
         std::to_string(static_cast<int>(status)) + ")";
}

#define SLT_CHECK(expr)                                                                   \
  do {                                                                                    \
    cusparseStatus_t slt_status_ = (expr);                                                \
    TORCH_CHECK(slt_status_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt call failed: ", #expr, \
                " -> ", status_text(slt_status_));                                        \
  } while (0)

#define SLT_CUDA_CHECK(expr)                                                                 \
  do {                                                                                       \
    cudaError_t slt_err_ = (expr);                                                           \
    TORCH_CHECK(slt_err_ == cudaSuccess, "CUDA call failed: ", #expr, " -> ",                \
                cudaGetErrorName(slt_err_), " (", cudaGetErrorString(slt_err_), ")");        \
  } while (0)

// One cuSPARSELt handle per device for the whole process, created on first use. A handle is
// tied to the device current at cusparseLtInit (the caller holds a device guard). Never
// destroyed: it lives as long as the process, and destroying it from a static destructor could
// run after the CUDA runtime is torn down.
const cusparseLtHandle_t* handle_for(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  auto handle = std::make_unique<cusparseLtHandle_t>();
  SLT_CHECK(cusparseLtInit(handle.get()));
  return handles.emplace(device, std::move(handle)).first->second.get();
}

cudaDataType value_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "SparseLtLinear supports float16 and bfloat16 weights, got ", dtype);
  }
}

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignment == 0;
}

// Everything that depends on the token count. Heap-allocated and never moved (the map holds
// unique_ptrs): the matmul descriptor refers to the matrix descriptors and the plan to the
// algorithm selection (MatmulSearch writes its choice there), so their addresses must stay put.
struct Plan {
  int64_t tokens = 0;
  bool fused = true;      // D column-major = y [T, N] directly (else y^T row-major + a copy)
  bool verified = false;  // a launch with this plan succeeded (the fallback is only tried before)
  bool searched = false;
  cusparseLtMatDescriptor_t x_desc{}, y_desc{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  bool has_x = false, has_y = false, has_alg = false, has_plan = false;
  at::Tensor workspace;  // uint8 on the device, or undefined when the plan needs none

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    // Destructors must not throw: statuses are ignored here. (There is no
    // cusparseLtMatmulDescriptorDestroy in cuSPARSELt 0.8: the descriptor owns nothing.)
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg);
    if (has_y) cusparseLtMatDescriptorDestroy(&y_desc);
    if (has_x) cusparseLtMatDescriptorDestroy(&x_desc);
  }
  void* workspace_ptr() const { return workspace.defined() ? workspace.data_ptr() : nullptr; }
};

class SparseLtLinear {
 public:
  // fuse_output=false always uses the y^T-plus-copy layout (to measure what the fused one saves).
  explicit SparseLtLinear(const at::Tensor& weight_in, bool fuse_output = true) : fuse_output_(fuse_output) {
    TORCH_CHECK(weight_in.is_cuda(), "SparseLtLinear: the weight must be a CUDA tensor");
    TORCH_CHECK(weight_in.dim() == 2, "SparseLtLinear: the weight must be 2-D [out, in], got ",
                weight_in.dim(), "-D");
    dtype_ = weight_in.scalar_type();
    type_ = value_type(dtype_);
    out_features_ = weight_in.size(0);
    in_features_ = weight_in.size(1);
    TORCH_CHECK(out_features_ % kSparseMultiple == 0 && in_features_ % kSparseMultiple == 0,
                "SparseLtLinear: cuSPARSELt needs both weight dimensions to be multiples of ",
                kSparseMultiple, " for 16-bit types, got [", out_features_, ", ", in_features_, "]");
    device_ = weight_in.get_device();
    c10::cuda::CUDAGuard guard(device_);
    handle_ = handle_for(device_);
    at::Tensor weight = weight_in.contiguous();
    if (!aligned(weight)) weight = weight.clone();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();

    SLT_CHECK(cusparseLtStructuredDescriptorInit(handle_, &w_desc_, out_features_, in_features_,
                                                 in_features_, kAlignment, type_, CUSPARSE_ORDER_ROW,
                                                 CUSPARSELT_SPARSITY_50_PERCENT));
    has_w_desc_ = true;

    // The "2" helpers take the matrix descriptor instead of a matmul descriptor: the weight is
    // checked and compressed once, before any (per-T) matmul exists. d_valid ends 0 when every
    // group of 4 along K holds at most 2 non-zeros (zeroed first in case only a failure writes).
    at::Tensor valid = at::zeros({1}, weight.options().dtype(at::kInt));
    SLT_CHECK(cusparseLtSpMMAPruneCheck2(handle_, &w_desc_, /*isSparseA=*/1,
                                         CUSPARSE_OPERATION_NON_TRANSPOSE, weight.data_ptr(),
                                         valid.data_ptr<int>(), stream));
    TORCH_CHECK(valid.item<int>() == 0,
                "SparseLtLinear: the weight is not 2:4 sparse along its input dimension (some group "
                "of 4 consecutive inputs holds more than 2 non-zeros); prune it to 2:4 first");

    size_t compressed_size = 0, buffer_size = 0;
    SLT_CHECK(cusparseLtSpMMACompressedSize2(handle_, &w_desc_, &compressed_size, &buffer_size));
    compressed_ = at::empty({static_cast<int64_t>(compressed_size)}, weight.options().dtype(at::kByte));
    // The compression scratch buffer is only needed during the call: freeing the tensor after
    // the launch is stream-ordered by the caching allocator, so it is not reused too early.
    at::Tensor scratch;
    if (buffer_size > 0) scratch = at::empty({static_cast<int64_t>(buffer_size)}, compressed_.options());
    SLT_CHECK(cusparseLtSpMMACompress2(handle_, &w_desc_, /*isSparseA=*/1,
                                       CUSPARSE_OPERATION_NON_TRANSPOSE, weight.data_ptr(),
                                       compressed_.data_ptr(), scratch.defined() ? scratch.data_ptr() : nullptr,
                                       stream));
    // The dense weight is not kept: the matmul reads only the compressed copy.
  }

  ~SparseLtLinear() {
    plans_.clear();  // plans first: they were built on the weight descriptor
    if (has_w_desc_) cusparseLtMatDescriptorDestroy(&w_desc_);
  }

  SparseLtLinear(const SparseLtLinear&) = delete;
  SparseLtLinear& operator=(const SparseLtLinear&) = delete;

  at::Tensor forward(const at::Tensor& x_in) {
    TORCH_CHECK(x_in.is_cuda() && x_in.get_device() == device_,
                "SparseLtLinear.forward: x must be on cuda:", device_, ", like the weight");
    TORCH_CHECK(x_in.scalar_type() == dtype_, "SparseLtLinear.forward: x is ", x_in.scalar_type(),
                " but the weight is ", dtype_);
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in_features_,
                "SparseLtLinear.forward: x must be [T, ", in_features_, "], got ", x_in.sizes());
    c10::cuda::CUDAGuard guard(device_);
    const int64_t tokens = x_in.size(0);
    if (tokens == 0) return at::empty({0, out_features_}, x_in.options());
    at::Tensor x = x_in.contiguous();
    const int64_t padded = padded_tokens(tokens);
    if (padded != tokens) {
      x = at::constant_pad_nd(x, {0, 0, 0, padded - tokens}, 0);  // zero rows, sliced off below
    } else if (!aligned(x)) {
      x = x.clone();
    }
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();

    Plan* plan = plan_for(padded);
    at::Tensor out = alloc_output(*plan, x.options());
    cusparseStatus_t status = launch(*plan, x, out, stream);
    if (status != CUSPARSE_STATUS_SUCCESS && plan->fused && !plan->verified) {
      // The fused (column-major D) layout was accepted at plan time but not at launch: use the
      // plain layout for this T from now on.
      plan = rebuild(padded, /*fused=*/false);
      out = alloc_output(*plan, x.options());
      status = launch(*plan, x, out, stream);
    }
    TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt call failed: cusparseLtMatmul (T=",
                padded, ", K=", in_features_, ", N=", out_features_, ") -> ", status_text(status));
    plan->verified = true;
    if (plan->fused) return padded == tokens ? out : out.narrow(0, 0, tokens);
    return out.narrow(1, 0, tokens).t().contiguous();
  }

  // Build (if needed) the plan for T tokens without running anything: lets a benchmark keep the
  // one-time plan cost out of its timings.
  void prepare(int64_t tokens) {
    TORCH_CHECK(tokens > 0, "SparseLtLinear.prepare: tokens must be positive");
    c10::cuda::CUDAGuard guard(device_);
    plan_for(padded_tokens(tokens));
  }

  // Run cusparseLtMatmulSearch once for T tokens (on random inputs): it times the candidate
  // kernels and stores the fastest in the plan, which later forward() calls with that T use.
  // Returns the chosen algorithm id. Synchronizes the stream.
  int search(int64_t tokens) {
    TORCH_CHECK(tokens > 0, "SparseLtLinear.search: tokens must be positive");
    c10::cuda::CUDAGuard guard(device_);
    const int64_t padded = padded_tokens(tokens);
    Plan* plan = plan_for(padded);
    auto options = compressed_.options().dtype(dtype_);
    at::Tensor x = at::randn({padded, in_features_}, options);
    at::Tensor out = alloc_output(*plan, options);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    const float alpha = 1.0f, beta = 0.0f;
    std::lock_guard<std::mutex> lock(mutex_);
    SLT_CHECK(cusparseLtMatmulSearch(handle_, &plan->plan, &alpha, compressed_.data_ptr(), x.data_ptr(),
                                     &beta, out.data_ptr(), out.data_ptr(), plan->workspace_ptr(), &stream, 1));
    // The chosen configuration may need another workspace size than the default one.
    size_t workspace_size = 0;
    SLT_CHECK(cusparseLtMatmulGetWorkspace(handle_, &plan->plan, &workspace_size));
    set_workspace(*plan, workspace_size);
    plan->searched = true;
    SLT_CUDA_CHECK(cudaStreamSynchronize(stream));
    return alg_id_locked(*plan);
  }

  std::vector<int64_t> cached_tokens() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> out;
    for (const auto& kv : plans_) out.push_back(kv.first);
    return out;
  }

  // The algorithm id of T's plan (-1 when no plan exists for T yet).
  int alg_id(int64_t tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(padded_tokens(tokens));
    return it == plans_.end() ? -1 : alg_id_locked(*it->second);
  }

  // Whether T's plan writes y directly (true) or y^T plus a transposing copy (false); None-like
  // -1 when no plan exists for T yet.
  int fused_output(int64_t tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(padded_tokens(tokens));
    return it == plans_.end() ? -1 : static_cast<int>(it->second->fused);
  }

  bool searched(int64_t tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(padded_tokens(tokens));
    return it != plans_.end() && it->second->searched;
  }

  int64_t out_features() const { return out_features_; }
  int64_t in_features() const { return in_features_; }
  int64_t compressed_bytes() const { return compressed_.numel(); }
  at::Tensor compressed() const { return compressed_; }

 private:
  static int64_t padded_tokens(int64_t tokens) {
    return (tokens + kDenseMultiple - 1) / kDenseMultiple * kDenseMultiple;
  }

  at::Tensor alloc_output(const Plan& plan, const at::TensorOptions& options) const {
    return plan.fused ? at::empty({plan.tokens, out_features_}, options)
                      : at::empty({out_features_, plan.tokens}, options);
  }

  cusparseStatus_t launch(const Plan& plan, const at::Tensor& x, const at::Tensor& out, cudaStream_t stream) {
    const float alpha = 1.0f, beta = 0.0f;  // CUSPARSE_COMPUTE_32F takes float scalars
    // C = D (beta = 0, so C is not read); one stream, torch's current one.
    return cusparseLtMatmul(handle_, &plan.plan, &alpha, compressed_.data_ptr(), x.data_ptr(), &beta,
                            out.data_ptr(), out.data_ptr(), plan.workspace_ptr(), &stream, 1);
  }

  Plan* plan_for(int64_t padded) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(padded);
    if (it != plans_.end()) return it->second.get();
    std::unique_ptr<Plan> plan;
    if (!fuse_output_) return plans_.emplace(padded, build(padded, /*fused=*/false)).first->second.get();
    try {
      plan = build(padded, /*fused=*/true);
    } catch (const c10::Error& fused_error) {
      try {
        plan = build(padded, /*fused=*/false);
      } catch (const c10::Error& plain_error) {
        TORCH_CHECK(false, "SparseLtLinear: no cuSPARSELt plan for T=", padded, ", K=", in_features_,
                    ", N=", out_features_, ". With y written directly: ", fused_error.what_without_backtrace(),
                    "; with y^T: ", plain_error.what_without_backtrace());
      }
    }
    return plans_.emplace(padded, std::move(plan)).first->second.get();
  }

  Plan* rebuild(int64_t padded, bool fused) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto plan = build(padded, fused);
    Plan* raw = plan.get();
    plans_[padded] = std::move(plan);
    return raw;
  }

  std::unique_ptr<Plan> build(int64_t padded, bool fused) {
    auto plan = std::make_unique<Plan>();
    plan->tokens = padded;
    plan->fused = fused;
    // B: x as stored, [T, K] row-major; the matmul uses it transposed.
    SLT_CHECK(cusparseLtDenseDescriptorInit(handle_, &plan->x_desc, padded, in_features_, in_features_,
                                            kAlignment, type_, CUSPARSE_ORDER_ROW));
    plan->has_x = true;
    // D (= C): [N, T]; column-major with ld = N is y [T, N] row-major.
    SLT_CHECK(cusparseLtDenseDescriptorInit(handle_, &plan->y_desc, out_features_, padded,
                                            fused ? out_features_ : padded, kAlignment, type_,
                                            fused ? CUSPARSE_ORDER_COL : CUSPARSE_ORDER_ROW));
    plan->has_y = true;
    SLT_CHECK(cusparseLtMatmulDescriptorInit(handle_, &plan->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                             CUSPARSE_OPERATION_TRANSPOSE, &w_desc_, &plan->x_desc,
                                             &plan->y_desc, &plan->y_desc, CUSPARSE_COMPUTE_32F));
    SLT_CHECK(cusparseLtMatmulAlgSelectionInit(handle_, &plan->alg, &plan->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    plan->has_alg = true;
    SLT_CHECK(cusparseLtMatmulPlanInit(handle_, &plan->plan, &plan->matmul, &plan->alg));
    plan->has_plan = true;
    size_t workspace_size = 0;
    SLT_CHECK(cusparseLtMatmulGetWorkspace(handle_, &plan->plan, &workspace_size));
    set_workspace(*plan, workspace_size);
    return plan;
  }

  void set_workspace(Plan& plan, size_t bytes) {
    if (bytes == 0) return;
    if (plan.workspace.defined() && static_cast<size_t>(plan.workspace.numel()) >= bytes) return;
    plan.workspace = at::empty({static_cast<int64_t>(bytes)}, compressed_.options());
  }

  int alg_id_locked(const Plan& plan) const {
    int id = -1;
    SLT_CHECK(cusparseLtMatmulAlgGetAttribute(handle_, &plan.alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id, sizeof(id)));
    return id;
  }

  bool fuse_output_ = true;
  int device_ = 0;
  at::ScalarType dtype_;
  cudaDataType type_;
  int64_t out_features_ = 0, in_features_ = 0;
  const cusparseLtHandle_t* handle_ = nullptr;
  cusparseLtMatDescriptor_t w_desc_{};
  bool has_w_desc_ = false;
  at::Tensor compressed_;  // the compressed 2:4 weight (values + metadata), uint8
  std::mutex mutex_;       // guards plans_
  std::unordered_map<int64_t, std::unique_ptr<Plan>> plans_;  // padded T -> plan
};

// The cuSPARSELt the process actually loaded (may differ from the header's when torch preloads
// its own copy), as major*1000 + minor*100 + patch like CUSPARSELT_VERSION.
int runtime_version() {
  int major = 0, minor = 0, patch = 0;
  SLT_CHECK(cusparseLtGetProperty(MAJOR_VERSION, &major));
  SLT_CHECK(cusparseLtGetProperty(MINOR_VERSION, &minor));
  SLT_CHECK(cusparseLtGetProperty(PATCH_LEVEL, &patch));
  return major * 1000 + minor * 100 + patch;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "2:4 sparse linear through cuSPARSELt with cached per-token-count plans";
  m.def("runtime_version", &runtime_version, "cuSPARSELt version loaded at run time (major*1000+minor*100+patch)");
  m.attr("header_version") = CUSPARSELT_VERSION;
  py::class_<SparseLtLinear>(m, "SparseLtLinear")
      .def(py::init<const at::Tensor&, bool>(), py::arg("weight"), py::arg("fuse_output") = true,
           "Check and compress a 2:4 CUDA weight [out, in] (float16/bfloat16) once.")
      .def("forward", &SparseLtLinear::forward, py::arg("x"), "y [T, out] = x [T, in] @ W^T")
      .def("__call__", &SparseLtLinear::forward, py::arg("x"))
      .def("prepare", &SparseLtLinear::prepare, py::arg("tokens"), "build the plan for T tokens now")
      .def("search", &SparseLtLinear::search, py::arg("tokens"),
           "cusparseLtMatmulSearch for T tokens; returns the chosen algorithm id")
      .def("cached_tokens", &SparseLtLinear::cached_tokens, "padded token counts with a plan")
      .def("alg_id", &SparseLtLinear::alg_id, py::arg("tokens"))
      .def("fused_output", &SparseLtLinear::fused_output, py::arg("tokens"))
      .def("searched", &SparseLtLinear::searched, py::arg("tokens"))
      .def_property_readonly("out_features", &SparseLtLinear::out_features)
      .def_property_readonly("in_features", &SparseLtLinear::in_features)
      .def_property_readonly("compressed_bytes", &SparseLtLinear::compressed_bytes)
      .def_property_readonly("compressed", &SparseLtLinear::compressed);
}
