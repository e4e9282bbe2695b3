// bf16 GEMV for M = 1 decode: y = W x with W in nn.Linear layout [N, K] (see README.md).
#include "common.cuh"

// One warp per output row, 8 rows per 256-thread block. K % 8 == 0, W and x 16-byte aligned.
// Each lane streams 16-byte chunks of its row with four loads in flight; f32 accumulation.
extern "C" __global__ void __launch_bounds__(256) gemv_bf16(const bf16* __restrict__ w,
                                                           const bf16* __restrict__ x,
                                                           bf16* __restrict__ y, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= n) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + size_t(row) * k);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const int chunks = k / 8;
  float acc = 0.f;
  int c = lane;
  for (; c + 96 < chunks; c += 128) {
    uint4 a[4], b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      a[u] = __ldcs(wr + c + 32 * u);  // weights are streamed once: keep them out of L1/L2
      b[u] = __ldg(xv + c + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const __nv_bfloat162* wa = reinterpret_cast<const __nv_bfloat162*>(&a[u]);
      const __nv_bfloat162* xb = reinterpret_cast<const __nv_bfloat162*>(&b[u]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 wf = __bfloat1622float2(wa[j]);
        const float2 xf = __bfloat1622float2(xb[j]);
        acc = fmaf(wf.x, xf.x, acc);
        acc = fmaf(wf.y, xf.y, acc);
      }
    }
  }
  for (; c < chunks; c += 32) {
    const uint4 a = __ldcs(wr + c);
    const uint4 b = __ldg(xv + c);
    const __nv_bfloat162* wa = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* xb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 wf = __bfloat1622float2(wa[j]);
      const float2 xf = __bfloat1622float2(xb[j]);
      acc = fmaf(wf.x, xf.x, acc);
      acc = fmaf(wf.y, xf.y, acc);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) y[row] = __float2bfloat16(acc);
}
