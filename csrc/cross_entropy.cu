// Cross-entropy over a vocabulary (plain and label-smoothed), forward and backward, one block per
// row, never materialising the fp32 softmax.
//
// Per row with logits x[0..V), target t and coefficients (a, b):
//   lse    = log(sum_j exp(x_j))              online: running max and sum-exp in fp32
//   nll    = lse - x_t
//   smooth = V * lse - sum_j x_j              (= -sum_j log_softmax(x)_j)
//   loss   = a * nll + b * smooth
// fairseq's label smoothing is a = 1 - eps - eps/(V-1), b = eps/(V-1); torch's label_smoothing is
// a = 1 - ls, b = ls/V; the Python side picks them. With p = softmax(x) and per-row upstream
// gradients g_loss, g_nll:
//   dx_j = c1 * (p_j - [j == t]) + c2 * (V * p_j - 1),   c1 = g_loss * a + g_nll,  c2 = g_loss * b
//        = p_j * (c1 + V * c2) - c2 - [j == t] * c1
//
// Rows whose target is ignore_index produce zeros (loss, nll, lse and gradient) without reading
// their logits. A target outside [0, V) that is not ignore_index would need a host sync to report,
// so the kernels instead write NaN to that row's loss and nll and to its whole gradient row: the
// reduced loss turns NaN (visible to fairseq's and AMP's overflow checks) and nothing reads out
// of bounds. The CPU reference raises ValueError instead.
//
// Memory access: rows may be padded (row stride >= V, unit column stride), as the fused linear
// path allocates them so cuBLAS gets aligned leading dimensions. Each row is split into a scalar
// head up to the first 16-byte boundary, whole 16-byte packs, and a scalar tail, so rows of any
// length (V = 50257, odd, included) and any starting address are read with 16-byte loads. The
// backward writing to a separate buffer uses the packed path when every gradient row shares its
// logits row's misalignment (always, for contiguous buffers from the caching allocator), else the
// scalar path.
//
// Two launch flavours write the gradient into the logits buffer itself, for the chunked fused
// linear + cross-entropy in fastpatch/ops/cross_entropy.py, whose logits are a scratch chunk:
//   cross_entropy_fwd_grad_: forward, then the gradient of sum(loss rows) (c1 = a, c2 = b) in place
//   cross_entropy_bwd_:      backward with per-row upstream gradients, in place
// Every element is read and then written by the same thread, so in place is race-free; the target
// logit is read before the block's first barrier, hence before any thread overwrites it.
#include "common.cuh"

namespace fastpatch {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread per iteration

// How one row splits into an unaligned scalar head, whole N-element packs and a scalar tail.
struct RowSpan {
  int64_t head;        // elements before the first 16-byte-aligned one
  int64_t packs;       // whole packs after the head
  int64_t tail_start;  // first element after the packs
};

template <typename T, int N>
__device__ __forceinline__ RowSpan split_row(const T* row, int64_t V) {
  int64_t head = 0;
  if (N > 1) {
    const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T));
    head = misaligned == 0 ? 0 : N - misaligned;
    if (head > V) head = V;
  }
  const int64_t packs = (V - head) / N;
  return {head, packs, head + packs * N};
}

// Per-thread online softmax statistics: running max, sum of exp(x - max), and plain sum of x.
struct OnlineStats {
  float max = -INFINITY;
  float sum_exp = 0.f;
  float sum_x = 0.f;

  template <int K>
  __device__ __forceinline__ void add(const float (&v)[K]) {
    float m = v[0];
#pragma unroll
    for (int j = 1; j < K; ++j) m = fmaxf(m, v[j]);
    if (m > max) {  // rescale once per pack, not per element
      sum_exp *= __expf(max - m);
      max = m;
    }
    // max == -inf means every value so far is -inf: they add nothing (and -inf - -inf is NaN).
    if (max != -INFINITY) {
#pragma unroll
      for (int j = 0; j < K; ++j) sum_exp += __expf(v[j] - max);
    }
#pragma unroll
    for (int j = 0; j < K; ++j) sum_x += v[j];
  }
};

template <typename T, int N>
__device__ __forceinline__ void to_float(const Pack<T, N>& p, float (&f)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) f[j] = static_cast<float>(p.v[j]);
}

// Statistics of one row, reduced over the block (every thread gets them).
template <typename T, int N>
__device__ __forceinline__ void row_stats(const T* row, int64_t V, const RowSpan& span,
                                          float* scratch, float& lse, float& sum_x) {
  OnlineStats st;
  const int64_t stride = blockDim.x;
  if (threadIdx.x < span.head) {
    const float v[1] = {static_cast<float>(row[threadIdx.x])};
    st.add(v);
  }
  const Pack<T, N>* packs = reinterpret_cast<const Pack<T, N>*>(row + span.head);
  int64_t p = threadIdx.x;
  for (; p + (kUnroll - 1) * stride < span.packs; p += kUnroll * stride) {
    Pack<T, N> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) loaded[u] = packs[p + u * stride];  // all loads first
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[N];
      to_float(loaded[u], f);
      st.add(f);
    }
  }
  for (; p < span.packs; p += stride) {
    float f[N];
    to_float(packs[p], f);
    st.add(f);
  }
  for (int64_t i = span.tail_start + threadIdx.x; i < V; i += stride) {
    const float v[1] = {static_cast<float>(row[i])};
    st.add(v);
  }
  const float row_max = block_max(st.max, scratch);
  // A thread that saw nothing (or only -inf) has sum_exp == 0; skip it so -inf - -inf can't NaN.
  const float mine = st.sum_exp == 0.f ? 0.f : st.sum_exp * __expf(st.max - row_max);
  const float row_sum = block_sum(mine, scratch);
  sum_x = block_sum(st.sum_x, scratch);
  lse = row_max + logf(row_sum);
}

// grad[j] = p_j * scale - c2 - [j == t] * c1 with p_j = exp(x_j - lse), scale = c1 + V * c2.
// `grad` may alias `row` (in-place flavours): each element is read and written by one thread.
template <typename T, int N>
__device__ __forceinline__ void write_row_grad(const T* row, T* grad, int64_t V, const RowSpan& span,
                                               int64_t t, float lse, float c1, float c2) {
  const float scale = c1 + static_cast<float>(V) * c2;
  const int64_t stride = blockDim.x;
  auto grad_of = [&](float x, int64_t col) {
    return __expf(x - lse) * scale - c2 - (col == t ? c1 : 0.f);
  };
  if (threadIdx.x < span.head) {
    const int64_t i = threadIdx.x;
    grad[i] = static_cast<T>(grad_of(static_cast<float>(row[i]), i));
  }
  const Pack<T, N>* in = reinterpret_cast<const Pack<T, N>*>(row + span.head);
  Pack<T, N>* out = reinterpret_cast<Pack<T, N>*>(grad + span.head);
  int64_t p = threadIdx.x;
  for (; p + (kUnroll - 1) * stride < span.packs; p += kUnroll * stride) {
    Pack<T, N> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) loaded[u] = in[p + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t col = span.head + (p + u * stride) * N;
      Pack<T, N> g;
#pragma unroll
      for (int j = 0; j < N; ++j) g.v[j] = static_cast<T>(grad_of(static_cast<float>(loaded[u].v[j]), col + j));
      out[p + u * stride] = g;
    }
  }
  for (; p < span.packs; p += stride) {
    const Pack<T, N> loaded = in[p];
    const int64_t col = span.head + p * N;
    Pack<T, N> g;
#pragma unroll
    for (int j = 0; j < N; ++j) g.v[j] = static_cast<T>(grad_of(static_cast<float>(loaded.v[j]), col + j));
    out[p] = g;
  }
  for (int64_t i = span.tail_start + threadIdx.x; i < V; i += stride) {
    grad[i] = static_cast<T>(grad_of(static_cast<float>(row[i]), i));
  }
}

template <typename T, int N>
__device__ __forceinline__ void zero_row(T* grad, int64_t V, const RowSpan& span) {
  const int64_t stride = blockDim.x;
  if (threadIdx.x < span.head) grad[threadIdx.x] = static_cast<T>(0.f);
  Pack<T, N> zero;
#pragma unroll
  for (int j = 0; j < N; ++j) zero.v[j] = static_cast<T>(0.f);
  Pack<T, N>* out = reinterpret_cast<Pack<T, N>*>(grad + span.head);
  for (int64_t p = threadIdx.x; p < span.packs; p += stride) out[p] = zero;
  for (int64_t i = span.tail_start + threadIdx.x; i < V; i += stride) grad[i] = static_cast<T>(0.f);
}

// One block per row. `grad` is null (plain forward) or the logits buffer itself (in-place
// gradient of sum(loss rows), for the fused linear cross-entropy).
template <typename T, int N>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_fwd_kernel(const T* logits, int64_t stride, const int64_t* __restrict__ target,
                         float* __restrict__ loss, float* __restrict__ nll, float* __restrict__ lse_out,
                         T* grad, int64_t V, int64_t ignore_index, float a, float b) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const T* row = logits + r * stride;
  const int64_t t = target[r];
  const RowSpan span = split_row<T, N>(row, V);
  if (t == ignore_index) {  // uniform over the block: padding rows cost no logits traffic
    if (threadIdx.x == 0) loss[r] = nll[r] = lse_out[r] = 0.f;
    if (grad != nullptr) zero_row<T, N>(grad + r * stride, V, span);
    return;
  }
  const bool in_range = t >= 0 && t < V;
  // Read before row_stats' barriers so the in-place gradient pass cannot have overwritten it.
  const float x_t = (threadIdx.x == 0 && in_range) ? static_cast<float>(row[t]) : 0.f;
  float lse, sum_x;
  row_stats<T, N>(row, V, span, scratch, lse, sum_x);
  if (threadIdx.x == 0) {
    const float row_nll = in_range ? lse - x_t : NAN;
    const float smooth = static_cast<float>(V) * lse - sum_x;
    nll[r] = row_nll;
    loss[r] = a * row_nll + b * smooth;
    lse_out[r] = lse;
  }
  if (grad != nullptr) {
    const float c1 = in_range ? a : NAN, c2 = in_range ? b : NAN;
    write_row_grad<T, N>(row, grad + r * stride, V, span, t, lse, c1, c2);
  }
}

// One block per row. `grad` is a fresh buffer or the logits buffer itself (in place).
template <typename T, int N>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_bwd_kernel(const float* __restrict__ grad_loss, const float* __restrict__ grad_nll,
                         const T* logits, int64_t stride, const int64_t* __restrict__ target,
                         const float* __restrict__ lse, T* grad, int64_t grad_stride, int64_t V,
                         int64_t ignore_index, float a, float b) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * stride;
  const int64_t t = target[r];
  const RowSpan span = split_row<T, N>(row, V);  // the host made sure grad's rows split alike
  if (t == ignore_index) {
    zero_row<T, N>(grad + r * grad_stride, V, span);
    return;
  }
  const float gl = grad_loss != nullptr ? grad_loss[r] : 0.f;
  const float gn = grad_nll != nullptr ? grad_nll[r] : 0.f;
  const bool in_range = t >= 0 && t < V;
  const float c1 = in_range ? gl * a + gn : NAN, c2 = in_range ? gl * b : NAN;
  write_row_grad<T, N>(row, grad + r * grad_stride, V, span, t, lse[r], c1, c2);
}

// Enough threads to give each about 8 packs, within [128, kMaxThreads], a multiple of 32.
int threads_for(int64_t V, int pack) {
  const int64_t packs = (V + pack - 1) / pack;
  int threads = 128;
  while (threads < kMaxThreads && threads * int64_t(8) < packs) threads *= 2;
  return threads;
}

// logits: [rows, V] with unit column stride and row stride >= V (padded rows are fine).
void check_rows(const at::Tensor& logits, const at::Tensor& target) {
  FP_CHECK_CUDA(logits);
  FP_CHECK_INPUT(target);
  TORCH_CHECK(logits.dim() == 2, "logits must be [rows, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "logits must have at least one class");
  TORCH_CHECK(logits.stride(1) == 1 && (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)),
              "logits rows must be dense (unit column stride, row stride >= V), got strides ",
              logits.strides());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target must be [rows]");
  TORCH_CHECK(target.device() == logits.device(), "target must be on logits' device");
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "too many rows for one launch");
}

const float* optional_row_grad(const c10::optional<at::Tensor>& g, const at::Tensor& logits) {
  if (!g.has_value()) return nullptr;
  FP_CHECK_INPUT(*g);
  TORCH_CHECK(g->scalar_type() == at::kFloat && g->numel() == logits.size(0),
              "row gradients must be fp32 [rows]");
  TORCH_CHECK(g->device() == logits.device(), "row gradients must be on logits' device");
  return g->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_forward(const at::Tensor& logits,
                                                              const at::Tensor& target, double a,
                                                              double b, int64_t ignore_index,
                                                              bool grad_in_place) {
  check_rows(logits, target);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  auto loss = at::empty({rows}, opts), nll = at::empty({rows}, opts), lse = at::empty({rows}, opts);
  if (rows == 0) return {loss, nll, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_fwd", [&] {
    constexpr int N = pack_size<scalar_t>();
    const int threads = threads_for(V, N);
    scalar_t* grad = grad_in_place ? logits.data_ptr<scalar_t>() : nullptr;
    cross_entropy_fwd_kernel<scalar_t, N><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(), loss.data_ptr<float>(),
        nll.data_ptr<float>(), lse.data_ptr<float>(), grad, V, ignore_index,
        static_cast<float>(a), static_cast<float>(b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, nll, lse};
}

void launch_backward(const c10::optional<at::Tensor>& grad_loss,
                     const c10::optional<at::Tensor>& grad_nll, const at::Tensor& logits,
                     const at::Tensor& target, const at::Tensor& lse, double a, double b,
                     int64_t ignore_index, const at::Tensor& grad) {
  check_rows(logits, target);
  FP_CHECK_INPUT(lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == logits.size(0), "lse must be fp32 [rows]");
  const float* gl = optional_row_grad(grad_loss, logits);
  const float* gn = optional_row_grad(grad_nll, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), V = logits.size(1);
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_bwd", [&] {
    constexpr int N = pack_size<scalar_t>();
    const int threads = threads_for(V, N);
    // The packed path needs every gradient row to split like its logits row: equal base
    // addresses and row strides modulo 16 bytes.
    const auto offset = reinterpret_cast<uintptr_t>(grad.data_ptr()) - reinterpret_cast<uintptr_t>(logits.data_ptr());
    const int64_t stride_diff = (grad.stride(0) - logits.stride(0)) * int64_t(sizeof(scalar_t));
    const bool packed = offset % 16 == 0 && stride_diff % 16 == 0;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          gl, gn, logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(),
          lse.data_ptr<float>(), grad.data_ptr<scalar_t>(), grad.stride(0), V, ignore_index,
          static_cast<float>(a), static_cast<float>(b));
    };
    if (packed) {
      launch(cross_entropy_bwd_kernel<scalar_t, N>);
    } else {
      launch(cross_entropy_bwd_kernel<scalar_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& target, double a,
                                                                 double b, int64_t ignore_index) {
  return launch_forward(logits, target, a, b, ignore_index, /*grad_in_place=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_grad_(at::Tensor logits,
                                                                       const at::Tensor& target,
                                                                       double a, double b,
                                                                       int64_t ignore_index) {
  return launch_forward(logits, target, a, b, ignore_index, /*grad_in_place=*/true);
}

at::Tensor cross_entropy_bwd(const c10::optional<at::Tensor>& grad_loss,
                             const c10::optional<at::Tensor>& grad_nll, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& lse, double a, double b,
                             int64_t ignore_index) {
  FP_CHECK_CUDA(logits);
  auto grad = at::empty(logits.sizes(), logits.options());
  launch_backward(grad_loss, grad_nll, logits, target, lse, a, b, ignore_index, grad);
  return grad;
}

void cross_entropy_bwd_(const c10::optional<at::Tensor>& grad_loss,
                        const c10::optional<at::Tensor>& grad_nll, at::Tensor logits,
                        const at::Tensor& target, const at::Tensor& lse, double a, double b,
                        int64_t ignore_index) {
  launch_backward(grad_loss, grad_nll, logits, target, lse, a, b, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, float a, float b, int ignore_index) "
        "-> (Tensor, Tensor, Tensor)",
        &cross_entropy_fwd);
  m.def("cross_entropy_fwd_grad_(Tensor(a!) logits, Tensor target, float a, float b, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)",
        &cross_entropy_fwd_grad_);
  m.def("cross_entropy_bwd(Tensor? grad_loss, Tensor? grad_nll, Tensor logits, Tensor target, "
        "Tensor lse, float a, float b, int ignore_index) -> Tensor",
        &cross_entropy_bwd);
  m.def("cross_entropy_bwd_(Tensor? grad_loss, Tensor? grad_nll, Tensor(a!) logits, Tensor target, "
        "Tensor lse, float a, float b, int ignore_index) -> ()",
        &cross_entropy_bwd_);
}

}  // namespace fastpatch
