//! bf16 GEMV for a single decode row (`kernels/gemv.cu`): every weight read once, one warp per
//! eight output rows.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{check_bf16, launch, slice, Kernel};

const GEMV: Kernel = Kernel::new(
    "gemv_bf16",
    "gazelle_gemv",
    include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx")),
);

/// `x Wᵀ` for one row x [.., K] (one row in all) and W [N, K]: -> [.., N].
struct Gemv;

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gazelle-gemv"
    }

    no_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_bf16(xs, self.name())?;
        let (n, k) = match wl.dims() {
            [n, k] => (*n, *k),
            d => candle_core::bail!("{}: weight must be [N, K], got {d:?}", self.name()),
        };
        if xl.shape().elem_count() != k
            || !k.is_multiple_of(8)
            || !xl.start_offset().is_multiple_of(8)
            || !wl.start_offset().is_multiple_of(8)
        {
            candle_core::bail!(
                "{}: needs one row of K = {k} (a multiple of 8), got {xl:?}",
                self.name()
            );
        }
        let (x, w) = (slice(xs, xl, "x")?, slice(ws, wl, "w")?);
        let dev = &xs.device;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let func = GEMV.load(dev)?;
        let mut b = func.builder();
        let (n32, k32) = (n as i32, k as i32);
        b.arg(&w).arg(&x).arg(&out).arg(&n32).arg(&k32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(dims),
        ))
    }
}

pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Gemv)
}
