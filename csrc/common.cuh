// Shared device helpers for fastpatch kernels: dtype dispatch, vectorised access, reductions
// and graph-safe Philox dropout. Each op family lives in its own .cu file and registers its
// kernels with TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m), so adding an op touches no other file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <mutex>
#include <type_traits>

namespace fastpatch {

// ---------------------------------------------------------------------------------------------
// Host-side checks. The Python layer validates arguments first; these catch direct misuse of
// torch.ops.fastpatch_cuda.* before a kernel could read out of bounds.
#define FP_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define FP_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FP_CHECK_INPUT(x) \
  FP_CHECK_CUDA(x);       \
  FP_CHECK_CONTIGUOUS(x)

// Dispatch over the three floating types the kernels support.
#define FP_DISPATCH_FLOAT(TYPE, NAME, ...)                                     \
  [&] {                                                                        \
    switch (TYPE) {                                                            \
      case at::ScalarType::Float: {                                            \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::ScalarType::Half: {                                             \
        using scalar_t = at::Half;                                             \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::ScalarType::BFloat16: {                                         \
        using scalar_t = at::BFloat16;                                         \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE);                \
    }                                                                          \
  }()

// ---------------------------------------------------------------------------------------------
// Vectorised access: a pack of N scalars moved as one 16-byte (or smaller) transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int pack_size() {
  return 16 / sizeof(T);  // 4 floats or 8 halves per 16-byte access
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ---------------------------------------------------------------------------------------------
// Reductions.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

// Sum over the block; every thread receives the result. `scratch` holds >= 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  return warp_sum(v);
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// ---------------------------------------------------------------------------------------------
// Dropout randomness. The seed and offset come from PyTorch's CUDA generator through
// philox_cuda_state, which stays valid under CUDA-graph capture (the offset is then read from
// device memory at replay), so torch.manual_seed reproduces runs and graphs replay correctly.
struct DropoutRng {
  at::PhiloxCudaState state;
};

// Reserve `randoms_per_thread` Philox outputs for each thread of a launch. Rounded up to a
// multiple of 4 because each curand_uniform4 call consumes four.
inline DropoutRng reserve_dropout_rng(const at::Device& device, uint64_t randoms_per_thread) {
  auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      c10::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return DropoutRng{gen->philox_cuda_state(((randoms_per_thread + 3) / 4) * 4)};
}

__device__ __forceinline__ curandStatePhilox4_32_10_t init_philox(const at::PhiloxCudaState& state,
                                                                   uint64_t subsequence) {
  auto seeds = at::cuda::philox::unpack(state);
  curandStatePhilox4_32_10_t rng;
  curand_init(std::get<0>(seeds), subsequence, std::get<1>(seeds), &rng);
  return rng;
}

// ---------------------------------------------------------------------------------------------
// Activations, evaluated in fp32. Codes match fastpatch/ops/activation_codes in Python.
enum class Activation : int { kGeluExact = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3, kIdentity = 4 };

__device__ __forceinline__ float activation_forward(Activation act, float x) {
  switch (act) {
    case Activation::kGeluExact:
      return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
    case Activation::kRelu:
      return x > 0.f ? x : 0.f;
    case Activation::kSilu:
      return x / (1.f + __expf(-x));
    default:
      return x;
  }
}

__device__ __forceinline__ float activation_backward(Activation act, float x) {
  switch (act) {
    case Activation::kGeluExact: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      const float pdf = 0.3989422804014327f * __expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
    case Activation::kGeluTanh: {
      const float x2 = x * x;
      const float u = 0.7978845608028654f * (x + 0.044715f * x2 * x);
      const float t = tanhf(u);
      const float du = 0.7978845608028654f * (1.f + 3.f * 0.044715f * x2);
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
    }
    case Activation::kRelu:
      return x > 0.f ? 1.f : 0.f;
    case Activation::kSilu: {
      const float s = 1.f / (1.f + __expf(-x));
      return s * (1.f + x * (1.f - s));
    }
    default:
      return 1.f;
  }
}

inline int blocks_for(int64_t n, int threads, int max_blocks_per_sm = 8) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (n + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * max_blocks_per_sm)));
}

}  // namespace fastpatch
