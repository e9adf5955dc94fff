// bias + dropout + residual add + LayerNorm, forward and backward, one pass over the rows each.
//
//   forward:  h   = residual + dropout(x + bias)        (h is x itself for a plain LayerNorm)
//             out = (h - mean) * rstd * gamma + beta,    rstd = 1 / sqrt(var(h) + eps)
//   backward: xhat = (h - mean) * rstd,  g = dy * gamma
//             dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_in
//             dx = dh * mask / (1 - p)
//             dgamma = sum_rows dy * xhat,  dbeta = sum_rows dy,  dbias = sum_rows dx
//
// dh_in is the gradient reaching h from outside the LayerNorm (pre-LN returns h as the new
// residual stream); dh is also the residual's gradient.
//
// Layout: tensors are viewed as [rows, hidden], contiguous. A group of G threads owns one row
// and keeps it in registers: thread t holds the packs t, t + G, ... (P of them, V elements
// each, V = 16 bytes / element size), so the row is read once and statistics are two-pass in
// fp32 without re-reading memory. G is a power of two up to 32 (lanes of one warp, shuffle
// reductions) or a multiple of 32 (several warps, shared-memory reductions). A pack is moved
// as one 16-byte access when its row start is aligned and it lies inside the row, otherwise
// element by element, so odd widths (hidden = 1001) and offset views work, only slower.
//
// The backward kernel is persistent (one wave of blocks): each thread keeps its columns'
// dgamma/dbeta/dbias sums in registers over all the rows its block visits; the block adds its
// groups' sums and writes one fp32 row per block to a [blocks, sums, hidden] buffer, and a
// second small kernel adds those rows in a fixed order. No atomics, so the weight gradients
// are deterministic.
#include "common.cuh"

namespace fastpatch {
namespace {

// A row has at most kMaxThreadsPerRow * kMaxPacksPerThread packs: 32768 halves or 16384 floats.
// fastpatch/ops/layernorm_residual.py routes wider rows to the PyTorch reference.
constexpr int kMaxThreadsPerRow = 512;
constexpr int kMaxPacksPerThread = 8;
// Packs per thread and threads per block the launchers aim for, the fastest of those measured
// on an H200 for hidden 768 to 4096. Backward threads also carry the weight-gradient sums (three
// registers per element), so they hold fewer elements.
constexpr int kFwdTargetPacks = 2, kFwdTargetBlock = 256;
constexpr int kBwdTargetPacks = 1, kBwdTargetBlock = 128;

template <int V, typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

// Columns [col, col + V) of a row as fp32; columns past the row end read as 0.
template <int V, typename T>
__device__ __forceinline__ void load_cols(const T* row, int64_t col, int64_t hidden, bool aligned,
                                          float* dst) {
  if (aligned && col + V <= hidden) {
    const auto pack = load_pack<T, V>(row + col);
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = static_cast<float>(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = col + j < hidden ? static_cast<float>(row[col + j]) : 0.f;
  }
}

// Stores the columns of [col, col + V) that lie inside the row.
template <int V, typename T>
__device__ __forceinline__ void store_cols(T* row, int64_t col, int64_t hidden, bool aligned,
                                           const float* src) {
  if (aligned && col + V <= hidden) {
    Pack<T, V> pack;
#pragma unroll
    for (int j = 0; j < V; ++j) pack.v[j] = static_cast<T>(src[j]);
    store_pack<T, V>(row + col, pack);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (col + j < hidden) row[col + j] = static_cast<T>(src[j]);
  }
}

// Sums N values over the G threads sharing a row; every thread of the group gets the sums.
// Every thread of the block must call it (it may synchronise the block). `scratch` holds
// N * 32 floats: one slot per warp and value.
template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N], int G, float* scratch) {
  if (G <= 32) {  // G is a power of two: xor partners stay inside the group
    for (int offset = G >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffff, v[i], offset);
    }
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps_per_row = G >> 5, first_warp = warp / warps_per_row * warps_per_row;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i)
    v[i] = warp_sum(lane < warps_per_row ? scratch[i * 32 + first_warp + lane] : 0.f);
}

template <typename T>
struct FwdArgs {
  const T* x;
  const T* bias;      // [hidden] or null
  const T* residual;  // [rows, hidden] or null
  const T* gamma;     // [hidden] or null (no scale)
  const T* beta;      // [hidden] or null (no shift)
  T* out;
  T* h;               // null when h is x itself (plain LayerNorm)
  uint8_t* mask;      // keep-mask, null when p == 0
  float* mean;        // [rows]
  float* rstd;        // [rows]
  int64_t rows, hidden, packs_per_row;
  int threads_per_row;
  float eps, p;
  DropoutRng rng;
};

template <typename T, int P>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    layernorm_residual_fwd_kernel(const FwdArgs<T> a) {
  constexpr int V = pack_size<T>();
  __shared__ float scratch[32];
  const int G = a.threads_per_row, t = threadIdx.x % G;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const bool active = row < a.rows;  // idle groups still take part in the reductions
  const int64_t H = a.hidden, offset = (active ? row : 0) * H;
  const bool dropout = a.mask != nullptr;
  const float scale = dropout ? 1.f / (1.f - a.p) : 1.f;

  const T* x = a.x + offset;
  const T* residual = a.residual != nullptr ? a.residual + offset : nullptr;
  T* h_out = a.h != nullptr ? a.h + offset : nullptr;
  uint8_t* mask = dropout ? a.mask + offset : nullptr;
  const bool x_vec = vec_aligned<V>(x), b_vec = vec_aligned<V>(a.bias),
             r_vec = vec_aligned<V>(residual), h_vec = vec_aligned<V>(h_out),
             m_vec = vec_aligned<V>(mask);
  uint64_t seed = 0, philox_offset = 0;
  if (dropout) {
    const auto seeds = at::cuda::philox::unpack(a.rng.state);
    seed = std::get<0>(seeds);
    philox_offset = std::get<1>(seeds);
  }

  float h[P * V];
#pragma unroll
  for (int k = 0; k < P; ++k) {
    float* hv = h + k * V;
    const int64_t pack = t + int64_t(k) * G, col = pack * V;
    if (!active || col >= H) {
#pragma unroll
      for (int j = 0; j < V; ++j) hv[j] = 0.f;
      continue;
    }
    load_cols<V>(x, col, H, x_vec, hv);
    if (a.bias != nullptr) {
      float b[V];
      load_cols<V>(a.bias, col, H, b_vec, b);
#pragma unroll
      for (int j = 0; j < V; ++j) hv[j] += b[j];
    }
    if (dropout) {
      // One Philox subsequence per pack: the mask depends on the seed and the element's
      // position only, not on the launch configuration.
      curandStatePhilox4_32_10_t state;
      curand_init(seed, row * a.packs_per_row + pack, philox_offset, &state);
      float keep[V];
#pragma unroll
      for (int j = 0; j < V; j += 4) {
        const float4 r = curand_uniform4(&state);  // in (0, 1]
        const float rs[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4 && j + i < V; ++i) keep[j + i] = rs[i] >= a.p ? 1.f : 0.f;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) hv[j] *= keep[j] * scale;
      store_cols<V>(mask, col, H, m_vec, keep);
    }
    if (residual != nullptr) {
      float r[V];
      load_cols<V>(residual, col, H, r_vec, r);
#pragma unroll
      for (int j = 0; j < V; ++j) hv[j] += r[j];
    }
    // h is rounded to the storage type before the statistics, as eager PyTorch stores it, so
    // pre-LN's two outputs agree exactly and backward recomputes the xhat forward used.
#pragma unroll
    for (int j = 0; j < V; ++j) hv[j] = static_cast<float>(static_cast<T>(hv[j]));
    if (h_out != nullptr) store_cols<V>(h_out, col, H, h_vec, hv);
  }

  float sum[1] = {0.f};
#pragma unroll
  for (int e = 0; e < P * V; ++e) sum[0] += h[e];  // columns past the row end hold 0
  group_sum(sum, G, scratch);
  const float mean = sum[0] / static_cast<float>(H);
  float sq[1] = {0.f};
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t col = (t + int64_t(k) * G) * V;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = h[k * V + j] - mean;
      sq[0] += col + j < H ? d * d : 0.f;
    }
  }
  group_sum(sq, G, scratch);
  const float rstd = rsqrtf(sq[0] / static_cast<float>(H) + a.eps);
  if (!active) return;  // no block-wide synchronisation below
  if (t == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }

  T* out = a.out + offset;
  const bool o_vec = vec_aligned<V>(out), g_vec = vec_aligned<V>(a.gamma),
             be_vec = vec_aligned<V>(a.beta);
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t col = (t + int64_t(k) * G) * V;
    if (col >= H) continue;
    float y[V], gamma[V], beta[V];
    if (a.gamma != nullptr) load_cols<V>(a.gamma, col, H, g_vec, gamma);
    if (a.beta != nullptr) load_cols<V>(a.beta, col, H, be_vec, beta);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      y[j] = (h[k * V + j] - mean) * rstd;
      if (a.gamma != nullptr) y[j] *= gamma[j];
      if (a.beta != nullptr) y[j] += beta[j];
    }
    store_cols<V>(out, col, H, o_vec, y);
  }
}

// Which per-column sums the backward kernel accumulates, in this order.
enum Sum : int { kDgamma = 0, kDbeta = 1, kDbias = 2, kNumSums = 3 };

template <typename T>
struct BwdArgs {
  const T* dy;           // gradient of the LayerNorm output
  const T* dh_in;        // gradient reaching h from elsewhere, or null
  const T* h;
  const float* mean;
  const float* rstd;
  const T* gamma;        // or null
  const uint8_t* mask;   // or null (no dropout)
  T* dh;                 // gradient of h = of the residual
  T* dx;                 // gradient of x (and of bias, summed); null when it equals dh
  float* partial;        // [gridDim.x, num_sums, hidden]
  int64_t rows, hidden;
  int threads_per_row, num_sums;
  int slot[kNumSums];    // row of `partial` that each sum goes to, or -1 when not wanted
  float scale;           // 1 / (1 - p)
};

template <typename T, int P>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    layernorm_residual_bwd_kernel(const BwdArgs<T> a) {
  constexpr int V = pack_size<T>(), E = P * V;
  extern __shared__ float combine[];  // [rows per block, hidden] when rows share a block
  __shared__ float scratch[2 * 32];
  const int G = a.threads_per_row, R = blockDim.x / G;
  const int group = threadIdx.x / G, t = threadIdx.x % G;
  const int64_t H = a.hidden;
  const bool g_vec = vec_aligned<V>(a.gamma);
  float acc[kNumSums][E];
#pragma unroll
  for (int s = 0; s < kNumSums; ++s) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[s][e] = 0.f;
  }

  // The loop bound depends on blockIdx only, so all groups of a block iterate together.
  for (int64_t first = int64_t(blockIdx.x) * R; first < a.rows; first += int64_t(gridDim.x) * R) {
    const int64_t row = first + group;
    const bool active = row < a.rows;
    const int64_t offset = (active ? row : 0) * H;
    const T* dy_row = a.dy + offset;
    const T* h_row = a.h + offset;
    const bool dy_vec = vec_aligned<V>(dy_row), h_vec = vec_aligned<V>(h_row);
    const float mean = active ? a.mean[row] : 0.f, rstd = active ? a.rstd[row] : 0.f;
    // First pass, before the row reduction: xhat, g = dy * gamma, and the weight sums, which
    // need dy; afterwards only xhat and g stay live. Idle rows and columns past the row end
    // load dy = 0 and add nothing.
    float xhat[E], g[E];
    float sums[2] = {0.f, 0.f};  // sum g, sum g * xhat
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (t + int64_t(k) * G) * V;
      float* xv = xhat + k * V;
      float* gv = g + k * V;
      float gamma[V];
      if (active && col < H) {
        load_cols<V>(h_row, col, H, h_vec, xv);
        load_cols<V>(dy_row, col, H, dy_vec, gv);
        if (a.gamma != nullptr) {
          load_cols<V>(a.gamma, col, H, g_vec, gamma);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) gamma[j] = 1.f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = gv[j] = gamma[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        xv[j] = (xv[j] - mean) * rstd;
        acc[kDgamma][k * V + j] += gv[j] * xv[j];
        acc[kDbeta][k * V + j] += gv[j];
        gv[j] *= gamma[j];
        sums[0] += gv[j];
        sums[1] += gv[j] * xv[j];
      }
    }
    group_sum(sums, G, scratch);
    if (!active) continue;
    const float mean_g = sums[0] / static_cast<float>(H), mean_gx = sums[1] / static_cast<float>(H);

    const T* dh_in_row = a.dh_in != nullptr ? a.dh_in + offset : nullptr;
    const uint8_t* mask_row = a.mask != nullptr ? a.mask + offset : nullptr;
    T* dh_row = a.dh + offset;
    T* dx_row = a.dx != nullptr ? a.dx + offset : nullptr;
    const bool in_vec = vec_aligned<V>(dh_in_row), m_vec = vec_aligned<V>(mask_row),
               dh_vec = vec_aligned<V>(dh_row), dx_vec = vec_aligned<V>(dx_row);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (t + int64_t(k) * G) * V;
      if (col >= H) continue;
      float dh[V], extra[V], keep[V];
      if (dh_in_row != nullptr) load_cols<V>(dh_in_row, col, H, in_vec, extra);
      if (mask_row != nullptr) load_cols<V>(mask_row, col, H, m_vec, keep);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int e = k * V + j;
        dh[j] = rstd * (g[e] - mean_g - xhat[e] * mean_gx);
        if (dh_in_row != nullptr) dh[j] += extra[j];
        if (mask_row != nullptr) keep[j] *= a.scale;
        acc[kDbias][e] += mask_row != nullptr ? dh[j] * keep[j] : dh[j];
      }
      store_cols<V>(dh_row, col, H, dh_vec, dh);
      if (dx_row != nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) keep[j] *= dh[j];
        store_cols<V>(dx_row, col, H, dx_vec, keep);
      }
    }
  }

  // One fp32 row per block and sum.
#pragma unroll
  for (int s = 0; s < kNumSums; ++s) {
    if (a.slot[s] < 0) continue;
    float* dst = a.partial + (int64_t(blockIdx.x) * a.num_sums + a.slot[s]) * H;
    float* own = R == 1 ? dst : combine + int64_t(group) * H;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (t + int64_t(k) * G) * V;
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (col + j < H) own[col + j] = acc[s][k * V + j];
    }
    if (R > 1) {
      __syncthreads();
      for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
        float total = 0.f;
        for (int r = 0; r < R; ++r) total += combine[r * H + c];
        dst[c] = total;
      }
      __syncthreads();  // before the next sum reuses `combine`
    }
  }
}

// out[s][c] = sum over the partial rows of partial[:, s, c], in a fixed order.
template <typename T>
struct ColumnSumArgs {
  const float* partial;  // [parts, num_sums * hidden]
  int64_t parts, hidden, columns;
  T* out[kNumSums];      // indexed by slot
};

constexpr int kSumTileX = 32, kSumTileY = 16;

template <typename T>
__global__ void __launch_bounds__(kSumTileX * kSumTileY) column_sum_kernel(const ColumnSumArgs<T> a) {
  __shared__ float tile[kSumTileY][kSumTileX + 1];
  const int64_t c = int64_t(blockIdx.x) * kSumTileX + threadIdx.x;
  float total = 0.f;
  if (c < a.columns) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < a.parts; r += kSumTileY) total += a.partial[r * a.columns + c];
  }
  tile[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y != 0 || c >= a.columns) return;
#pragma unroll
  for (int y = 1; y < kSumTileY; ++y) total += tile[y][threadIdx.x];
  a.out[c / a.hidden][c % a.hidden] = static_cast<T>(total);
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct RowConfig {
  int packs_per_thread;  // P: a template parameter, one of 1, 2, 3, 4, 8
  int threads_per_row;   // G
  int block;             // rows per block * G
};

// About target_packs packs per thread; the group size G is a power of two up to one warp or a
// multiple of 32 up to kMaxThreadsPerRow, and P is what G leaves (at most 8).
RowConfig row_config(int64_t hidden, int64_t vec, int target_packs, int target_block) {
  const int64_t packs = (hidden + vec - 1) / vec;
  TORCH_CHECK(packs <= int64_t(kMaxThreadsPerRow) * kMaxPacksPerThread,
              "layernorm_residual: hidden size ", hidden, " exceeds the kernels' ",
              int64_t(kMaxThreadsPerRow) * kMaxPacksPerThread * vec,
              " (the Python op runs the reference for wider rows)");
  int64_t G = std::min<int64_t>((packs + target_packs - 1) / target_packs, kMaxThreadsPerRow);
  if (G <= 32) {
    int64_t pow2 = 1;
    while (pow2 < G) pow2 *= 2;
    G = pow2;
  } else {
    G = (G + 31) / 32 * 32;
  }
  const int64_t P = (packs + G - 1) / G;
  const int rows_per_block = std::max<int>(1, target_block / static_cast<int>(G));
  return {P <= 4 ? static_cast<int>(P) : kMaxPacksPerThread, static_cast<int>(G),
          rows_per_block * static_cast<int>(G)};
}

template <typename F>
void dispatch_packs(int packs_per_thread, F&& launch) {
  switch (packs_per_thread) {
    case 1: return launch(std::integral_constant<int, 1>{});
    case 2: return launch(std::integral_constant<int, 2>{});
    case 3: return launch(std::integral_constant<int, 3>{});
    case 4: return launch(std::integral_constant<int, 4>{});
    default: return launch(std::integral_constant<int, kMaxPacksPerThread>{});
  }
}

// Grid of the persistent backward kernel: as many blocks as fit on the GPU at once (fewer
// would leave it idle, more would only add rows to the partial sums), fewer for few rows.
template <typename Kernel>
int persistent_blocks(Kernel kernel, int block, size_t smem, int64_t rows, int rows_per_block) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, smem));
  const int64_t resident =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * std::max(per_sm, 1);
  return static_cast<int>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, resident));
}

void check_row_vector(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t->device() == x.device(), name, " must be on x's device");
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), name, " must have x's dtype");
  TORCH_CHECK(t->numel() == x.size(-1), name, " must have hidden = ", x.size(-1), " elements");
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Returns (out, h, mean, rstd, mask). h is empty when it would equal x (no bias, residual or
// dropout); mask is empty when p == 0; mean and rstd are fp32 with x's leading shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& ln_bias, double eps, double p) {
  FP_CHECK_INPUT(x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dimension");
  check_row_vector(bias, "bias", x);
  check_row_vector(weight, "weight", x);
  check_row_vector(ln_bias, "ln_bias", x);
  if (residual.has_value()) {
    FP_CHECK_INPUT(*residual);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "residual must match x in shape, dtype and device");
  }
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1)");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const bool dropout = p > 0.0, writes_h = residual.has_value() || bias.has_value() || dropout;
  const auto byte_options = x.options().dtype(at::kByte);
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto h = writes_h ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  auto mask = dropout ? at::empty(x.sizes(), byte_options) : at::empty({0}, byte_options);
  const auto leading = x.sizes().slice(0, x.dim() - 1);
  auto mean = at::empty(leading, x.options().dtype(at::kFloat));
  auto rstd = at::empty(leading, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, h, mean, rstd, mask};

  FP_DISPATCH_FLOAT(x.scalar_type(), "layernorm_residual_fwd", [&] {
    constexpr int V = pack_size<scalar_t>();
    const RowConfig cfg = row_config(hidden, V, kFwdTargetPacks, kFwdTargetBlock);
    const int64_t rows_per_block = cfg.block / cfg.threads_per_row;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "layernorm_residual_fwd: too many rows");
    FwdArgs<scalar_t> args{};
    args.x = x.data_ptr<scalar_t>();
    args.bias = ptr_or_null<scalar_t>(bias);
    args.residual = ptr_or_null<scalar_t>(residual);
    args.gamma = ptr_or_null<scalar_t>(weight);
    args.beta = ptr_or_null<scalar_t>(ln_bias);
    args.out = out.data_ptr<scalar_t>();
    args.h = writes_h ? h.data_ptr<scalar_t>() : nullptr;
    args.mask = dropout ? mask.data_ptr<uint8_t>() : nullptr;
    args.mean = mean.data_ptr<float>();
    args.rstd = rstd.data_ptr<float>();
    args.rows = rows;
    args.hidden = hidden;
    args.packs_per_row = (hidden + V - 1) / V;
    args.threads_per_row = cfg.threads_per_row;
    args.eps = static_cast<float>(eps);
    args.p = static_cast<float>(p);
    // Each pack's subsequence draws V uniforms (rounded up to whole curand_uniform4 calls).
    if (dropout) args.rng = reserve_dropout_rng(x.device(), V);
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_packs(cfg.packs_per_thread, [&](auto packs) {
      layernorm_residual_fwd_kernel<scalar_t, decltype(packs)::value>
          <<<static_cast<int>(blocks), cfg.block, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, h, mean, rstd, mask};
}

// Returns (dh, dx, dgamma, dbeta, dbias). dx is empty when p == 0 (it equals dh); each weight
// gradient is empty unless asked for. mask is needed only when p > 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& mask, double p, bool need_weight_grad, bool need_ln_bias_grad,
    bool need_bias_grad) {
  FP_CHECK_INPUT(grad_out);
  FP_CHECK_INPUT(h);
  FP_CHECK_INPUT(mean);
  FP_CHECK_INPUT(rstd);
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) > 0, "h must have a non-empty last dimension");
  const int64_t hidden = h.size(-1), rows = h.numel() / hidden;
  TORCH_CHECK(grad_out.sizes() == h.sizes() && grad_out.scalar_type() == h.scalar_type(),
              "grad_out must match h");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat &&
                  mean.numel() == rows && rstd.numel() == rows,
              "mean and rstd must be fp32 with one value per row");
  if (grad_h.has_value()) {
    FP_CHECK_INPUT(*grad_h);
    TORCH_CHECK(grad_h->sizes() == h.sizes() && grad_h->scalar_type() == h.scalar_type(),
                "grad_h must match h");
  }
  check_row_vector(weight, "weight", h);
  TORCH_CHECK(!need_weight_grad || weight.has_value(), "a weight gradient needs the weight");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1)");
  const bool dropout = p > 0.0;
  if (dropout) {
    TORCH_CHECK(mask.has_value(), "dropout (p > 0) needs its mask");
    FP_CHECK_INPUT(*mask);
    TORCH_CHECK(mask->scalar_type() == at::kByte && mask->numel() == h.numel(),
                "mask must be uint8 like h");
  }
  c10::cuda::CUDAGuard guard(h.device());
  const auto options = h.options();
  auto dh = at::empty_like(h, at::MemoryFormat::Contiguous);
  auto dx = dropout ? at::empty_like(h, at::MemoryFormat::Contiguous) : at::empty({0}, options);
  auto vector_or_empty = [&](bool wanted) { return at::empty({wanted ? hidden : 0}, options); };
  auto dgamma = vector_or_empty(need_weight_grad);
  auto dbeta = vector_or_empty(need_ln_bias_grad);
  auto dbias = vector_or_empty(need_bias_grad);
  if (rows == 0) {
    dgamma.zero_();
    dbeta.zero_();
    dbias.zero_();
    return {dh, dx, dgamma, dbeta, dbias};
  }

  FP_DISPATCH_FLOAT(h.scalar_type(), "layernorm_residual_bwd", [&] {
    constexpr int V = pack_size<scalar_t>();
    const RowConfig cfg = row_config(hidden, V, kBwdTargetPacks, kBwdTargetBlock);
    const int rows_per_block = cfg.block / cfg.threads_per_row;
    BwdArgs<scalar_t> args{};
    args.dy = grad_out.data_ptr<scalar_t>();
    args.dh_in = ptr_or_null<scalar_t>(grad_h);
    args.h = h.data_ptr<scalar_t>();
    args.mean = mean.data_ptr<float>();
    args.rstd = rstd.data_ptr<float>();
    args.gamma = ptr_or_null<scalar_t>(weight);
    args.mask = dropout ? mask->data_ptr<uint8_t>() : nullptr;
    args.dh = dh.data_ptr<scalar_t>();
    args.dx = dropout ? dx.data_ptr<scalar_t>() : nullptr;
    args.rows = rows;
    args.hidden = hidden;
    args.threads_per_row = cfg.threads_per_row;
    args.scale = static_cast<float>(1.0 / (1.0 - p));
    ColumnSumArgs<scalar_t> sum_args{};
    const bool wanted[kNumSums] = {need_weight_grad, need_ln_bias_grad, need_bias_grad};
    at::Tensor* targets[kNumSums] = {&dgamma, &dbeta, &dbias};
    for (int s = 0; s < kNumSums; ++s) {
      args.slot[s] = wanted[s] ? args.num_sums : -1;
      if (wanted[s]) sum_args.out[args.num_sums++] = targets[s]->data_ptr<scalar_t>();
    }
    const size_t smem = rows_per_block > 1 ? size_t(rows_per_block) * hidden * sizeof(float) : 0;
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_packs(cfg.packs_per_thread, [&](auto packs) {
      auto kernel = layernorm_residual_bwd_kernel<scalar_t, decltype(packs)::value>;
      const int blocks = persistent_blocks(kernel, cfg.block, smem, rows, rows_per_block);
      at::Tensor partial;
      if (args.num_sums > 0) {
        partial = at::empty({blocks, args.num_sums, hidden}, options.dtype(at::kFloat));
        args.partial = partial.data_ptr<float>();
      }
      kernel<<<blocks, cfg.block, smem, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (args.num_sums > 0) {
        sum_args.partial = args.partial;
        sum_args.parts = blocks;
        sum_args.hidden = hidden;
        sum_args.columns = int64_t(args.num_sums) * hidden;
        const int64_t tiles = (sum_args.columns + kSumTileX - 1) / kSumTileX;
        column_sum_kernel<scalar_t><<<static_cast<int>(tiles), dim3(kSumTileX, kSumTileY), 0, stream>>>(sum_args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {dh, dx, dgamma, dbeta, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("layernorm_residual_fwd(Tensor x, Tensor? bias, Tensor? residual, Tensor? weight, "
        "Tensor? ln_bias, float eps, float p) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &layernorm_residual_fwd);
  m.def("layernorm_residual_bwd(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor mean, "
        "Tensor rstd, Tensor? weight, Tensor? mask, float p, bool need_weight_grad, "
        "bool need_ln_bias_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &layernorm_residual_bwd);
}

}  // namespace fastpatch
