// bias + activation + dropout, forward and backward, in one pass each.
//
//   forward:  y = dropout(act(x + bias)),   mask[i] = 1 where the element was kept
//   backward: dx = dy * mask / (1 - p) * act'(x + bias)
//
// x is viewed as [rows, hidden] (any leading shape, contiguous); bias is [hidden] or absent.
// The vectorised path moves 16 bytes per access and needs hidden % pack == 0 and aligned
// pointers; otherwise the scalar path runs. Arithmetic is fp32 whatever the storage type.
#include "common.cuh"

namespace fastpatch {
namespace {

template <typename scalar_t, int N>
__global__ void bias_act_dropout_fwd_kernel(const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ bias,
                                            scalar_t* __restrict__ out, uint8_t* __restrict__ mask,
                                            int64_t numel, int64_t hidden, Activation act,
                                            float p, DropoutRng rng) {
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t start = tid * N;
  if (start >= numel) return;
  const bool dropout = p > 0.f;
  const float scale = dropout ? 1.f / (1.f - p) : 1.f;
  float rand[(N + 3) / 4 * 4];
  if (dropout) {
    auto state = init_philox(rng.state, tid);
#pragma unroll
    for (int j = 0; j < (N + 3) / 4; ++j) {
      float4 r = curand_uniform4(&state);
      rand[4 * j] = r.x; rand[4 * j + 1] = r.y; rand[4 * j + 2] = r.z; rand[4 * j + 3] = r.w;
    }
  }
  if (start + N <= numel && N > 1) {
    const int64_t col = start % hidden;
    auto xv = load_pack<scalar_t, N>(x + start);
    Pack<scalar_t, N> bv;
    if (bias != nullptr) bv = load_pack<scalar_t, N>(bias + col);
    Pack<scalar_t, N> yv;
    Pack<uint8_t, N> mv;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float v = static_cast<float>(xv.v[j]) + (bias != nullptr ? static_cast<float>(bv.v[j]) : 0.f);
      v = activation_forward(act, v);
      bool keep = !dropout || rand[j] >= p;  // curand_uniform is in (0, 1]
      mv.v[j] = keep;
      yv.v[j] = static_cast<scalar_t>(keep ? v * scale : 0.f);
    }
    store_pack<scalar_t, N>(out + start, yv);
    if (mask != nullptr) store_pack<uint8_t, N>(mask + start, mv);
  } else {
    for (int j = 0; j < N && start + j < numel; ++j) {
      const int64_t i = start + j;
      float v = static_cast<float>(x[i]) + (bias != nullptr ? static_cast<float>(bias[i % hidden]) : 0.f);
      v = activation_forward(act, v);
      bool keep = !dropout || rand[j] >= p;
      if (mask != nullptr) mask[i] = keep;
      out[i] = static_cast<scalar_t>(keep ? v * scale : 0.f);
    }
  }
}

template <typename scalar_t, int N>
__global__ void bias_act_dropout_bwd_kernel(const scalar_t* __restrict__ grad_out,
                                            const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ bias,
                                            const uint8_t* __restrict__ mask,
                                            scalar_t* __restrict__ grad_x, int64_t numel,
                                            int64_t hidden, Activation act, float p) {
  const int64_t start = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * N;
  if (start >= numel) return;
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  if (start + N <= numel && N > 1) {
    const int64_t col = start % hidden;
    auto gv = load_pack<scalar_t, N>(grad_out + start);
    auto xv = load_pack<scalar_t, N>(x + start);
    Pack<scalar_t, N> bv;
    if (bias != nullptr) bv = load_pack<scalar_t, N>(bias + col);
    Pack<uint8_t, N> mv;
    if (mask != nullptr) mv = load_pack<uint8_t, N>(mask + start);
    Pack<scalar_t, N> dv;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float v = static_cast<float>(xv.v[j]) + (bias != nullptr ? static_cast<float>(bv.v[j]) : 0.f);
      const float keep = mask != nullptr ? static_cast<float>(mv.v[j]) * scale : 1.f;
      dv.v[j] = static_cast<scalar_t>(static_cast<float>(gv.v[j]) * keep * activation_backward(act, v));
    }
    store_pack<scalar_t, N>(grad_x + start, dv);
  } else {
    for (int j = 0; j < N && start + j < numel; ++j) {
      const int64_t i = start + j;
      const float v = static_cast<float>(x[i]) + (bias != nullptr ? static_cast<float>(bias[i % hidden]) : 0.f);
      const float keep = mask != nullptr ? static_cast<float>(mask[i]) * scale : 1.f;
      grad_x[i] = static_cast<scalar_t>(static_cast<float>(grad_out[i]) * keep * activation_backward(act, v));
    }
  }
}

// Vector width usable for this call: full 16-byte packs only when every row starts aligned.
template <typename scalar_t>
int vector_width(int64_t hidden, std::initializer_list<const void*> ptrs) {
  constexpr int N = pack_size<scalar_t>();
  if (hidden % N != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned(p, 16)) return 1;
  return N;
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_fwd(const at::Tensor& x,
                                                        const c10::optional<at::Tensor>& bias,
                                                        int64_t activation, double p) {
  FP_CHECK_INPUT(x);
  const int64_t hidden = x.size(-1);
  if (bias.has_value()) {
    FP_CHECK_INPUT(*bias);
    TORCH_CHECK(bias->numel() == hidden && bias->scalar_type() == x.scalar_type(),
                "bias must be [hidden] with x's dtype");
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1)");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  auto mask = p > 0.0 ? at::empty(x.sizes(), x.options().dtype(at::kByte)) : at::empty({0}, x.options().dtype(at::kByte));
  const int64_t numel = x.numel();
  if (numel == 0) return {out, mask};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(x.scalar_type(), "bias_act_dropout_fwd", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    uint8_t* m = p > 0.0 ? mask.data_ptr<uint8_t>() : nullptr;
    const int width = vector_width<scalar_t>(hidden, {x.data_ptr(), out.data_ptr(), b, m});
    constexpr int threads = 256;
    const int64_t packs = (numel + width - 1) / width;
    const int blocks = static_cast<int>((packs + threads - 1) / threads);
    DropoutRng rng{};
    if (p > 0.0) rng = reserve_dropout_rng(x.device(), pack_size<scalar_t>());
    if (width == 1) {
      bias_act_dropout_fwd_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), b, out.data_ptr<scalar_t>(), m, numel, hidden,
          static_cast<Activation>(activation), static_cast<float>(p), rng);
    } else {
      bias_act_dropout_fwd_kernel<scalar_t, pack_size<scalar_t>()><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), b, out.data_ptr<scalar_t>(), m, numel, hidden,
          static_cast<Activation>(activation), static_cast<float>(p), rng);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

at::Tensor bias_act_dropout_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                                int64_t activation, double p) {
  FP_CHECK_INPUT(grad_out);
  FP_CHECK_INPUT(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must match x");
  const bool has_mask = p > 0.0;
  if (has_mask) {
    FP_CHECK_INPUT(mask);
    TORCH_CHECK(mask.numel() == x.numel(), "mask must match x");
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  const int64_t numel = x.numel(), hidden = x.size(-1);
  if (numel == 0) return grad_x;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(x.scalar_type(), "bias_act_dropout_bwd", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const uint8_t* m = has_mask ? mask.data_ptr<uint8_t>() : nullptr;
    const int width = vector_width<scalar_t>(
        hidden, {grad_out.data_ptr(), x.data_ptr(), b, m, grad_x.data_ptr()});
    constexpr int threads = 256;
    const int64_t packs = (numel + width - 1) / width;
    const int blocks = static_cast<int>((packs + threads - 1) / threads);
    if (width == 1) {
      bias_act_dropout_bwd_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), b, m, grad_x.data_ptr<scalar_t>(),
          numel, hidden, static_cast<Activation>(activation), static_cast<float>(p));
    } else {
      bias_act_dropout_bwd_kernel<scalar_t, pack_size<scalar_t>()><<<blocks, threads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), b, m, grad_x.data_ptr<scalar_t>(),
          numel, hidden, static_cast<Activation>(activation), static_cast<float>(p));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("bias_act_dropout_fwd(Tensor x, Tensor? bias, int activation, float p) -> (Tensor, Tensor)",
        &bias_act_dropout_fwd);
  m.def("bias_act_dropout_bwd(Tensor grad_out, Tensor x, Tensor? bias, Tensor mask, int activation, "
        "float p) -> Tensor",
        &bias_act_dropout_bwd);
}

}  // namespace fastpatch
