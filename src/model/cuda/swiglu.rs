//! Fused SwiGLU (`kernels/swiglu.cu`): `silu(gate) * up` in one elementwise pass, 16-byte vectors.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{check_bf16, launch, slice, Kernel};

const SWIGLU: Kernel = Kernel::new(
    "swiglu_bf16",
    "gazelle_swiglu",
    include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
);

/// `silu(gate) * up`, elementwise over same-shaped bf16 tensors.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "gazelle-swiglu"
    }

    no_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_bf16(gs, self.name())?;
        let n = gl.shape().elem_count();
        // 16-byte vectors: the element count and both starts must be multiples of 8.
        if gl.shape() != ul.shape()
            || !n.is_multiple_of(8)
            || !gl.start_offset().is_multiple_of(8)
            || !ul.start_offset().is_multiple_of(8)
        {
            candle_core::bail!(
                "{}: needs equal shapes and multiples of 8, got {gl:?} {ul:?}",
                self.name()
            );
        }
        let (g, u) = (slice(gs, gl, "gate")?, slice(us, ul, "up")?);
        let dev = &gs.device;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let func = SWIGLU.load(dev)?;
        let mut b = func.builder();
        let n64 = n as u64;
        b.arg(&g).arg(&u).arg(&out).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: ((n / 8).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            gl.shape().clone(),
        ))
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
}
