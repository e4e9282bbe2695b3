//! A bias-free linear layer whose weight may be stored in bf16/f16 while the CPU computes in f32.
//!
//! candle 0.11's CPU matmul is ~16x slower in bf16 than in f32 here (0.5 vs 8 tok/s for 4
//! Mistral-7B layers on 2 cores), and f32 weights of a 7B model do not fit in RAM. So on the CPU
//! the decoder keeps half-precision weights and f32 activations: each worker thread converts a
//! block of weight rows to f32 (a ~1 MB buffer that stays in cache) and hands it to the `gemm`
//! crate, the same f32 kernels candle uses (prefill). Decode steps (a few rows) instead widen
//! bf16 in registers inside an AVX2/FMA dot product, reading each weight byte once. The result is
//! closer to f32 than all-bf16 compute. Elsewhere (CUDA, or when
//! weight and compute dtypes agree) this is a plain matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

/// `y = x Wᵀ` for W [out, in].
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    compute: DType,
}

impl Linear {
    /// `compute` is the activation dtype; the weight keeps its own dtype.
    pub(crate) fn new(weight: Tensor, compute: DType) -> Self {
        Self { weight, compute }
    }

    pub(crate) fn load(
        in_dim: usize,
        out_dim: usize,
        compute: DType,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        Ok(Self::new(vb.get((out_dim, in_dim), "weight")?, compute))
    }

    /// The [out, in] weight, for the fused GEMV kernel.
    #[cfg(feature = "cuda")]
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    /// [.., in] -> [.., out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        let half = matches!(w.dtype(), DType::BF16 | DType::F16);
        if !(half && self.compute == DType::F32 && w.device().is_cpu()) {
            let x = x.to_dtype(w.dtype())?;
            return x.broadcast_matmul(&w.t()?)?.to_dtype(self.compute);
        }
        let (out_dim, in_dim) = w.dims2()?;
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / in_dim;
        let x2 = x
            .to_dtype(DType::F32)?
            .reshape((rows, in_dim))?
            .contiguous()?;
        let yt = x2.apply_op2_no_bwd(&w.contiguous()?, &HalfWeightMatMul)?; // [out, rows]
        *dims.last_mut().expect("rank >= 1") = out_dim;
        yt.t()?.contiguous()?.reshape(dims)
    }
}

/// f32 x [rows, in] times half-precision W [out, in], transposed: returns [out, rows] f32.
struct HalfWeightMatMul;

/// Weight rows per work item: about 256 K f32 (1 MB) of converted weight per thread.
fn block_rows(in_dim: usize) -> usize {
    (262_144 / in_dim.max(1)).clamp(4, 256)
}

fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    // bf16 is the top half of an f32: a shift the compiler vectorizes.
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
}

/// At most this many rows (decode steps) take the fused bf16 dot path.
const FUSED_MAX_ROWS: usize = 4;

macro_rules! dot_bf16_body {
    ($w:expr, $x:expr, $fma:expr) => {{
        let (w, x): (&[half::bf16], &[f32]) = ($w, $x);
        let mut acc = [0f32; 16];
        let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
        let (wr, xr) = (wc.remainder(), xc.remainder());
        for (a, b) in wc.zip(xc) {
            for i in 0..16 {
                let wf = f32::from_bits((a[i].to_bits() as u32) << 16);
                acc[i] = if $fma {
                    wf.mul_add(b[i], acc[i])
                } else {
                    acc[i] + wf * b[i]
                };
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (a, b) in wr.iter().zip(xr) {
            sum += f32::from_bits((a.to_bits() as u32) << 16) * b;
        }
        sum
    }};
}

fn dot_bf16_generic(w: &[half::bf16], x: &[f32]) -> f32 {
    dot_bf16_body!(w, x, false)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[half::bf16], x: &[f32]) -> f32 {
    dot_bf16_body!(w, x, true)
}

fn dot_bf16(w: &[half::bf16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { dot_bf16_avx2(w, x) };
    }
    dot_bf16_generic(w, x)
}

/// Few rows (decode): widen in registers inside the dot product, so each weight byte is read
/// once and nothing is written back; this is memory-bound, as decode should be.
fn matvec_bf16(x: &[f32], w: &[half::bf16], rows: usize, in_dim: usize) -> Vec<f32> {
    let out_dim = w.len() / in_dim;
    let mut yt = vec![0f32; out_dim * rows];
    yt.par_chunks_mut(64 * rows)
        .enumerate()
        .for_each(|(b, dst)| {
            for (i, y) in dst.chunks_mut(rows).enumerate() {
                let o = b * 64 + i;
                let wr = &w[o * in_dim..(o + 1) * in_dim];
                for (r, y) in y.iter_mut().enumerate() {
                    *y = dot_bf16(wr, &x[r * in_dim..(r + 1) * in_dim]);
                }
            }
        });
    yt
}

fn matmul_blocks<W: Sync>(
    x: &[f32],
    w: &[W],
    rows: usize,
    in_dim: usize,
    widen: fn(&[W], &mut [f32]),
) -> Vec<f32> {
    let out_dim = w.len() / in_dim;
    let br = block_rows(in_dim);
    let mut yt = vec![0f32; out_dim * rows];
    yt.par_chunks_mut(br * rows).enumerate().for_each_init(
        || vec![0f32; br * in_dim],
        |buf, (b, dst)| {
            let o0 = b * br;
            let n_out = dst.len() / rows;
            let wf = &mut buf[..n_out * in_dim];
            widen(&w[o0 * in_dim..(o0 + n_out) * in_dim], wf);
            // SAFETY: dst is [n_out, rows] row-major, wf is [n_out, in] row-major and x is
            // [rows, in] row-major, read as its transpose [in, rows]; all bounds match.
            unsafe {
                gemm::gemm(
                    n_out,
                    rows,
                    in_dim,
                    dst.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    wf.as_ptr(),
                    1,
                    in_dim as isize,
                    x.as_ptr(),
                    in_dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    yt
}

impl CustomOp2 for HalfWeightMatMul {
    fn name(&self) -> &'static str {
        "half-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = xl.shape().dims2()?;
        let (out_dim, w_in) = wl.shape().dims2()?;
        if w_in != in_dim {
            candle_core::bail!("half-weight-matmul: x has {in_dim} columns, W has {w_in}");
        }
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("half-weight-matmul needs contiguous inputs");
        };
        let CpuStorage::F32(x) = xs else {
            candle_core::bail!("half-weight-matmul: x must be f32")
        };
        let x = &x[xa..xb];
        let yt = match ws {
            CpuStorage::BF16(w) if rows <= FUSED_MAX_ROWS => {
                matvec_bf16(x, &w[wa..wb], rows, in_dim)
            }
            CpuStorage::BF16(w) => matmul_blocks(x, &w[wa..wb], rows, in_dim, widen_bf16),
            CpuStorage::F16(w) => matmul_blocks(x, &w[wa..wb], rows, in_dim, widen_f16),
            _ => candle_core::bail!("half-weight-matmul: W must be bf16 or f16"),
        };
        Ok((CpuStorage::F32(yt), Shape::from((out_dim, rows))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn half_weights_with_f32_compute_match_f32_matmul() {
        let dev = &Device::Cpu;
        for (rows, in_dim, out_dim) in [(1, 64, 10), (5, 300, 77), (2, 4096, 3), (3, 37, 130)] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, in_dim), dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), dev).unwrap();
            for dt in [DType::BF16, DType::F16] {
                let wh = w.to_dtype(dt).unwrap();
                let ours = Linear::new(wh.clone(), DType::F32).forward(&x).unwrap();
                let wf = wh.to_dtype(DType::F32).unwrap();
                let reference = x.broadcast_matmul(&wf.t().unwrap()).unwrap();
                assert_eq!(ours.dims(), &[1, rows, out_dim]);
                let diff: f32 = (ours - reference)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(diff < 1e-3, "{rows}x{in_dim}x{out_dim} {dt:?}: {diff}");
            }
        }
    }
}
