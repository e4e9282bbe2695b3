//! Launch wrappers for our own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs` with
//! the `cuda` feature). All are bf16-only: they serve the batch-1 decode loop of a bf16 model, and
//! the caller falls back to plain candle ops for anything else (`usable`).
//!
//! Each wrapper is a candle `CustomOp` where the kernel has one output, so candle's stream and
//! allocator handle ordering and lifetimes. The rotary + KV-append kernel writes into two cache
//! tensors at once, which candle's in-place ops (one mutable operand) cannot express; it launches
//! directly on the device's stream (see `rope_kv_append`).
//!
//! Which kernels the decoder uses is chosen at run time by `GAZELLE_KERNELS` (see `Enabled`), so
//! a GPU run can measure each lever on its own against the stock candle path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

/// The PTX of each kernel file, embedded at build time.
mod ptx {
    pub(crate) const RMSNORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"));
    pub(crate) const SWIGLU: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    pub(crate) const GEMV: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
    pub(crate) const ROPE_KV: &str = include_str!(concat!(env!("OUT_DIR"), "/rope_kv.ptx"));
    pub(crate) const ATTENTION: &str =
        include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
}

/// The head dimension the decode-attention kernel is compiled for (`HD` in the .cu file).
pub(crate) const ATTENTION_HEAD_DIM: usize = 128;
/// Query heads per key/value head the attention kernel handles (`MAX_REP`).
pub(crate) const ATTENTION_MAX_REP: usize = 8;

/// Which fused kernels the decoder uses. From `GAZELLE_KERNELS`: unset or `none` = none (stock
/// candle ops), `all`, or a comma list of `rmsnorm,swiglu,gemv,rope,attention`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Enabled {
    pub rmsnorm: bool,
    pub swiglu: bool,
    pub gemv: bool,
    pub rope: bool,
    pub attention: bool,
}

impl Enabled {
    pub(crate) fn from_env() -> Self {
        Self::parse(&std::env::var("GAZELLE_KERNELS").unwrap_or_default())
    }

    pub(crate) fn parse(s: &str) -> Self {
        let mut e = Self::default();
        for name in s.split(',').map(str::trim) {
            match name {
                "all" => {
                    e = Self {
                        rmsnorm: true,
                        swiglu: true,
                        gemv: true,
                        rope: true,
                        attention: true,
                    }
                }
                "rmsnorm" => e.rmsnorm = true,
                "swiglu" => e.swiglu = true,
                "gemv" => e.gemv = true,
                "rope" => e.rope = true,
                "attention" => e.attention = true,
                "" | "none" => {}
                other => tracing::warn!("GAZELLE_KERNELS: unknown kernel `{other}` ignored"),
            }
        }
        e
    }
}

/// `Enabled::from_env`, read once per process.
pub(crate) fn enabled() -> Enabled {
    static ENABLED: std::sync::OnceLock<Enabled> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(Enabled::from_env)
}

/// True when `t` lives on a CUDA device in bf16, the only case these kernels handle.
pub(crate) fn usable(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::BF16
}

fn slice<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, bf16>> {
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

/// Fused `s = x + residual; (rmsnorm(s) * w, s)`: x, residual [.., D], w [D] -> [2, .., D]
/// (index 0 the normed output, 1 the new residual stream).
struct RmsNormResidual {
    eps: f32,
}

impl CustomOp3 for RmsNormResidual {
    fn name(&self) -> &'static str {
        "gazelle-rmsnorm-residual"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gazelle-rmsnorm-residual is CUDA-only")
    }

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
        let func =
            dev.get_or_load_custom_func("rmsnorm_residual_bf16", "gazelle_rmsnorm", ptx::RMSNORM)?;
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
        unsafe { b.launch(cfg) }.w()?;
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(dims),
        ))
    }
}

/// `(rmsnorm(x + residual) * w, x + residual)` for [.., D] bf16 CUDA tensors.
pub(crate) fn rms_norm_residual(
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

/// `silu(gate) * up`, elementwise over same-shaped bf16 tensors.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "gazelle-swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gazelle-swiglu is CUDA-only")
    }

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
        let func = dev.get_or_load_custom_func("swiglu_bf16", "gazelle_swiglu", ptx::SWIGLU)?;
        let mut b = func.builder();
        let n64 = n as u64;
        b.arg(&g).arg(&u).arg(&out).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: ((n / 8).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            gl.shape().clone(),
        ))
    }
}

pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
}

/// `x Wᵀ` for one row x [.., K] (one row in all) and W [N, K]: -> [.., N].
struct Gemv;

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gazelle-gemv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gazelle-gemv is CUDA-only")
    }

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
        let func = dev.get_or_load_custom_func("gemv_bf16", "gazelle_gemv", ptx::GEMV)?;
        let mut b = func.builder();
        let (n32, k32) = (n as i32, k as i32);
        b.arg(&w).arg(&x).arg(&out).arg(&n32).arg(&k32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(dims),
        ))
    }
}

pub(crate) fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Gemv)
}

fn cuda_of<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what}: not a CUDA tensor"),
    }
}

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
pub(crate) fn rope_kv_append(
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
        let func =
            dev.get_or_load_custom_func("rope_kv_append_bf16", "gazelle_rope_kv", ptx::ROPE_KV)?;
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
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(q_out)
}

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

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("gazelle-decode-attention is CUDA-only")
    }

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
        let hd = ATTENTION_HEAD_DIM;
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
            || rep > ATTENTION_MAX_REP
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
        let func = dev.get_or_load_custom_func(
            "decode_attention_partial_bf16",
            "gazelle_attention",
            ptx::ATTENTION,
        )?;
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
        unsafe { b.launch(cfg) }.w()?;
        let func = dev.get_or_load_custom_func(
            "decode_attention_combine_bf16",
            "gazelle_attention",
            ptx::ATTENTION,
        )?;
        let mut b = func.builder();
        let chunks32 = chunks as i32;
        b.arg(&part_ml).arg(&part_acc).arg(&out).arg(&chunks32);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, 1, 1),
            block_dim: (hd as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((1, heads, 1, hd)),
        ))
    }
}

/// Softmax(q kᵀ · scale) v over cache positions `start..len`, for one query position.
pub(crate) fn decode_attention(
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

#[cfg(test)]
mod tests {
    use super::Enabled;

    #[test]
    fn kernel_list_parses() {
        assert_eq!(Enabled::parse(""), Enabled::default());
        let e = Enabled::parse("gemv, attention");
        assert!(e.gemv && e.attention && !e.rmsnorm && !e.rope && !e.swiglu);
        assert!(Enabled::parse("all").rope);
    }
}
