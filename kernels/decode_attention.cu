// Decode attention (one query position) that reads each cached key/value row once (see README.md).
// Flash-decoding: the valid positions are split into chunks; one block per (kv head, chunk)
// handles every query head that shares that kv head (GQA), so K/V are read once, not `rep` times.
#include "common.cuh"

#define HD 128           // head_dim; the wrapper checks it (Llama-2-7B and Mistral-7B)
#define PER_LANE (HD / 32)
#define MAX_REP 8        // query heads per kv head (Mistral-7B: 4, Llama-2-7B: 1)
#define WARPS 4

// q [H, hd] (query heads rep*kv .. rep*kv+rep-1 share kv head kv), caches [KV, cap, hd].
// Valid positions are start..len (start > 0 only under a sliding window). Writes per (query head,
// chunk) the running max m, the sum l and the unnormalised accumulator acc[hd], all f32:
// part_ml [H, chunks, 2], part_acc [H, chunks, hd]. Grid (KV, chunks), block 32 * WARPS.
extern "C" __global__ void __launch_bounds__(32 * WARPS)
    decode_attention_partial_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                  const bf16* __restrict__ v_cache, float* __restrict__ part_ml,
                                  float* __restrict__ part_acc, int rep, int cap, int start,
                                  int len, int chunk, float scale) {
  const int kvh = blockIdx.x, ch = blockIdx.y, chunks = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s0 = max(start, ch * chunk), s1 = min(len, (ch + 1) * chunk);

  float qr[MAX_REP][PER_LANE], acc[MAX_REP][PER_LANE], m[MAX_REP], l[MAX_REP];
#pragma unroll
  for (int r = 0; r < MAX_REP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      acc[r][j] = 0.f;
      qr[r][j] = r < rep ? __bfloat162float(q[size_t(kvh * rep + r) * HD + lane * PER_LANE + j]) *
                               scale
                         : 0.f;
    }
  }
  const bf16* kb = k_cache + size_t(kvh) * cap * HD;
  const bf16* vb = v_cache + size_t(kvh) * cap * HD;
  // Warps take positions round-robin; each lane owns PER_LANE consecutive dims (8-byte loads).
  for (int s = s0 + warp; s < s1; s += WARPS) {
    const uint2 kraw = *reinterpret_cast<const uint2*>(kb + size_t(s) * HD + lane * PER_LANE);
    const uint2 vraw = *reinterpret_cast<const uint2*>(vb + size_t(s) * HD + lane * PER_LANE);
    const bf16* kk = reinterpret_cast<const bf16*>(&kraw);
    const bf16* vv = reinterpret_cast<const bf16*>(&vraw);
    float kf[PER_LANE], vf[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      kf[j] = __bfloat162float(kk[j]);
      vf[j] = __bfloat162float(vv[j]);
    }
#pragma unroll
    for (int r = 0; r < MAX_REP; ++r) {
      if (r >= rep) break;
      float d = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) d = fmaf(qr[r][j], kf[j], d);
      d = warp_sum(d);
      const float mn = fmaxf(m[r], d);
      const float corr = __expf(m[r] - mn);  // exp(-inf) = 0 on the first position
      const float p = __expf(d - mn);
      l[r] = l[r] * corr + p;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) acc[r][j] = fmaf(acc[r][j], corr, p * vf[j]);
      m[r] = mn;
    }
  }
  // Merge the warps' partial softmax states through shared memory.
  __shared__ float sm_ml[WARPS][MAX_REP][2];
  __shared__ float sm_acc[WARPS][MAX_REP][HD];
#pragma unroll
  for (int r = 0; r < MAX_REP; ++r) {
    if (lane == 0) {
      sm_ml[warp][r][0] = m[r];
      sm_ml[warp][r][1] = l[r];
    }
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) sm_acc[warp][r][lane * PER_LANE + j] = acc[r][j];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rep * HD; idx += blockDim.x) {
    const int r = idx / HD, dim = idx % HD;
    float mx = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_ml[w][r][0]);
    float lsum = 0.f, a = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      const float f = sm_ml[w][r][0] == -INFINITY ? 0.f : __expf(sm_ml[w][r][0] - mx);
      lsum += sm_ml[w][r][1] * f;
      a += sm_acc[w][r][dim] * f;
    }
    const size_t h = size_t(kvh) * rep + r;
    part_acc[(h * chunks + ch) * HD + dim] = a;
    if (dim == 0) {
      part_ml[(h * chunks + ch) * 2] = mx;
      part_ml[(h * chunks + ch) * 2 + 1] = lsum;
    }
  }
}

// Combines the chunks: out [H, hd] bf16. Grid H, block HD threads.
extern "C" __global__ void decode_attention_combine_bf16(const float* __restrict__ part_ml,
                                                         const float* __restrict__ part_acc,
                                                         bf16* __restrict__ out, int chunks) {
  const int h = blockIdx.x, dim = threadIdx.x;
  float mx = -INFINITY;
  for (int c = 0; c < chunks; ++c) mx = fmaxf(mx, part_ml[(size_t(h) * chunks + c) * 2]);
  float lsum = 0.f, a = 0.f;
  for (int c = 0; c < chunks; ++c) {
    const float mc = part_ml[(size_t(h) * chunks + c) * 2];
    if (mc == -INFINITY) continue;  // an empty chunk (before the window's start)
    const float f = __expf(mc - mx);
    lsum += part_ml[(size_t(h) * chunks + c) * 2 + 1] * f;
    a += part_acc[(size_t(h) * chunks + c) * HD + dim] * f;
  }
  out[size_t(h) * HD + dim] = __float2bfloat16(a / lsum);
}
