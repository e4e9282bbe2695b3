// Fused residual add + RMSNorm for one row per block (see README.md).
#include "common.cuh"

// rows x d. If `residual` is non-null, s = bf16(x + residual) is the new residual stream and is
// written to `sum_out` (which may alias x); otherwise s = x. out = bf16(s * rsqrt(mean(s^2) + eps)
// * w). The sum is rounded to bf16 before the norm because the unfused decoder rounds there too.
extern "C" __global__ void rmsnorm_residual_bf16(const bf16* __restrict__ x,
                                                 const bf16* __restrict__ residual,
                                                 const bf16* __restrict__ w, bf16* out,
                                                 bf16* sum_out, int d, float eps) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const bf16* xr = x + row * d;
  const bf16* rr = residual ? residual + row * d : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float s = __bfloat162float(xr[i]);
    if (rr) {
      s = round_bf16(s + __bfloat162float(rr[i]));
    }
    ss += s * s;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
  // Second pass re-reads the row: it is in L1/L2 (d <= 8192 bf16 = 16 KB), not DRAM.
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float s = __bfloat162float(xr[i]);
    if (rr) {
      s = round_bf16(s + __bfloat162float(rr[i]));
    }
    out[row * d + i] = __float2bfloat16(s * inv * __bfloat162float(w[i]));
  }
  if (rr && sum_out) {
    __syncthreads();  // every thread has read x before anyone overwrites it (sum_out may alias x)
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      sum_out[row * d + i] = __float2bfloat16(__bfloat162float(xr[i]) + __bfloat162float(rr[i]));
    }
  }
}
