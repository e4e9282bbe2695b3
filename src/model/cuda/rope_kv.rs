//! Rotary embedding plus the KV-cache append in one launch (`kernels/rope_kv.cu`).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Result, Tensor};
use half::bf16;

use super::{check_bf16, cuda_of, launch, Kernel};

const ROPE_KV: Kernel = Kernel::new(
    "rope_kv_append_bf16",
    "gazelle_rope_kv",
    include_str!(concat!(env!("OUT_DIR"), "/rope_kv.ptx")),
);

/// Rotary embedding on q and k plus the KV-cache append, in one launch.
///
/// q [1, L, H*hd], k/v [1, L, KV*hd] (projection outputs), cos/sin [L, hd/2] for positions
/// `offset..offset+L`; the caches are the preallocated [1, KV, cap, hd] tensors of one layer.
/// Returns the rotated q as [1, H, L, hd]. Rotated k and v are written into the caches at
/// `offset..offset+L` in place.
///
/// The kernel writes the caches through read guards: candle has no public mutable access to two
/// storages at once. That is sound here because the caches belong to one `KvCache` that the
/// caller borrows mutably, and every launch goes on the device's single stream, so earlier reads
/// of the caches are ordered before these writes and later reads after them.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    (heads, kv_heads, hd): (usize, usize, usize),
    offset: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let l = cos.dim(0)?;
    let cap = k_cache.dim(2)?;
    let cache_dims = [1, kv_heads, cap, hd];
    if k_cache.dims() != cache_dims || v_cache.dims() != cache_dims {
        candle_core::bail!("rope_kv_append: caches must be {cache_dims:?}");
    }
    if offset + l > cap || q.elem_count() != l * heads * hd || k.elem_count() != l * kv_heads * hd {
        candle_core::bail!("rope_kv_append: {l} positions at {offset} do not fit ({cap} cached)");
    }
    if !k_cache.is_contiguous() || !v_cache.is_contiguous() || !hd.is_multiple_of(2) || hd > 2048 {
        candle_core::bail!("rope_kv_append: contiguous caches and an even head_dim needed");
    }
    let q_out = Tensor::zeros((1, heads, l, hd), DType::BF16, q.device())?;
    {
        let guards =
            [&q, &k, &v, &cos, &sin, &q_out, k_cache, v_cache].map(|t| t.storage_and_layout());
        let mut views = Vec::with_capacity(8);
        for (g, l) in &guards {
            let s = cuda_of(g, "rope_kv_append")?;
            check_bf16(s, "rope_kv_append")?;
            let start = l.start_offset();
            views.push(
                s.as_cuda_slice::<bf16>()?
                    .slice(start..start + l.shape().elem_count()),
            );
        }
        let dev = &cuda_of(&guards[0].0, "rope_kv_append")?.device;
        let func = ROPE_KV.load(dev)?;
        let mut b = func.builder();
        for view in &views {
            b.arg(view);
        }
        let ints = [l, heads, kv_heads, hd, cap, offset].map(|x| x as i32);
        for i in &ints {
            b.arg(i);
        }
        let cfg = LaunchConfig {
            grid_dim: (l as u32, (heads + kv_heads) as u32, 1),
            block_dim: ((hd / 2).next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&mut b, cfg)?;
    }
    Ok(q_out)
}
