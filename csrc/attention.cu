// Attention glue around SDPA: head split/merge and the static KV-cache append.
//
//   split:  packed[b, l, c*H + h*d + j] (+ bias[c*H + h*d + j])  ->  heads[c, b, h, l, j]
//   merge:  heads[c, b, h, l, j]  ->  packed[b, l, c*H + h*d + j]        (split's backward)
//   append: cache[b, h, positions[b] + t, j] = new[b, h, t, j]
//
// All three are pure data movement (plus a bias add), so they are written for coalescing:
// split/merge walk the packed row in order (fully coalesced on that side) and touch the head
// side in runs of head_dim contiguous elements. The head side may have any chunk/batch/head/
// sequence strides (SDPA's outputs and gradients are often transposed views); only the last dim
// must be dense. 16-byte packs are used when head_dim, every stride and every base pointer allow it;
// otherwise a scalar path runs. Nothing here syncs with the host, so all of it graph-captures.
#include "common.cuh"

#include <climits>

namespace fastpatch {
namespace {

// The head side of a split/merge: [C, B, heads, L, d] with a dense last dim; strides in elements.
template <typename scalar_t>
struct HeadLayout {
  scalar_t* ptr;
  int64_t stride_c, stride_b, stride_h, stride_l;
};

template <typename scalar_t>
HeadLayout<scalar_t> head_layout(const at::Tensor& t) {
  return HeadLayout<scalar_t>{t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Block = (threads along the packed row, rows); each thread moves packs of N elements.
// A pack never straddles two heads because head_dim % N == 0 whenever N > 1.
template <typename scalar_t, int N, bool kSplit>
__global__ void permute_heads_kernel(scalar_t* packed, const scalar_t* __restrict__ bias,
                                     HeadLayout<scalar_t> heads, int64_t rows, int64_t seq_len,
                                     int row_width, int hidden, int head_dim) {
  const int64_t row = blockIdx.x * int64_t(blockDim.y) + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / seq_len, l = row - b * seq_len;
  scalar_t* packed_row = packed + row * row_width;
  scalar_t* head_row = heads.ptr + b * heads.stride_b + l * heads.stride_l;
  for (int col = threadIdx.x * N; col < row_width; col += blockDim.x * N) {
    const int c = col / hidden;
    const int within = col - c * hidden;
    const int h = within / head_dim;
    const int j = within - h * head_dim;
    scalar_t* head = head_row + c * heads.stride_c + h * heads.stride_h + j;
    if constexpr (kSplit) {
      auto v = load_pack<scalar_t, N>(packed_row + col);
      if (bias != nullptr) {
        const auto bv = load_pack<scalar_t, N>(bias + col);
#pragma unroll
        for (int i = 0; i < N; ++i)
          v.v[i] = static_cast<scalar_t>(static_cast<float>(v.v[i]) + static_cast<float>(bv.v[i]));
      }
      store_pack<scalar_t, N>(head, v);
    } else {
      store_pack<scalar_t, N>(packed_row + col, load_pack<scalar_t, N>(head));
    }
  }
}

template <typename scalar_t>
bool heads_vectorizable(const HeadLayout<scalar_t>& heads, int head_dim, const void* packed,
                        const void* bias) {
  constexpr int N = pack_size<scalar_t>();
  return head_dim % N == 0 && is_aligned(heads.ptr, 16) && heads.stride_c % N == 0 &&
         heads.stride_b % N == 0 && heads.stride_h % N == 0 && heads.stride_l % N == 0 &&
         is_aligned(packed, 16) && (bias == nullptr || is_aligned(bias, 16));
}

template <typename scalar_t, bool kSplit>
void launch_permute(scalar_t* packed, const scalar_t* bias, const HeadLayout<scalar_t>& heads,
                    int chunks, int64_t rows, int64_t seq_len, int hidden, int head_dim) {
  const int row_width = chunks * hidden;
  const bool vec = heads_vectorizable(heads, head_dim, packed, bias);
  const int packs = row_width / (vec ? pack_size<scalar_t>() : 1);
  // Enough threads along x to cover a row in one sweep (up to 256); the rest of the block
  // takes further rows, so narrow rows (one small head) still fill the block.
  constexpr int kThreads = 256;
  int tx = 32;
  while (tx < packs && tx < kThreads) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks <= INT_MAX, "attention head permute: too many rows (", rows, ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    permute_heads_kernel<scalar_t, pack_size<scalar_t>(), kSplit>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(packed, bias, heads, rows, seq_len,
                                                                row_width, hidden, head_dim);
  } else {
    permute_heads_kernel<scalar_t, 1, kSplit><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        packed, bias, heads, rows, seq_len, row_width, hidden, head_dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [B, L, C*H] (+ bias) -> contiguous [C, B, heads, L, d].
at::Tensor attn_split_heads(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                            int64_t num_heads, int64_t num_chunks) {
  FP_CHECK_INPUT(qkv);
  TORCH_CHECK(qkv.dim() == 3, "qkv must be [B, L, num_chunks * H]");
  const int64_t batch = qkv.size(0), seq_len = qkv.size(1), width = qkv.size(2);
  TORCH_CHECK(width <= INT_MAX, "qkv's last dim is too large");
  TORCH_CHECK(num_chunks > 0 && num_heads > 0 && width % num_chunks == 0 &&
                  (width / num_chunks) % num_heads == 0,
              "num_heads and num_chunks must divide qkv's last dim");
  if (bias.has_value()) {
    FP_CHECK_INPUT(*bias);
    TORCH_CHECK(bias->numel() == width && bias->scalar_type() == qkv.scalar_type(),
                "bias must be [num_chunks * H] with qkv's dtype");
  }
  const int hidden = static_cast<int>(width / num_chunks);
  const int head_dim = hidden / static_cast<int>(num_heads);
  c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({num_chunks, batch, num_heads, seq_len, head_dim}, qkv.options());
  if (out.numel() == 0) return out;
  FP_DISPATCH_FLOAT(qkv.scalar_type(), "attn_split_heads", [&] {
    launch_permute<scalar_t, true>(qkv.data_ptr<scalar_t>(),
                                   bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                   head_layout<scalar_t>(out), static_cast<int>(num_chunks),
                                   batch * seq_len, seq_len, hidden, head_dim);
  });
  return out;
}

// [C, B, heads, L, d] (any strides, dense last dim) -> contiguous [B, L, C*heads*d].
at::Tensor attn_merge_heads(const at::Tensor& x) {
  FP_CHECK_CUDA(x);
  TORCH_CHECK(x.dim() == 5, "merge_heads: x must be [C, B, heads, L, d]");
  TORCH_CHECK(x.stride(4) == 1 || x.size(4) == 1, "merge_heads: x must be dense in its last dim");
  const int64_t chunks = x.size(0), batch = x.size(1), num_heads = x.size(2), seq_len = x.size(3),
                head_dim = x.size(4);
  TORCH_CHECK(chunks * num_heads * head_dim <= INT_MAX, "merge_heads: rows are too wide");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({batch, seq_len, chunks * num_heads * head_dim}, x.options());
  if (out.numel() == 0) return out;
  FP_DISPATCH_FLOAT(x.scalar_type(), "attn_merge_heads", [&] {
    launch_permute<scalar_t, false>(out.data_ptr<scalar_t>(), nullptr, head_layout<scalar_t>(x),
                                    static_cast<int>(chunks), batch * seq_len, seq_len,
                                    static_cast<int>(num_heads * head_dim), static_cast<int>(head_dim));
  });
  return out;
}

// ------------------------------------------------------------------------------- KV cache
// One of the two writes of an append (keys or values): new [B, h, n, d] into cache
// [B, h, S_max, d], both strided with a dense last dim.
template <typename scalar_t>
struct CacheWrite {
  scalar_t* cache;
  const scalar_t* src;
  int64_t cache_b, cache_h, cache_s;
  int64_t src_b, src_h, src_n;
  int64_t head_dim;
};

// blockIdx.y picks keys (0) or values (1); a grid-stride loop walks packs of N elements of
// the new tokens in [b, h, t, j] order. Slots outside [0, S_max) are skipped: validating
// positions would need a host sync, which CUDA graphs forbid.
template <typename scalar_t, int N>
__global__ void kv_cache_append_kernel(CacheWrite<scalar_t> keys, CacheWrite<scalar_t> values,
                                       const int64_t* __restrict__ positions, int64_t position_stride,
                                       int64_t batch, int64_t num_heads, int64_t new_tokens,
                                       int64_t max_len) {
  const CacheWrite<scalar_t> w = blockIdx.y == 0 ? keys : values;
  const int64_t packs_per_token = w.head_dim / N;
  const int64_t total = batch * num_heads * new_tokens * packs_per_token;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = (i % packs_per_token) * N;
    int64_t rest = i / packs_per_token;
    const int64_t t = rest % new_tokens;
    rest /= new_tokens;
    const int64_t h = rest % num_heads;
    const int64_t b = rest / num_heads;
    const int64_t slot = positions[b * position_stride] + t;
    if (slot < 0 || slot >= max_len) continue;
    const auto v = load_pack<scalar_t, N>(w.src + b * w.src_b + h * w.src_h + t * w.src_n + j);
    store_pack<scalar_t, N>(w.cache + b * w.cache_b + h * w.cache_h + slot * w.cache_s + j, v);
  }
}

template <typename scalar_t>
CacheWrite<scalar_t> cache_write(at::Tensor& cache, const at::Tensor& src) {
  return CacheWrite<scalar_t>{cache.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(),
                              cache.stride(0), cache.stride(1), cache.stride(2),
                              src.stride(0), src.stride(1), src.stride(2), cache.size(3)};
}

template <typename scalar_t>
bool cache_write_vectorizable(const CacheWrite<scalar_t>& w) {
  constexpr int N = pack_size<scalar_t>();
  return w.head_dim % N == 0 && is_aligned(w.cache, 16) && is_aligned(w.src, 16) &&
         w.cache_b % N == 0 && w.cache_h % N == 0 && w.cache_s % N == 0 && w.src_b % N == 0 &&
         w.src_h % N == 0 && w.src_n % N == 0;
}

void check_cache_pair(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& cache_k,
                      const at::Tensor& k, const char* name) {
  FP_CHECK_CUDA(cache);
  FP_CHECK_CUDA(src);
  TORCH_CHECK(cache.dim() == 4 && src.dim() == 4, name, ": cache and new entries must be 4-D");
  TORCH_CHECK(cache.device() == cache_k.device() && src.device() == cache_k.device(),
              name, ": all tensors must be on one device");
  TORCH_CHECK(src.scalar_type() == cache.scalar_type(), name, ": new entries must have the cache's dtype");
  TORCH_CHECK(cache.size(0) == cache_k.size(0) && cache.size(1) == cache_k.size(1) &&
                  cache.size(2) == cache_k.size(2),
              name, ": cache must be [B, heads, S_max, d] like cache_k");
  TORCH_CHECK(src.size(0) == cache.size(0) && src.size(1) == cache.size(1) && src.size(2) == k.size(2) &&
                  src.size(3) == cache.size(3),
              name, ": new entries must be [B, heads, n, d] matching the cache");
  TORCH_CHECK(cache.stride(3) == 1 && src.stride(3) == 1, name, ": last dims must be dense");
}

void attn_kv_cache_append(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& positions) {
  check_cache_pair(cache_k, k, cache_k, k, "keys");
  check_cache_pair(cache_v, v, cache_k, k, "values");
  FP_CHECK_CUDA(positions);
  TORCH_CHECK(positions.device() == cache_k.device(), "positions must be on the cache's device");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  (positions.size(0) == 1 || positions.size(0) == cache_k.size(0)),
              "positions must be int64 [B] or [1]");
  TORCH_CHECK(cache_k.scalar_type() == cache_v.scalar_type(),
              "keys and values caches must share a dtype");
  const int64_t batch = cache_k.size(0), num_heads = cache_k.size(1), max_len = cache_k.size(2),
                new_tokens = k.size(2);
  if (batch == 0 || num_heads == 0 || new_tokens == 0) return;
  const int64_t position_stride = positions.size(0) == 1 ? 0 : positions.stride(0);
  c10::cuda::CUDAGuard guard(cache_k.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  FP_DISPATCH_FLOAT(cache_k.scalar_type(), "attn_kv_cache_append", [&] {
    const auto keys = cache_write<scalar_t>(cache_k, k);
    const auto values = cache_write<scalar_t>(cache_v, v);
    const bool vec = cache_write_vectorizable(keys) && cache_write_vectorizable(values);
    const int width = vec ? pack_size<scalar_t>() : 1;
    const int64_t widest = std::max(keys.head_dim, values.head_dim);
    const int64_t packs = batch * num_heads * new_tokens * ((widest + width - 1) / width);
    constexpr int threads = 256;
    const dim3 grid(blocks_for(packs, threads), 2);
    if (vec) {
      kv_cache_append_kernel<scalar_t, pack_size<scalar_t>()><<<grid, threads, 0, stream>>>(
          keys, values, positions.data_ptr<int64_t>(), position_stride, batch, num_heads,
          new_tokens, max_len);
    } else {
      kv_cache_append_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(
          keys, values, positions.data_ptr<int64_t>(), position_stride, batch, num_heads,
          new_tokens, max_len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpatch_cuda, m) {
  m.def("attn_split_heads(Tensor qkv, Tensor? bias, int num_heads, int num_chunks) -> Tensor",
        &attn_split_heads);
  m.def("attn_merge_heads(Tensor x) -> Tensor", &attn_merge_heads);
  m.def("attn_kv_cache_append(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k, Tensor v, "
        "Tensor positions) -> ()",
        &attn_kv_cache_append);
}

}  // namespace fastpatch
