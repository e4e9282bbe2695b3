// Fused rotary embedding + KV-cache append, in place into the preallocated cache (see README.md).
#include "common.cuh"

// q [L, H, hd], k/v [L, KV, hd] (the projections' natural token-major layout), cos/sin [L, hd/2].
// Writes q_out [H, L, hd] (head-major, ready for attention) and, for positions offset..offset+L,
// k_cache/v_cache [KV, cap, hd] with k rotated. Rotary is transformers' rotate_half form
// (non-interleaved): out1 = x1 c - x2 s, out2 = x2 c + x1 s with x1 = x[:hd/2], x2 = x[hd/2:].
// Grid (L, H + KV), block hd/2 threads.
extern "C" __global__ void rope_kv_append_bf16(const bf16* __restrict__ q,
                                               const bf16* __restrict__ k,
                                               const bf16* __restrict__ v,
                                               const bf16* __restrict__ cos,
                                               const bf16* __restrict__ sin, bf16* q_out,
                                               bf16* k_cache, bf16* v_cache, int L, int H, int KV,
                                               int hd, int cap, int offset) {
  const int t = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = hd / 2;
  if (i >= half) return;
  const float c = __bfloat162float(cos[t * half + i]);
  const float s = __bfloat162float(sin[t * half + i]);
  const bf16* src;
  bf16* dst;
  if (head < H) {
    src = q + (size_t(t) * H + head) * hd;
    dst = q_out + (size_t(head) * L + t) * hd;
  } else {
    const int kh = head - H;
    src = k + (size_t(t) * KV + kh) * hd;
    const size_t at = (size_t(kh) * cap + offset + t) * hd;
    dst = k_cache + at;
    const bf16* vs = v + (size_t(t) * KV + kh) * hd;
    v_cache[at + i] = vs[i];
    v_cache[at + i + half] = vs[i + half];
  }
  const float x1 = __bfloat162float(src[i]), x2 = __bfloat162float(src[i + half]);
  // Each product is rounded like the bf16 reference (x * cos + rotate_half(x) * sin).
  dst[i] = __float2bfloat16(round_bf16(x1 * c) - round_bf16(x2 * s));
  dst[i + half] = __float2bfloat16(round_bf16(x2 * c) + round_bf16(x1 * s));
}
