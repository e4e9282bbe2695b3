// Fused SwiGLU for the decoder MLP: out = silu(gate) * up (see README.md).
#include "common.cuh"

// n elements, n % 8 == 0, all pointers 16-byte aligned. silu is rounded to bf16 before the
// product, matching `act_fn(gate_proj(x)) * up_proj(x)` in bf16.
extern "C" __global__ void swiglu_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                       bf16* __restrict__ out, size_t n) {
  const size_t i = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  uint4 g4 = *reinterpret_cast<const uint4*>(gate + i);
  uint4 u4 = *reinterpret_cast<const uint4*>(up + i);
  const bf16* g = reinterpret_cast<const bf16*>(&g4);
  const bf16* u = reinterpret_cast<const bf16*>(&u4);
  uint4 o4;
  bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float gv = __bfloat162float(g[j]);
    const float s = round_bf16(gv / (1.f + __expf(-gv)));
    o[j] = __float2bfloat16(s * __bfloat162float(u[j]));
  }
  *reinterpret_cast<uint4*>(out + i) = o4;
}
