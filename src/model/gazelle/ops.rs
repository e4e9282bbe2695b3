//! The decoder's hot operations, each with two paths: our fused CUDA kernels (`crate::model::cuda`,
//! chosen at run time by `GAZELLE_KERNELS`, bf16 on CUDA only) and stock candle ops for everything
//! else. The decoder calls only these, so the choice, and every `cfg(feature = "cuda")`, lives
//! here.

use candle_core::{Module, Result, Tensor};
use candle_nn::RmsNorm;

use super::kv_cache::KvCache;
use super::linear::Linear;
#[cfg(feature = "cuda")]
use crate::model::cuda;

/// Which fused kernels the decoder uses. From `GAZELLE_KERNELS`: unset or `none` = none (stock
/// candle ops), `all`, or a comma list of `rmsnorm,swiglu,gemv,rope,attention`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Enabled {
    pub(crate) rmsnorm: bool,
    pub(crate) swiglu: bool,
    pub(crate) gemv: bool,
    pub(crate) rope: bool,
    pub(crate) attention: bool,
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

/// `lin(x)`, through our bf16 GEMV kernel for a single CUDA row when `GAZELLE_KERNELS` asks.
pub(super) fn project(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if enabled().gemv
        && cuda::usable(x)
        && lin.weight().dtype() == candle_core::DType::BF16
        && x.elem_count() == x.dim(candle_core::D::Minus1)?
    {
        return cuda::gemv(x, lin.weight());
    }
    lin.forward(x)
}

/// `silu(gate) * up`.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if enabled().swiglu && cuda::usable(gate) {
        return cuda::swiglu(gate, up);
    }
    candle_nn::ops::silu(gate)? * up
}

/// The residual add and the norm after it: `(norm(x + a), x + a)`.
pub(super) fn add_norm(x: &Tensor, a: &Tensor, norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if enabled().rmsnorm && cuda::usable(x) {
        return cuda::rms_norm_residual(x, a, norm.weight(), norm.eps());
    }
    let sum = (x + a)?;
    Ok((norm.forward(&sum)?, sum))
}

/// The head layout of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary embedding of q and k plus the append of k and v to layer `layer` of the cache, in one
/// kernel, when it applies. q, k, v are the projections [1, L, H*hd] / [1, L, KV*hd]; cos/sin
/// [L, hd/2] for positions `cache.len()..`. Returns the rotated q [1, H, L, hd] when the kernel
/// ran (the cache then holds the new keys and values, and its length is the caller's to
/// advance), `None` when the caller must take the stock path.
#[allow(unused_variables)]
pub(super) fn fused_rope_append(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    cache: &KvCache,
    layer: usize,
    h: Heads,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if enabled().rope && cuda::usable(q) {
        let (kc, vc) = cache.layer(layer);
        let shape = (h.heads, h.kv_heads, h.head_dim);
        return cuda::rope_kv_append(q, k, v, cos, sin, kc, vc, shape, cache.len()).map(Some);
    }
    Ok(None)
}

/// Attention of one new position over cache positions `start..total` of layer `layer`, through
/// the decode-attention kernel, when it applies (after [`fused_rope_append`]): q [1, H, 1, hd] ->
/// [1, H, 1, hd]. `None` when the caller must take the matmul path.
#[allow(unused_variables)]
pub(super) fn decode_attention(
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    (start, total): (usize, usize),
    h: Heads,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if q.dim(2)? == 1
        && enabled().attention
        && h.head_dim == cuda::ATTENTION_HEAD_DIM
        && h.heads / h.kv_heads <= cuda::ATTENTION_MAX_REP
    {
        let (kc, vc) = cache.layer(layer);
        let scale = (h.head_dim as f64).powf(-0.5);
        return cuda::decode_attention(q, kc, vc, start, total, scale).map(Some);
    }
    Ok(None)
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
