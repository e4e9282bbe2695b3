//! Our own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs` with the `cuda` feature),
//! one file each, with what they share here: the kernel handle that loads a function from its
//! embedded PTX, the launch, the views of candle's storage, and the CPU stub of every op. All are
//! bf16-only: they serve the decode loop of a bf16 model, and the decoder's `ops` layer falls
//! back to stock candle ops for anything else (see [`usable`]).
//!
//! Ops with one output are candle `CustomOp`s, so candle's stream and allocator order them and
//! keep their buffers alive. The rotary + KV-append kernel writes into two cache tensors at once,
//! which candle's in-place ops (one mutable operand) cannot express; it launches directly on the
//! device's stream (see `rope_kv`).

/// The CPU side of a custom op over two or three tensors: there is none (`cuda_only`).
macro_rules! no_cpu_fwd {
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            super::cuda_only(self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            super::cuda_only(self.name())
        }
    };
}

mod attention;
mod gemv;
mod rmsnorm;
mod rope_kv;
mod swiglu;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Storage, Tensor};
use half::bf16;

pub use attention::{
    decode_attention, HEAD_DIM as ATTENTION_HEAD_DIM, MAX_REP as ATTENTION_MAX_REP,
};
pub use gemv::gemv;
pub use rmsnorm::rms_norm_residual;
pub use rope_kv::rope_kv_append;
pub use swiglu::swiglu;

/// One kernel: its function, and the module (embedded PTX) that holds it.
struct Kernel {
    func: &'static str,
    module: &'static str,
    ptx: &'static str,
}

impl Kernel {
    const fn new(func: &'static str, module: &'static str, ptx: &'static str) -> Self {
        Kernel { func, module, ptx }
    }

    /// The function on `dev`, its module loaded on first use.
    fn load(&self, dev: &CudaDevice) -> Result<Loaded> {
        let func = dev
            .get_or_load_custom_func(self.func, self.module, self.ptx)?
            .into_cuda_function();
        Ok(Loaded {
            func,
            stream: dev.cuda_stream(),
        })
    }
}

/// A kernel function ready to launch on the device's stream (candle's, so it is ordered with
/// candle's own work).
struct Loaded {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Loaded {
    /// A launch of it, to push the arguments into.
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Launches a prepared kernel call on the device's stream.
fn launch(args: &mut LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every caller passes the argument list its kernel declares, with buffers sized by
    // the shapes it checked, and launches on candle's stream, which orders it with the ops that
    // made and will read those buffers.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// The CPU side of every op: there is none.
fn cuda_only<T>(name: &str) -> Result<T> {
    candle_core::bail!("{name} is CUDA-only")
}

/// True when `t` lives on a CUDA device in bf16, the only case these kernels handle.
pub fn usable(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::BF16
}

/// The contiguous bf16 elements of a storage under a layout.
fn slice<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, bf16>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the fused kernels need a contiguous input");
    };
    Ok(s.as_cuda_slice::<bf16>()?.slice(start..end))
}

fn check_bf16(s: &CudaStorage, what: &str) -> Result<()> {
    if s.dtype() != DType::BF16 {
        candle_core::bail!(
            "{what}: the fused kernels are bf16-only, got {:?}",
            s.dtype()
        );
    }
    Ok(())
}

fn cuda_of<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what}: not a CUDA tensor"),
    }
}
