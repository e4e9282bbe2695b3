//! Decode attention (`kernels/decode_attention.cu`): one query position over the whole cache,
//! split over chunks of positions so every SM has work, then a combine pass.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp3, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{check_bf16, launch, slice, Kernel};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
const PARTIAL: Kernel = Kernel::new("decode_attention_partial_bf16", "gazelle_attention", PTX);
const COMBINE: Kernel = Kernel::new("decode_attention_combine_bf16", "gazelle_attention", PTX);

/// The head dimension the decode-attention kernel is compiled for (`HD` in the .cu file).
pub const HEAD_DIM: usize = 128;
/// Query heads per key/value head the attention kernel handles (`MAX_REP`).
pub const MAX_REP: usize = 8;

/// Attention of one query position over the cache: q [1, H, 1, hd], caches [1, KV, cap, hd] with
/// valid positions `start..len` -> [1, H, 1, hd].
struct DecodeAttention {
    start: usize,
    len: usize,
    scale: f32,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "gazelle-decode-attention"
    }

    no_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_bf16(qs, self.name())?;
        let hd = HEAD_DIM;
        let (kv, cap) = match kl.dims() {
            [1, kv, cap, d] if *d == hd => (*kv, *cap),
            d => candle_core::bail!(
                "{}: cache must be [1, KV, cap, {hd}], got {d:?}",
                self.name()
            ),
        };
        let heads = ql.shape().elem_count() / hd;
        let rep = heads / kv.max(1);
        if vl.dims() != kl.dims()
            || heads != rep * kv
            || rep > MAX_REP
            || self.len > cap
            || self.start >= self.len
        {
            candle_core::bail!(
                "{}: bad shapes {ql:?} {kl:?} (len {})",
                self.name(),
                self.len
            );
        }
        let (q, k, v) = (
            slice(qs, ql, "q")?,
            slice(ks, kl, "k")?,
            slice(vs, vl, "v")?,
        );
        let dev = &qs.device;
        // Enough chunks to give every SM work (132 on an H100) but at least 64 positions each.
        let want = (264 / kv).max(1);
        let chunk = self.len.div_ceil(want).max(64).next_multiple_of(32);
        let chunks = self.len.div_ceil(chunk);
        let part_ml = unsafe { dev.alloc::<f32>(heads * chunks * 2)? };
        let part_acc = unsafe { dev.alloc::<f32>(heads * chunks * hd)? };
        let out = unsafe { dev.alloc::<bf16>(heads * hd)? };
        let func = PARTIAL.load(dev)?;
        let mut b = func.builder();
        let ints = [rep, cap, self.start, self.len, chunk].map(|x| x as i32);
        b.arg(&q).arg(&k).arg(&v).arg(&part_ml).arg(&part_acc);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&self.scale);
        let cfg = LaunchConfig {
            grid_dim: (kv as u32, chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
        let func = COMBINE.load(dev)?;
        let mut b = func.builder();
        let chunks32 = chunks as i32;
        b.arg(&part_ml).arg(&part_acc).arg(&out).arg(&chunks32);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, 1, 1),
            block_dim: (hd as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((1, heads, 1, hd)),
        ))
    }
}

/// Softmax(q kᵀ · scale) v over cache positions `start..len`, for one query position.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    start: usize,
    len: usize,
    scale: f64,
) -> Result<Tensor> {
    let op = DecodeAttention {
        start,
        len,
        scale: scale as f32,
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}
