// Transformer embedding: token gather + scale + positions + token types + LayerNorm + dropout.
//
//   x[r]   = scale * tok_w[ids[r]] + pos[r] + type_w[type_ids[r]]            (fp32)
//   pos[r] = pos_w[pos_ids[r]] (learned), or fairseq's sinusoid of pos_ids[r] computed here
//            (no table, so no maximum length; zero where pos_ids[r] == padding_idx)
//   y[r]   = dropout(LayerNorm(x[r]))                                         (LayerNorm optional)
//
// Rows r = b * L + l of the [B, L] index tensors, which may be broadcast (HF passes position and
// token type ids as [1, L]), so they are read through their strides. A group of blockDim.x
// threads handles one row and blockDim.y rows share a block (small hidden sizes would otherwise
// leave blocks of one warp). A thread owns the same columns in every row, packs
// j = threadIdx.x + k * blockDim.x, and keeps up to K of them in registers; K == 0 is the path
// for hidden sizes beyond that, which recomputes the row instead of caching it.
//
// What backward needs from forward: the per-row LayerNorm mean and rstd (fp32, 8 bytes a row)
// and the dropout keep-mask. Backward recomputes the pre-norm row x by gathering again: the
// position and type tables are small and stay in L2, the token rows cost one more read of
// rows * hidden elements, and nothing has to be written in forward. Storing x (or x-hat) instead
// would add a write and a read of the same size, and in fp16 would round the value.
//
// Table gradients: each row's gradient is added with fp32 atomics (repeated ids add up), then
// cast to the weight dtype. fp32 weights accumulate straight into the zeroed gradient. A half
// table with at most `rows` rows gets a zeroed fp32 copy. A bigger one (the vocabulary) would
// need a V x H fp32 buffer that is mostly untouched, so instead every id present claims a slot
// (one of the rows holding it) and accumulates into a rows x H fp32 buffer at that slot. A tiny
// table (token types: 1 or 2 rows that every row hits) is summed per block in shared memory and
// reduced across blocks like the LayerNorm weight/bias gradients, without global atomics.
// Out-of-range ids trap with a device-side assert, as nn.Embedding does on CUDA: checking on the
// host would cost a synchronisation per call and break CUDA-graph capture.
#include "common.cuh"

namespace fastpatch {
namespace {

constexpr int kMaxRowThreads = 512;  // blockDim.x at most
constexpr int kBlockThreads = 256;   // rows are stacked in blockDim.y up to this many threads
constexpr int kMaxRowsPerBlock = kBlockThreads / 32;
constexpr int kMaxCachedFloats = 16;   // K * N: what a thread keeps of one row in registers
constexpr int kBwdMaxBlocksPerSm = 4;  // bounds the per-block partial sums of backward
// A table this small (the token types) is summed per block in shared memory: with global atomics
// every row would add into the same few addresses, serialising thousands of atomics on each.
constexpr int64_t kBlockSumTableBytes = 32 * 1024;

// A [B, L] tensor of int32 or int64 ids, read through its strides.
struct IndexView {
  const void* data = nullptr;
  bool is64 = true;
  int64_t stride_b = 0, stride_l = 0;

  __device__ __forceinline__ int64_t load(int64_t b, int64_t l) const {
    const int64_t off = b * stride_b + l * stride_l;
    return is64 ? static_cast<const int64_t*>(data)[off]
                : static_cast<int64_t>(static_cast<const int32_t*>(data)[off]);
  }
};

IndexView index_view(const at::Tensor& t) {
  return IndexView{t.data_ptr(), t.scalar_type() == at::kLong, t.stride(0), t.stride(1)};
}

// Everything a kernel needs to rebuild row x; nullptr tables and ids are absent pieces.
template <typename scalar_t>
struct Tables {
  IndexView ids, pos_ids, type_ids;
  const scalar_t* tok_w = nullptr;
  const scalar_t* pos_w = nullptr;
  const scalar_t* type_w = nullptr;
  const scalar_t* ln_w = nullptr;
  const scalar_t* ln_b = nullptr;
  int64_t vocab = 0, num_positions = 0, num_types = 0;
  int64_t rows = 0, seq_len = 1, hidden = 0;
  bool sinusoidal = false, has_padding = false;
  int64_t padding_idx = 0;
  int half_dim = 0;
  float neg_log_step = 0.f;  // -log(10000) / (half_dim - 1), rounded to fp32 as fairseq does
  float scale = 1.f;
};

struct RowIds {
  int64_t tok = 0, pos = 0, type = 0;
};

template <typename scalar_t>
__device__ __forceinline__ RowIds load_row_ids(const Tables<scalar_t>& t, int64_t row) {
  const int64_t b = row / t.seq_len, l = row - b * t.seq_len;
  RowIds r;
  r.tok = t.ids.load(b, l);
  CUDA_KERNEL_ASSERT(r.tok >= 0 && r.tok < t.vocab && "input_ids out of range of token_weight");
  if (t.pos_ids.data != nullptr) {
    r.pos = t.pos_ids.load(b, l);
    CUDA_KERNEL_ASSERT((t.pos_w == nullptr || (r.pos >= 0 && r.pos < t.num_positions)) &&
                       "position_ids out of range of position_weight");
  }
  if (t.type_w != nullptr) {
    r.type = t.type_ids.load(b, l);
    CUDA_KERNEL_ASSERT(r.type >= 0 && r.type < t.num_types &&
                       "token_type_ids out of range of token_type_weight");
  }
  return r;
}

// fairseq's SinusoidalPositionalEmbedding at (pos, col): sin for the first half of the columns,
// cos for the second, 0 in the last column of an odd hidden size. Accurate sinf/cosf (not the
// __sinf intrinsics): angles reach thousands of radians.
__device__ __forceinline__ float sinusoid(float pos, int64_t col, int half_dim, float neg_log_step) {
  if (col >= 2 * half_dim) return 0.f;
  const bool is_cos = col >= half_dim;
  const float k = static_cast<float>(is_cos ? col - half_dim : col);
  const float angle = pos * expf(k * neg_log_step);
  return is_cos ? cosf(angle) : sinf(angle);
}

// x for the N columns starting at `col` of one row.
template <int N, typename scalar_t>
__device__ __forceinline__ void gather_pack(const Tables<scalar_t>& t, const RowIds& r, int64_t col,
                                            float (&v)[N]) {
  const auto tok = load_pack<scalar_t, N>(t.tok_w + r.tok * t.hidden + col);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = t.scale * static_cast<float>(tok.v[i]);
  if (t.pos_w != nullptr) {
    const auto pos = load_pack<scalar_t, N>(t.pos_w + r.pos * t.hidden + col);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += static_cast<float>(pos.v[i]);
  } else if (t.sinusoidal && !(t.has_padding && r.pos == t.padding_idx)) {
    const float pos = static_cast<float>(r.pos);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += sinusoid(pos, col + i, t.half_dim, t.neg_log_step);
  }
  if (t.type_w != nullptr) {
    const auto type = load_pack<scalar_t, N>(t.type_w + r.type * t.hidden + col);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += static_cast<float>(type.v[i]);
  }
}

// Calls f(k, j) for the packs j this thread owns in a row of `packs` packs; k indexes its
// register cache (K > 0, fully unrolled so the cache stays in registers) or is 0 (K == 0).
template <int K, typename F>
__device__ __forceinline__ void for_each_pack(int64_t packs, F&& f) {
  if constexpr (K > 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
      if (j < packs) f(k, j);
    }
  } else {
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) f(0, j);
  }
}

// Sum over the blockDim.x threads of this row (blockDim.x is a multiple of 32). Every thread
// of the block must call it, rows past the end included.
__device__ __forceinline__ float row_sum(float v, float (*scratch)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[threadIdx.y][warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? scratch[threadIdx.y][lane] : 0.f;
  return warp_sum(v);
}

template <int N>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = N % 4 == 0;  // one 16-byte vector atomic (Hopper) instead of four
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q)
      atomicAdd(reinterpret_cast<float4*>(dst) + q,
                make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(dst + i, v[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.
template <typename scalar_t, int N, int K>
__global__ void __launch_bounds__(kMaxRowThreads)
    embedding_fwd_kernel(Tables<scalar_t> t, float eps, float p, DropoutRng rng,
                         scalar_t* __restrict__ out, uint8_t* __restrict__ mask,
                         float* __restrict__ stats) {
  __shared__ float scratch[kMaxRowsPerBlock][32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < t.rows;
  const int64_t packs = valid ? t.hidden / N : 0;  // rows past the end only join the reductions
  const bool ln = t.ln_w != nullptr;
  const RowIds ids = valid ? load_row_ids(t, row) : RowIds{};
  float cache[K > 0 ? K : 1][N];

  float mean = 0.f, rstd = 1.f;
  if (ln) {  // two-pass statistics in fp32: the mean first, then squared deviations from it
    float sum = 0.f;
    for_each_pack<K>(packs, [&](int k, int64_t j) {
      float v[N];
      gather_pack<N>(t, ids, j * N, v);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sum += v[i];
        if constexpr (K > 0) cache[k][i] = v[i];
      }
    });
    mean = row_sum(sum, scratch) / static_cast<float>(t.hidden);
    float sq = 0.f;
    for_each_pack<K>(packs, [&](int k, int64_t j) {
      float v[N];
      if constexpr (K > 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = cache[k][i];
      } else {
        gather_pack<N>(t, ids, j * N, v);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) sq += (v[i] - mean) * (v[i] - mean);
    });
    rstd = rsqrtf(row_sum(sq, scratch) / static_cast<float>(t.hidden) + eps);
    if (valid && threadIdx.x == 0) {
      stats[2 * row] = mean;
      stats[2 * row + 1] = rstd;
    }
  }

  const bool dropout = p > 0.f;
  const float keep_scale = dropout ? 1.f / (1.f - p) : 1.f;
  curandStatePhilox4_32_10_t state;
  if (dropout && valid) state = init_philox(rng.state, uint64_t(row) * blockDim.x + threadIdx.x);
  const int64_t base = row * t.hidden;
  for_each_pack<K>(packs, [&](int k, int64_t j) {
    float v[N];
    if constexpr (K > 0) {
      if (ln) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = cache[k][i];
      } else {
        gather_pack<N>(t, ids, j * N, v);
      }
    } else {
      gather_pack<N>(t, ids, j * N, v);
    }
    if (ln) {
      const auto w = load_pack<scalar_t, N>(t.ln_w + j * N);
      Pack<scalar_t, N> b;
      if (t.ln_b != nullptr) b = load_pack<scalar_t, N>(t.ln_b + j * N);
#pragma unroll
      for (int i = 0; i < N; ++i)
        v[i] = (v[i] - mean) * rstd * static_cast<float>(w.v[i]) +
               (t.ln_b != nullptr ? static_cast<float>(b.v[i]) : 0.f);
    }
    float rand[(N + 3) / 4 * 4];
    if (dropout) {
#pragma unroll
      for (int q = 0; q < (N + 3) / 4; ++q) {
        const float4 r4 = curand_uniform4(&state);
        rand[4 * q] = r4.x; rand[4 * q + 1] = r4.y; rand[4 * q + 2] = r4.z; rand[4 * q + 3] = r4.w;
      }
    }
    Pack<scalar_t, N> yv;
    Pack<uint8_t, N> mv;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool keep = !dropout || rand[i] >= p;  // curand_uniform is in (0, 1]
      mv.v[i] = keep;
      yv.v[i] = static_cast<scalar_t>(keep ? v[i] * keep_scale : 0.f);
    }
    store_pack<scalar_t, N>(out + base + j * N, yv);
    if (dropout) store_pack<uint8_t, N>(mask + base + j * N, mv);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Blocks stride over row groups so that each block sums the gradients every row adds
// to the same place (LayerNorm weight and bias; a small token-type table) over many rows before
// writing them once, as its row of `partial`; block_sums_reduce_kernel then adds those rows up,
// without atomics (deterministic). Partial rows: [ln weight, ln bias] if ln, then the type rows.
struct BlockSums {
  float* partial = nullptr;  // [gridDim.x, rows, H]
  int rows = 0;
  bool ln = false;           // LayerNorm weight/bias gradients wanted (rows 0 and 1)
  int type_rows = 0;         // token-type rows summed in shared memory (0: through TableAcc)
};

struct TableAcc {
  float* acc = nullptr;            // fp32 accumulation rows; nullptr: no gradient wanted
  const int64_t* slot = nullptr;   // id -> row of acc, or nullptr: acc is indexed by id
  bool has_skip = false;           // the `skip` id (nn.Embedding's padding_idx) gets no gradient
  int64_t skip = 0;

  __device__ __forceinline__ float* row(int64_t id, int64_t hidden) const {
    if (acc == nullptr || (has_skip && id == skip)) return nullptr;
    return acc + (slot != nullptr ? slot[id] : id) * hidden;
  }
};

template <typename scalar_t, int N, int K>
__global__ void __launch_bounds__(kMaxRowThreads)
    embedding_bwd_kernel(Tables<scalar_t> t, const scalar_t* __restrict__ grad_out,
                         const uint8_t* __restrict__ mask, const float* __restrict__ stats, float p,
                         TableAcc tok_acc, TableAcc pos_acc, TableAcc type_acc, BlockSums sums) {
  __shared__ float scratch[kMaxRowsPerBlock][32];
  __shared__ float fold[kBlockThreads];
  extern __shared__ float type_sums[];  // [sums.type_rows, H]
  const bool ln = t.ln_w != nullptr;
  const bool tables = tok_acc.acc != nullptr || pos_acc.acc != nullptr ||
                      type_acc.acc != nullptr || sums.type_rows > 0;
  const int64_t all_packs = t.hidden / N;
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const int threads = blockDim.x * blockDim.y, lane = threadIdx.y * blockDim.x + threadIdx.x;
  float* const partial =
      sums.partial != nullptr ? sums.partial + int64_t(blockIdx.x) * sums.rows * t.hidden : nullptr;
  if (sums.type_rows > 0) {
    for (int64_t c = lane; c < sums.type_rows * t.hidden; c += threads) type_sums[c] = 0.f;
    __syncthreads();
  }
  // LayerNorm weight/bias gradients of this thread's columns over the rows it visits: in
  // registers when the columns fit (K > 0), else summed in place in this block's partial row
  // (blockDim.y == 1 then, so each column has one owner).
  float dw[K > 0 ? K : 1][N] = {}, db[K > 0 ? K : 1][N] = {};
  if constexpr (K == 0) {
    if (sums.ln) {
      for_each_pack<K>(all_packs, [&](int, int64_t j) {
#pragma unroll
        for (int i = 0; i < N; ++i) partial[j * N + i] = partial[t.hidden + j * N + i] = 0.f;
      });
    }
  }

  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < t.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool valid = row < t.rows;
    const int64_t packs = valid ? all_packs : 0;
    const RowIds ids = valid ? load_row_ids(t, row) : RowIds{};
    float* const tok_row = valid ? tok_acc.row(ids.tok, t.hidden) : nullptr;
    float* const pos_row = valid ? pos_acc.row(ids.pos, t.hidden) : nullptr;
    float* const type_row = valid ? type_acc.row(ids.type, t.hidden) : nullptr;
    const int64_t base = row * t.hidden;

    // dL/dy through dropout: g = dy * keep / (1 - p)
    auto upstream = [&](int64_t j, float (&g)[N]) {
      const auto gv = load_pack<scalar_t, N>(grad_out + base + j * N);
      Pack<uint8_t, N> mv;
      if (mask != nullptr) mv = load_pack<uint8_t, N>(mask + base + j * N);
#pragma unroll
      for (int i = 0; i < N; ++i)
        g[i] = static_cast<float>(gv.v[i]) *
               (mask != nullptr ? static_cast<float>(mv.v[i]) * keep_scale : 1.f);
    };
    auto scatter = [&](int64_t j, const float (&dx)[N]) {
      if (tok_row != nullptr) {
        float s[N];
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] = t.scale * dx[i];
        atomic_add_pack<N>(tok_row + j * N, s);
      }
      if (pos_row != nullptr) atomic_add_pack<N>(pos_row + j * N, dx);
      if (type_row != nullptr) atomic_add_pack<N>(type_row + j * N, dx);
      if (sums.type_rows > 0 && valid) {  // contention only among the block's blockDim.y rows
#pragma unroll
        for (int i = 0; i < N; ++i) atomicAdd(type_sums + ids.type * t.hidden + j * N + i, dx[i]);
      }
    };

    if (!ln) {
      for_each_pack<K>(packs, [&](int, int64_t j) {
        float g[N];
        upstream(j, g);
        scatter(j, g);
      });
      continue;
    }

    // LayerNorm backward: with x-hat = (x - mean) * rstd and d = g * w,
    //   dx = rstd * (d - mean(d) - x-hat * mean(d * x-hat)),  dw += g * x-hat,  db += g.
    const float mean = valid ? stats[2 * row] : 0.f;
    const float rstd = valid ? stats[2 * row + 1] : 0.f;
    auto terms = [&](int64_t j, float (&xhat)[N], float (&d)[N], float (&g)[N]) {
      float x[N];
      gather_pack<N>(t, ids, j * N, x);
      upstream(j, g);
      const auto w = load_pack<scalar_t, N>(t.ln_w + j * N);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        xhat[i] = (x[i] - mean) * rstd;
        d[i] = g[i] * static_cast<float>(w.v[i]);
      }
    };
    float xhat_c[K > 0 ? K : 1][N], d_c[K > 0 ? K : 1][N];
    float sum_d = 0.f, sum_dx = 0.f;
    for_each_pack<K>(packs, [&](int k, int64_t j) {
      float xhat[N], d[N], g[N];
      terms(j, xhat, d, g);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sum_d += d[i];
        sum_dx += d[i] * xhat[i];
        if constexpr (K > 0) {
          dw[k][i] += g[i] * xhat[i];
          db[k][i] += g[i];
          xhat_c[k][i] = xhat[i];
          d_c[k][i] = d[i];
        } else if (sums.ln) {
          partial[j * N + i] += g[i] * xhat[i];
          partial[t.hidden + j * N + i] += g[i];
        }
      }
    });
    if (!tables) continue;
    const float mean_d = row_sum(sum_d, scratch) / static_cast<float>(t.hidden);
    const float mean_dx = row_sum(sum_dx, scratch) / static_cast<float>(t.hidden);
    for_each_pack<K>(packs, [&](int k, int64_t j) {
      float xhat[N], d[N];
      if constexpr (K > 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          xhat[i] = xhat_c[k][i];
          d[i] = d_c[k][i];
        }
      } else {
        float g[N];
        terms(j, xhat, d, g);
      }
      float dx[N];
#pragma unroll
      for (int i = 0; i < N; ++i) dx[i] = rstd * (d[i] - mean_d - xhat[i] * mean_dx);
      scatter(j, dx);
    });
  }

  if (sums.type_rows > 0) {
    __syncthreads();
    float* const dst = partial + (sums.ln ? 2 : 0) * t.hidden;
    for (int64_t c = lane; c < sums.type_rows * t.hidden; c += threads) dst[c] = type_sums[c];
  }
  if constexpr (K > 0) {
    if (!sums.ln) return;
    if (blockDim.y == 1) {
      for_each_pack<K>(all_packs, [&](int k, int64_t j) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          partial[j * N + i] = dw[k][i];
          partial[t.hidden + j * N + i] = db[k][i];
        }
      });
      return;
    }
    // Fold the blockDim.y row slots' register partials into this block's partial row, one
    // (k, i) value at a time through shared memory (blockDim.x * blockDim.y <= kBlockThreads
    // whenever blockDim.y > 1).
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
#pragma unroll
      for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int which = 0; which < 2; ++which) {
          fold[lane] = which == 0 ? dw[k][i] : db[k][i];
          __syncthreads();
          if (threadIdx.y == 0 && j < all_packs) {
            float s = 0.f;
            for (int y = 0; y < int(blockDim.y); ++y) s += fold[y * blockDim.x + threadIdx.x];
            partial[which * t.hidden + j * N + i] = s;
          }
          __syncthreads();
        }
      }
    }
  }
}

// Sum of the blocks' partial rows ([blocks, rows, H]) -> the gradients in the weight dtype:
// LayerNorm weight and bias (rows 0 and 1, when `ln`; grad_b may be absent), then the type rows.
template <typename scalar_t>
__global__ void block_sums_reduce_kernel(const float* __restrict__ partial, int64_t blocks,
                                         int64_t rows, int64_t hidden, bool ln,
                                         scalar_t* __restrict__ grad_w, scalar_t* __restrict__ grad_b,
                                         scalar_t* __restrict__ grad_type) {
  __shared__ float tile[16][33];
  const int64_t width = rows * hidden;
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (col < width)
    for (int64_t r = threadIdx.y; r < blocks; r += 16) s += partial[r * width + col];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= width) return;
  for (int y = 1; y < 16; ++y) s += tile[y][threadIdx.x];
  const int64_t ln_cols = ln ? 2 * hidden : 0;
  if (col < ln_cols) {
    scalar_t* const dst = col < hidden ? grad_w : grad_b;
    if (dst != nullptr) dst[col % hidden] = static_cast<scalar_t>(s);
  } else {
    grad_type[col - ln_cols] = static_cast<scalar_t>(s);
  }
}

// slot[id] = one of the rows holding id. Rows race; every winner is a valid slot, and the
// kernel boundary orders these writes before the reads in embedding_bwd_kernel.
__global__ void claim_slots_kernel(IndexView ids, int64_t rows, int64_t seq_len, int64_t table_rows,
                                   int64_t* __restrict__ slot) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = r / seq_len;
    const int64_t id = ids.load(b, r - b * seq_len);
    CUDA_KERNEL_ASSERT(id >= 0 && id < table_rows && "embedding ids out of range");
    slot[id] = r;
  }
}

// grad[id] = acc[slot[id]] for each id present (written once: by the row that won the slot).
template <typename scalar_t>
__global__ void scatter_slots_kernel(IndexView ids, int64_t rows, int64_t seq_len, int64_t hidden,
                                     TableAcc acc, scalar_t* __restrict__ grad) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / seq_len;
    const int64_t id = ids.load(b, r - b * seq_len);
    if ((acc.has_skip && id == acc.skip) || acc.slot[id] != r) continue;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
      grad[id * hidden + c] = static_cast<scalar_t>(acc.acc[r * hidden + c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
struct Inputs {
  at::Tensor ids, tok_w;
  c10::optional<at::Tensor> pos_ids, pos_w, type_ids, type_w, ln_w, ln_b;
  bool sinusoidal = false;
  c10::optional<int64_t> padding_idx;
  double scale = 1.0;
  int64_t rows = 0, seq_len = 0, hidden = 0;
};

void check_ids(const at::Tensor& t, const at::Tensor& ids, const char* name) {
  FP_CHECK_CUDA(t);
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int64 or int32");
  TORCH_CHECK(t.sizes() == ids.sizes(), name, " must have input_ids' shape (expand it first)");
}

void check_table(const at::Tensor& w, const at::Tensor& tok_w, const char* name, bool two_d) {
  FP_CHECK_INPUT(w);
  TORCH_CHECK(w.scalar_type() == tok_w.scalar_type(), name, " must have token_weight's dtype");
  TORCH_CHECK(w.dim() == (two_d ? 2 : 1) && w.size(-1) == tok_w.size(1),
              name, two_d ? " must be [n, hidden]" : " must be [hidden]");
}

Inputs check_inputs(const at::Tensor& input_ids, const at::Tensor& token_weight,
                    const c10::optional<at::Tensor>& position_ids,
                    const c10::optional<at::Tensor>& position_weight,
                    const c10::optional<at::Tensor>& token_type_ids,
                    const c10::optional<at::Tensor>& token_type_weight,
                    const c10::optional<at::Tensor>& ln_weight,
                    const c10::optional<at::Tensor>& ln_bias, bool sinusoidal,
                    c10::optional<int64_t> padding_idx, double scale) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [batch, seq_len]");
  check_ids(input_ids, input_ids, "input_ids");
  FP_CHECK_INPUT(token_weight);
  TORCH_CHECK(token_weight.dim() == 2 && token_weight.size(1) > 0, "token_weight must be [vocab, hidden]");
  Inputs in{input_ids, token_weight, position_ids, position_weight, token_type_ids,
            token_type_weight, ln_weight, ln_bias, sinusoidal, padding_idx, scale};
  in.rows = input_ids.numel();
  in.seq_len = input_ids.size(1);
  in.hidden = token_weight.size(1);
  TORCH_CHECK(!(position_weight.has_value() && sinusoidal), "learned and sinusoidal positions are exclusive");
  TORCH_CHECK(position_ids.has_value() == (position_weight.has_value() || sinusoidal),
              "position_ids need position_weight or sinusoidal, and vice versa");
  if (position_ids.has_value()) check_ids(*position_ids, input_ids, "position_ids");
  if (position_weight.has_value()) check_table(*position_weight, token_weight, "position_weight", true);
  TORCH_CHECK(!sinusoidal || in.hidden >= 4, "sinusoidal positions need hidden >= 4");
  TORCH_CHECK(token_type_ids.has_value() == token_type_weight.has_value(),
              "token_type_ids and token_type_weight go together");
  if (token_type_ids.has_value()) {
    check_ids(*token_type_ids, input_ids, "token_type_ids");
    check_table(*token_type_weight, token_weight, "token_type_weight", true);
  }
  TORCH_CHECK(!ln_bias.has_value() || ln_weight.has_value(), "ln_bias needs ln_weight");
  if (ln_weight.has_value()) check_table(*ln_weight, token_weight, "ln_weight", false);
  if (ln_bias.has_value()) check_table(*ln_bias, token_weight, "ln_bias", false);
  return in;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
Tables<scalar_t> tables_of(const Inputs& in) {
  Tables<scalar_t> t;
  t.ids = index_view(in.ids);
  if (in.pos_ids.has_value()) t.pos_ids = index_view(*in.pos_ids);
  if (in.type_ids.has_value()) t.type_ids = index_view(*in.type_ids);
  t.tok_w = in.tok_w.data_ptr<scalar_t>();
  t.pos_w = ptr_or_null<scalar_t>(in.pos_w);
  t.type_w = ptr_or_null<scalar_t>(in.type_w);
  t.ln_w = ptr_or_null<scalar_t>(in.ln_w);
  t.ln_b = ptr_or_null<scalar_t>(in.ln_b);
  t.vocab = in.tok_w.size(0);
  t.num_positions = in.pos_w.has_value() ? in.pos_w->size(0) : 0;
  t.num_types = in.type_w.has_value() ? in.type_w->size(0) : 0;
  t.rows = in.rows;
  t.seq_len = in.seq_len;
  t.hidden = in.hidden;
  t.sinusoidal = in.sinusoidal;
  t.has_padding = in.padding_idx.has_value();
  t.padding_idx = in.padding_idx.value_or(0);
  t.half_dim = static_cast<int>(in.hidden / 2);
  if (in.sinusoidal) t.neg_log_step = static_cast<float>(-std::log(10000.0) / (t.half_dim - 1));
  t.scale = static_cast<float>(in.scale);
  return t;
}

// How threads map onto a row: `pack` elements per access, `k` packs cached per thread (0: none),
// `tx` threads per row, `ty` rows per block.
struct RowShape {
  int pack, k, tx, ty;
};

RowShape row_shape(int64_t hidden, int pack) {
  const int64_t packs = hidden / pack;
  int k = 0;
  for (int cand = 1; cand * pack <= kMaxCachedFloats; cand *= 2) {
    // the scalar path (odd or unaligned hidden) is rare: one cached instantiation, k = 4
    if (pack == 1 && cand != 4) continue;
    if ((packs + cand - 1) / cand <= kMaxRowThreads) {
      k = cand;
      break;
    }
  }
  const int tx = k > 0 ? static_cast<int>(((packs + k - 1) / k + 31) / 32 * 32) : kMaxRowThreads;
  const int ty = std::max(1, std::min(kMaxRowsPerBlock, kBlockThreads / tx));
  return {pack, k, tx, ty};
}

template <typename scalar_t>
RowShape choose_shape(int64_t hidden, std::initializer_list<const void*> ptrs, const void* mask) {
  constexpr int P = pack_size<scalar_t>();
  bool vec = hidden % P == 0 && (mask == nullptr || is_aligned(mask, P));
  for (const void* p : ptrs) vec = vec && (p == nullptr || is_aligned(p, 16));
  return row_shape(hidden, vec ? P : 1);
}

// Calls launch(integral_constant<N>, integral_constant<K>) for the shape's instantiation.
template <typename scalar_t, typename F>
void with_shape(const RowShape& s, F&& launch) {
  constexpr int P = pack_size<scalar_t>();
  using one = std::integral_constant<int, 1>;
  using none = std::integral_constant<int, 0>;
  using vec = std::integral_constant<int, P>;
  if (s.pack == 1) {
    if (s.k == 4) launch(one{}, std::integral_constant<int, 4>{});
    else launch(one{}, none{});
    return;
  }
  if (s.k == 1) {
    launch(vec{}, std::integral_constant<int, 1>{});
  } else if (s.k == 2) {
    launch(vec{}, std::integral_constant<int, 2>{});
  } else if constexpr (4 * P <= kMaxCachedFloats) {
    if (s.k == 4) launch(vec{}, std::integral_constant<int, 4>{});
    else launch(vec{}, none{});
  } else {
    launch(vec{}, none{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fwd(
    const at::Tensor& input_ids, const at::Tensor& token_weight,
    const c10::optional<at::Tensor>& position_ids, const c10::optional<at::Tensor>& position_weight,
    const c10::optional<at::Tensor>& token_type_ids,
    const c10::optional<at::Tensor>& token_type_weight, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, bool sinusoidal, c10::optional<int64_t> padding_idx,
    double scale, double eps, double p) {
  const Inputs in = check_inputs(input_ids, token_weight, position_ids, position_weight,
                                 token_type_ids, token_type_weight, ln_weight, ln_bias, sinusoidal,
                                 padding_idx, scale);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1)");
  TORCH_CHECK(eps > 0.0, "eps must be > 0");
  c10::cuda::CUDAGuard guard(token_weight.device());
  const auto opts = token_weight.options();
  auto out = at::empty({input_ids.size(0), input_ids.size(1), in.hidden}, opts);
  auto mask = p > 0.0 ? at::empty(out.sizes(), opts.dtype(at::kByte)) : at::empty({0}, opts.dtype(at::kByte));
  auto stats = ln_weight.has_value()
                   ? at::empty({input_ids.size(0), input_ids.size(1), 2}, opts.dtype(at::kFloat))
                   : at::empty({0}, opts.dtype(at::kFloat));
  if (in.rows == 0) return {out, mask, stats};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(token_weight.scalar_type(), "embedding_fwd", [&] {
    const auto t = tables_of<scalar_t>(in);
    uint8_t* m = p > 0.0 ? mask.data_ptr<uint8_t>() : nullptr;
    const RowShape s = choose_shape<scalar_t>(
        in.hidden, {t.tok_w, t.pos_w, t.type_w, t.ln_w, t.ln_b, out.data_ptr()}, m);
    DropoutRng rng{};
    if (p > 0.0) {
      const int64_t packs_per_thread = (in.hidden / s.pack + s.tx - 1) / s.tx;
      rng = reserve_dropout_rng(token_weight.device(), packs_per_thread * ((s.pack + 3) / 4 * 4));
    }
    const dim3 block(s.tx, s.ty);
    const int64_t blocks = (in.rows + s.ty - 1) / s.ty;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "embedding_fwd: too many rows");
    with_shape<scalar_t>(s, [&](auto n, auto k) {
      embedding_fwd_kernel<scalar_t, decltype(n)::value, decltype(k)::value>
          <<<static_cast<unsigned>(blocks), block, 0, stream>>>(
              t, static_cast<float>(eps), static_cast<float>(p), rng, out.data_ptr<scalar_t>(), m,
              ln_weight.has_value() ? stats.data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, mask, stats};
}

// The gradient of one table: `grad` is what is returned, `acc` what the kernel adds into.
struct TableGrad {
  at::Tensor grad, acc, slot;
  TableAcc view;
};

TableGrad table_grad(const at::Tensor& weight, const at::Tensor& ids, int64_t rows, int64_t seq_len,
                     c10::optional<int64_t> skip, cudaStream_t stream) {
  TableGrad g;
  const int64_t n = weight.size(0), hidden = weight.size(1);
  const auto f32 = weight.options().dtype(at::kFloat);
  if (weight.scalar_type() == at::kFloat) {
    g.grad = g.acc = at::zeros_like(weight);
  } else if (n <= rows) {
    g.acc = at::zeros({n, hidden}, f32);
  } else {
    g.grad = at::zeros_like(weight);
    g.acc = at::zeros({rows, hidden}, f32);
    g.slot = at::empty({n}, weight.options().dtype(at::kLong));
    const int threads = 256;
    claim_slots_kernel<<<blocks_for(rows, threads), threads, 0, stream>>>(
        index_view(ids), rows, seq_len, n, g.slot.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  g.view = TableAcc{g.acc.data_ptr<float>(), g.slot.defined() ? g.slot.data_ptr<int64_t>() : nullptr,
                    skip.has_value(), skip.value_or(0)};
  return g;
}

at::Tensor finish_table_grad(TableGrad& g, const at::Tensor& weight, const at::Tensor& ids,
                             int64_t rows, int64_t seq_len, cudaStream_t stream) {
  if (!g.slot.defined()) return g.grad.defined() ? g.grad : g.acc.to(weight.scalar_type());
  FP_DISPATCH_FLOAT(weight.scalar_type(), "embedding_bwd", [&] {
    scatter_slots_kernel<scalar_t><<<blocks_for(rows, 1, 32), 128, 0, stream>>>(
        index_view(ids), rows, seq_len, weight.size(1), g.view, g.grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g.grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_bwd(
    const at::Tensor& grad_out, const at::Tensor& mask, const at::Tensor& stats,
    const at::Tensor& input_ids, const at::Tensor& token_weight,
    const c10::optional<at::Tensor>& position_ids, const c10::optional<at::Tensor>& position_weight,
    const c10::optional<at::Tensor>& token_type_ids,
    const c10::optional<at::Tensor>& token_type_weight, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, bool sinusoidal, c10::optional<int64_t> padding_idx,
    c10::optional<int64_t> token_padding_idx, double scale, double p, bool need_token,
    bool need_position, bool need_type, bool need_ln) {
  const Inputs in = check_inputs(input_ids, token_weight, position_ids, position_weight,
                                 token_type_ids, token_type_weight, ln_weight, ln_bias, sinusoidal,
                                 padding_idx, scale);
  FP_CHECK_INPUT(grad_out);
  TORCH_CHECK(grad_out.scalar_type() == token_weight.scalar_type() && grad_out.dim() == 3 &&
                  grad_out.size(0) == input_ids.size(0) && grad_out.size(1) == input_ids.size(1) &&
                  grad_out.size(2) == in.hidden,
              "grad_out must be [batch, seq_len, hidden] with token_weight's dtype");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1)");
  if (p > 0.0) {
    FP_CHECK_INPUT(mask);
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.numel() == grad_out.numel(), "mask must match grad_out");
  }
  if (ln_weight.has_value()) {
    FP_CHECK_INPUT(stats);
    TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 * in.rows, "stats must be [batch, seq_len, 2] fp32");
  }
  need_position = need_position && position_weight.has_value();
  need_type = need_type && token_type_weight.has_value();
  need_ln = need_ln && ln_weight.has_value();
  c10::cuda::CUDAGuard guard(token_weight.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // a fresh empty tensor per absent gradient: the op's outputs must not alias each other
  const auto empty = [&] { return at::empty({0}, token_weight.options()); };
  at::Tensor grad_tok = empty(), grad_pos = empty(), grad_type = empty(), grad_ln_w = empty(),
             grad_ln_b = empty();
  if (in.rows == 0) {
    if (need_token) grad_tok = at::zeros_like(token_weight);
    if (need_position) grad_pos = at::zeros_like(*position_weight);
    if (need_type) grad_type = at::zeros_like(*token_type_weight);
    if (need_ln) grad_ln_w = at::zeros_like(*ln_weight);
    if (need_ln && ln_bias.has_value()) grad_ln_b = at::zeros_like(*ln_bias);
    return {grad_tok, grad_pos, grad_type, grad_ln_w, grad_ln_b};
  }
  if (!need_token && !need_position && !need_type && !need_ln) {
    return {grad_tok, grad_pos, grad_type, grad_ln_w, grad_ln_b};
  }
  TableGrad tok, pos, type;
  if (need_token) tok = table_grad(token_weight, input_ids, in.rows, in.seq_len, token_padding_idx, stream);
  if (need_position) pos = table_grad(*position_weight, *position_ids, in.rows, in.seq_len, padding_idx, stream);
  BlockSums sums;
  sums.ln = need_ln;
  if (need_type) {
    const int64_t type_rows = token_type_weight->size(0);
    if (type_rows * in.hidden * int64_t(sizeof(float)) <= kBlockSumTableBytes) {
      sums.type_rows = static_cast<int>(type_rows);
      grad_type = at::empty_like(*token_type_weight);
    } else {
      type = table_grad(*token_type_weight, *token_type_ids, in.rows, in.seq_len, c10::nullopt, stream);
    }
  }
  sums.rows = (sums.ln ? 2 : 0) + sums.type_rows;
  const size_t smem = size_t(sums.type_rows) * in.hidden * sizeof(float);
  at::Tensor partial;
  int64_t grid = 0;
  FP_DISPATCH_FLOAT(token_weight.scalar_type(), "embedding_bwd", [&] {
    const auto t = tables_of<scalar_t>(in);
    const uint8_t* m = p > 0.0 ? mask.data_ptr<uint8_t>() : nullptr;
    const RowShape s = choose_shape<scalar_t>(
        in.hidden, {t.tok_w, t.pos_w, t.type_w, t.ln_w, t.ln_b, grad_out.data_ptr()}, m);
    with_shape<scalar_t>(s, [&](auto n, auto k) {
      const auto kernel = embedding_bwd_kernel<scalar_t, decltype(n)::value, decltype(k)::value>;
      int per_sm = 0;
      AT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, s.tx * s.ty, smem));
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      grid = std::min<int64_t>((in.rows + s.ty - 1) / s.ty,
                               int64_t(sms) * std::max(1, std::min(per_sm, kBwdMaxBlocksPerSm)));
      if (sums.rows > 0) {
        partial = at::empty({grid, sums.rows, in.hidden}, token_weight.options().dtype(at::kFloat));
        sums.partial = partial.data_ptr<float>();
      }
      kernel<<<static_cast<unsigned>(grid), dim3(s.tx, s.ty), smem, stream>>>(
          t, grad_out.data_ptr<scalar_t>(), m, t.ln_w != nullptr ? stats.data_ptr<float>() : nullptr,
          static_cast<float>(p), tok.view, pos.view, type.view, sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (sums.rows > 0) {
      if (need_ln) {
        grad_ln_w = at::empty_like(*ln_weight);
        if (ln_bias.has_value()) grad_ln_b = at::empty_like(*ln_bias);
      }
      const auto blocks = static_cast<unsigned>((sums.rows * in.hidden + 31) / 32);
      block_sums_reduce_kernel<scalar_t><<<blocks, dim3(32, 16), 0, stream>>>(
          partial.data_ptr<float>(), grid, sums.rows, in.hidden, sums.ln,
          need_ln ? grad_ln_w.data_ptr<scalar_t>() : nullptr,
          need_ln && ln_bias.has_value() ? grad_ln_b.data_ptr<scalar_t>() : nullptr,
          sums.type_rows > 0 ? grad_type.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (need_token) grad_tok = finish_table_grad(tok, token_weight, input_ids, in.rows, in.seq_len, stream);
  if (need_position) grad_pos = finish_table_grad(pos, *position_weight, *position_ids, in.rows, in.seq_len, stream);
  if (need_type && sums.type_rows == 0) {
    grad_type = finish_table_grad(type, *token_type_weight, *token_type_ids, in.rows, in.seq_len, stream);
  }
  return {grad_tok, grad_pos, grad_type, grad_ln_w, grad_ln_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("embedding_fwd(Tensor input_ids, Tensor token_weight, Tensor? position_ids, "
        "Tensor? position_weight, Tensor? token_type_ids, Tensor? token_type_weight, "
        "Tensor? ln_weight, Tensor? ln_bias, bool sinusoidal, int? padding_idx, float scale, "
        "float eps, float p) -> (Tensor, Tensor, Tensor)",
        &embedding_fwd);
  m.def("embedding_bwd(Tensor grad_out, Tensor mask, Tensor stats, Tensor input_ids, "
        "Tensor token_weight, Tensor? position_ids, Tensor? position_weight, "
        "Tensor? token_type_ids, Tensor? token_type_weight, Tensor? ln_weight, Tensor? ln_bias, "
        "bool sinusoidal, int? padding_idx, int? token_padding_idx, float scale, float p, "
        "bool need_token, bool need_position, bool need_type, bool need_ln) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &embedding_bwd);
}

}  // namespace fastpatch
