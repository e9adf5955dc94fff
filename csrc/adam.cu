// Multi-tensor Adam / AdamW: one launch updates many tensors.
//
// For every element of every tensor i (computed in fp32 whatever the storage types):
//
//   g  = grad                     (negated when maximize)
//   w  = master[i] if given else param          (the weights being optimised)
//   AdamW: w *= 1 - lr * wd       Adam: g += wd * w
//   m  = lerp(m, g, 1 - beta1)
//   v  = beta2 * v + (1 - beta2) * g * g
//   w -= step_size * m / (sqrt(v) / sqrt(1 - beta2^step) + eps),  step_size = lr / (1 - beta1^step)
//   param = round(w);  master = w  (when master weights are used)
//
// which is torch.optim.Adam / AdamW's non-capturable update, constants computed on the host in
// double and rounded to fp32 exactly where PyTorch rounds them.
//
// Work distribution (apex / PyTorch multi_tensor_apply style): each launch carries, in its kernel
// argument block, the addresses and sizes of up to kMaxTensors tensors and a prefix sum of their
// chunk counts. Every tensor is cut into kChunk-element chunks; a grid sized to fill the GPU once
// strides over the chunks of the launch, so a launch never leaves the GPU half empty and no
// per-block table has to fit in the arguments. Arguments are kept under the classic 4 KB limit
// (portable to every driver); more tensors mean more launches.
#include <cmath>
#include <limits>
#include <vector>

#include "common.cuh"

namespace fastpatch {
namespace {

constexpr int kThreads = 512;
constexpr int kILP = 4;            // elements per thread per iteration: one vector access per tensor
constexpr int64_t kChunk = 16384;  // elements per unit of work: 8 block-iterations
constexpr int kMaxTensors = 76;    // tensors per launch; sized against the 4 KB argument limit
static_assert(kChunk % (kThreads * kILP) == 0, "a chunk must be whole block-iterations");

// Everything one launch touches. Lives in kernel-parameter (constant) memory: the chunk -> tensor
// lookup reads it with block-uniform indices, which constant memory serves as a broadcast.
struct TensorTable {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  float* master[kMaxTensors];     // nullptr when the param itself holds the weights
  int64_t numel[kMaxTensors];
  int32_t chunk_end[kMaxTensors];  // chunks of tensors 0..t (inclusive prefix sum)
  int32_t num_tensors;
};

// fp32 constants, each rounded once from its double value as torch.optim does.
struct AdamHyper {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float eps, weight_decay;
  float decay;                  // 1 - lr * weight_decay (AdamW)
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool adamw, maximize;
};

static_assert(sizeof(TensorTable) + sizeof(AdamHyper) <= 4096,
              "kernel arguments must fit the classic 4 KB parameter space");

__device__ __forceinline__ void adam_update(float& w, float g, float& m, float& v, const AdamHyper& hp) {
  if (hp.maximize) g = -g;
  if (hp.weight_decay != 0.f) {
    if (hp.adamw) {
      w *= hp.decay;
    } else {
      g += hp.weight_decay * w;
    }
  }
  // torch.lerp's two-sided formula, so beta1 <= 0.5 rounds as PyTorch does too.
  const float wt = hp.one_minus_beta1;
  m = wt < 0.5f ? m + wt * (g - m) : g - (g - m) * (1.f - wt);
  v = v * hp.beta2 + hp.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / hp.bias_correction2_sqrt + hp.eps;
  w -= hp.step_size * (m / denom);
}

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

// One chunk of one tensor: n <= kChunk elements starting at the given pointers.
template <typename param_t, typename grad_t, typename state_t>
__device__ __forceinline__ void adam_chunk(param_t* __restrict__ param, const grad_t* __restrict__ grad,
                                           state_t* __restrict__ exp_avg, state_t* __restrict__ exp_avg_sq,
                                           float* __restrict__ master, int64_t n, const AdamHyper& hp) {
  // Chunks start at multiples of kChunk, so base alignment decides for the whole tensor; views at
  // odd offsets take the scalar loop.
  const bool vector = pack_aligned(param) && pack_aligned(grad) && pack_aligned(exp_avg) &&
                      pack_aligned(exp_avg_sq) && (master == nullptr || pack_aligned(master));
  const int64_t vector_end = vector ? n / kILP * kILP : 0;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < vector_end; i += int64_t(kThreads) * kILP) {
    const auto g = load_pack<grad_t, kILP>(grad + i);
    auto m = load_pack<state_t, kILP>(exp_avg + i);
    auto v = load_pack<state_t, kILP>(exp_avg_sq + i);
    float w[kILP];
    if (master != nullptr) {
      const auto mw = load_pack<float, kILP>(master + i);
#pragma unroll
      for (int j = 0; j < kILP; ++j) w[j] = mw.v[j];
    } else {
      const auto pw = load_pack<param_t, kILP>(param + i);
#pragma unroll
      for (int j = 0; j < kILP; ++j) w[j] = static_cast<float>(pw.v[j]);
    }
    Pack<param_t, kILP> out;
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      float mj = static_cast<float>(m.v[j]), vj = static_cast<float>(v.v[j]);
      adam_update(w[j], static_cast<float>(g.v[j]), mj, vj, hp);
      m.v[j] = static_cast<state_t>(mj);
      v.v[j] = static_cast<state_t>(vj);
      out.v[j] = static_cast<param_t>(w[j]);
    }
    store_pack<state_t, kILP>(exp_avg + i, m);
    store_pack<state_t, kILP>(exp_avg_sq + i, v);
    store_pack<param_t, kILP>(param + i, out);
    if (master != nullptr) {
      Pack<float, kILP> mw;
#pragma unroll
      for (int j = 0; j < kILP; ++j) mw.v[j] = w[j];
      store_pack<float, kILP>(master + i, mw);
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
    float w = master != nullptr ? master[i] : static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]), v = static_cast<float>(exp_avg_sq[i]);
    adam_update(w, static_cast<float>(grad[i]), m, v, hp);
    exp_avg[i] = static_cast<state_t>(m);
    exp_avg_sq[i] = static_cast<state_t>(v);
    param[i] = static_cast<param_t>(w);
    if (master != nullptr) master[i] = w;
  }
}

template <typename param_t, typename grad_t, typename state_t>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_adam_kernel(const __grid_constant__ TensorTable table, const AdamHyper hp) {
  const int32_t num_chunks = table.chunk_end[table.num_tensors - 1];
  int t = 0;  // a block's chunks only increase, so its tensor index only moves forward
  for (int32_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    while (chunk >= table.chunk_end[t]) ++t;
    const int32_t first = t == 0 ? 0 : table.chunk_end[t - 1];
    const int64_t begin = int64_t(chunk - first) * kChunk;
    const int64_t n = min(kChunk, table.numel[t] - begin);
    float* master = table.master[t];
    adam_chunk<param_t, grad_t, state_t>(
        static_cast<param_t*>(table.param[t]) + begin, static_cast<const grad_t*>(table.grad[t]) + begin,
        static_cast<state_t*>(table.exp_avg[t]) + begin, static_cast<state_t*>(table.exp_avg_sq[t]) + begin,
        master == nullptr ? nullptr : master + begin, n, hp);
  }
}

// Launches the kernel over the tensors whose index is in `indices`.
template <typename param_t, typename grad_t, typename state_t>
void launch_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList master_params,
                 const std::vector<int64_t>& indices, const AdamHyper& hp) {
  const auto kernel = multi_tensor_adam_kernel<param_t, grad_t, state_t>;
  // Resident blocks per SM for this instantiation; a host-side query, legal during graph capture.
  static const int blocks_per_sm = [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  const int64_t max_blocks =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * blocks_per_sm;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool has_master = !master_params.empty();

  TensorTable table;
  table.num_tensors = 0;
  int64_t chunks = 0;
  auto flush = [&] {
    if (table.num_tensors == 0) return;
    const int grid = static_cast<int>(std::min<int64_t>(chunks, max_blocks));
    kernel<<<grid, kThreads, 0, stream>>>(table, hp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.num_tensors = 0;
    chunks = 0;
  };
  for (const int64_t i : indices) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int64_t tensor_chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(tensor_chunks < std::numeric_limits<int32_t>::max(), "multi_tensor_adam: tensor ", i,
                " is too large (", numel, " elements)");
    if (chunks + tensor_chunks > std::numeric_limits<int32_t>::max()) flush();
    const int k = table.num_tensors++;
    table.param[k] = params[i].data_ptr();
    table.grad[k] = grads[i].data_ptr();
    table.exp_avg[k] = exp_avgs[i].data_ptr();
    table.exp_avg_sq[k] = exp_avg_sqs[i].data_ptr();
    table.master[k] = has_master ? master_params[i].data_ptr<float>() : nullptr;
    table.numel[k] = numel;
    chunks += tensor_chunks;
    table.chunk_end[k] = static_cast<int32_t>(chunks);
    if (table.num_tensors == kMaxTensors) flush();
  }
  flush();
}

void check_member(const at::Tensor& t, const char* list, size_t i, const at::Tensor& first,
                  at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.is_cuda() && t.device() == first.device(), "multi_tensor_adam: ", list, "[", i,
              "] must be on ", first.device(), ", got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "multi_tensor_adam: ", list, "[", i, "] must be dense");
  TORCH_CHECK(t.scalar_type() == dtype, "multi_tensor_adam: ", list, "[", i, "] has dtype ",
              t.scalar_type(), "; every tensor of ", list, " must be ", dtype);
  TORCH_CHECK(t.numel() == numel, "multi_tensor_adam: ", list, "[", i, "] has ", t.numel(),
              " elements but params[", i, "] has ", numel);
}

// The kernel walks each tensor as one flat range of memory, so every tensor of an index must be
// dense with the (dense) param's strides: contiguous, or e.g. all channels-last alike.
bool same_flat_layout(const at::Tensor& t, const at::Tensor& param) {
  if (t.is_contiguous() && param.is_contiguous()) return true;
  return t.is_non_overlapping_and_dense() && param.is_non_overlapping_and_dense() &&
         t.strides() == param.strides();
}

// Updates params, exp_avgs, exp_avg_sqs (and master_params, when not empty) in place and returns
// the indices it left alone because their tensors are not laid out as one flat range alike
// (the caller updates those with the PyTorch reference). All tensors are on one CUDA device, one
// dtype per list; exp_avgs/exp_avg_sqs are fp32 or the params' dtype; master_params are fp32.
// Everything is checked before the first launch, so an error leaves every tensor untouched.
std::vector<int64_t> multi_tensor_adam(at::TensorList params, at::TensorList grads,
                                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                       at::TensorList master_params, double lr, double beta1,
                                       double beta2, double eps, double weight_decay, double step,
                                       bool adamw, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "multi_tensor_adam: grads, exp_avgs and exp_avg_sqs need one tensor per param");
  TORCH_CHECK(master_params.empty() || master_params.size() == n,
              "multi_tensor_adam: master_params must be empty or have one tensor per param");
  TORCH_CHECK(step > 0.0, "multi_tensor_adam: step must be > 0 (the count after incrementing)");
  std::vector<int64_t> flat, skipped;
  if (n == 0) return skipped;
  const at::Tensor& first = params[0];
  const auto param_type = first.scalar_type();
  const auto grad_type = grads[0].scalar_type();
  const auto state_type = exp_avgs[0].scalar_type();
  TORCH_CHECK(state_type == at::kFloat || state_type == param_type,
              "multi_tensor_adam: exp_avgs must be float32 or the params' dtype, got ", state_type);
  const bool has_master = !master_params.empty();
  flat.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const int64_t numel = param.numel();
    check_member(param, "params", i, first, param_type, numel);
    check_member(grads[i], "grads", i, first, grad_type, numel);
    check_member(exp_avgs[i], "exp_avgs", i, first, state_type, numel);
    check_member(exp_avg_sqs[i], "exp_avg_sqs", i, first, state_type, numel);
    if (has_master) check_member(master_params[i], "master_params", i, first, at::kFloat, numel);
    const bool ok = param.is_non_overlapping_and_dense() && same_flat_layout(grads[i], param) &&
                    same_flat_layout(exp_avgs[i], param) && same_flat_layout(exp_avg_sqs[i], param) &&
                    (!has_master || same_flat_layout(master_params[i], param));
    (ok ? flat : skipped).push_back(static_cast<int64_t>(i));
  }
  if (flat.empty()) return skipped;
  c10::cuda::CUDAGuard guard(first.device());

  AdamHyper hp;
  hp.beta1 = static_cast<float>(beta1);
  hp.beta2 = static_cast<float>(beta2);
  hp.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hp.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.eps = static_cast<float>(eps);
  hp.weight_decay = static_cast<float>(weight_decay);
  hp.decay = static_cast<float>(1.0 - lr * weight_decay);
  hp.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
  hp.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  hp.adamw = adamw;
  hp.maximize = maximize;

  FP_DISPATCH_FLOAT(param_type, "multi_tensor_adam", [&] {
    using param_t = scalar_t;
    FP_DISPATCH_FLOAT(grad_type, "multi_tensor_adam", [&] {
      using grad_t = scalar_t;
      if (state_type == at::kFloat) {
        launch_adam<param_t, grad_t, float>(params, grads, exp_avgs, exp_avg_sqs, master_params, flat, hp);
      } else {
        launch_adam<param_t, grad_t, param_t>(params, grads, exp_avgs, exp_avg_sqs, master_params, flat, hp);
      }
    });
  });
  return skipped;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("multi_tensor_adam(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, float step, bool adamw, bool maximize) -> int[]",
        &multi_tensor_adam);
}

}  // namespace fastpatch
