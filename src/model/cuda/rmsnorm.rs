//! Fused residual add + RMSNorm (`kernels/rmsnorm.cu`): one pass over the row instead of an add,
//! a square-mean, a scale and a multiply.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp3, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{check_bf16, launch, slice, Kernel};

const RMSNORM: Kernel = Kernel::new(
    "rmsnorm_residual_bf16",
    "gazelle_rmsnorm",
    include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx")),
);

/// Fused `s = x + residual; (rmsnorm(s) * w, s)`: x, residual [.., D], w [D] -> [2, .., D]
/// (index 0 the normed output, 1 the new residual stream).
struct RmsNormResidual {
    eps: f32,
}

impl CustomOp3 for RmsNormResidual {
    fn name(&self) -> &'static str {
        "gazelle-rmsnorm-residual"
    }

    no_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_bf16(xs, self.name())?;
        let d = *xl.dims().last().unwrap_or(&0);
        if rl.shape() != xl.shape() || wl.dims() != [d] {
            candle_core::bail!("{}: shapes {:?} {:?} {:?}", self.name(), xl, rl, wl);
        }
        let rows = xl.shape().elem_count() / d.max(1);
        let (x, r, w) = (
            slice(xs, xl, "x")?,
            slice(rs, rl, "res")?,
            slice(ws, wl, "w")?,
        );
        let dev = &xs.device;
        let out = unsafe { dev.alloc::<bf16>(2 * rows * d)? }; // every element is written
        let (normed, sum) = (out.slice(0..rows * d), out.slice(rows * d..));
        let func = RMSNORM.load(dev)?;
        let mut b = func.builder();
        let (d32, eps) = (d as i32, self.eps);
        b.arg(&x)
            .arg(&r)
            .arg(&w)
            .arg(&normed)
            .arg(&sum)
            .arg(&d32)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (d.clamp(32, 1024).next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(dims),
        ))
    }
}

/// `(rmsnorm(x + residual) * w, x + residual)` for [.., D] bf16 CUDA tensors.
pub fn rms_norm_residual(
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let out = x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        w,
        &RmsNormResidual { eps: eps as f32 },
    )?;
    Ok((out.get(0)?, out.get(1)?))
}
