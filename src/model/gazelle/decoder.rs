//! The language model: a Llama-2 / Mistral decoder (Touvron et al. 2023, arXiv:2307.09288;
//! Jiang et al. 2023, arXiv:2310.06825), following transformers' `modeling_llama.py` and
//! `modeling_mistral.py`. We own it rather than reuse candle-transformers' because the KV cache
//! must outlive a single generation (one cache per call, across turns) and be truncated on
//! barge-in, and because the CUDA hot loop will be ours.
//!
//! The cache is preallocated per layer and written in place (`slice_set`); attention reads a
//! narrowed view, so a decode step never concatenates the whole history. Grouped-query attention
//! folds the query heads that share a key/value head into the row dimension of one matmul, so
//! keys and values are never repeated either.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::linear::Linear;

#[cfg(feature = "cuda")]
use super::kernels;

use super::config::TextConfig;
use super::wav2vec2::softmax_f32;

/// Per-call key/value cache for every layer, preallocated and grown by doubling.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer (k, v), each [1, KV, capacity, hd]; only the first `len` positions are valid.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions before it has to grow.
    pub(crate) fn new(
        cfg: &TextConfig,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let capacity = capacity.clamp(1, cfg.max_position_embeddings.max(1));
        let shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            max_len: cfg.max_position_embeddings,
        })
    }

    /// Number of valid positions (the next token's position id).
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most positions it can ever hold (`max_position_embeddings`, or a lower limit).
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// Caps the positions it may hold below `max_position_embeddings`, bounding its memory.
    pub(crate) fn limit(&mut self, max_len: usize) {
        self.max_len = self.max_len.min(max_len.max(1));
    }

    /// Forgets every position from `len` on (barge-in, or a re-prefill from a common prefix).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            candle_core::bail!(
                "sequence of {needed} positions exceeds the context limit of {}",
                self.max_len
            );
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed.max(self.capacity * 2).min(self.max_len);
        for (k, v) in self.layers.iter_mut() {
            let shape = (1, self.kv_heads, capacity, self.head_dim);
            let (nk, nv) = (
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            );
            if self.len > 0 {
                nk.slice_set(&k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            (*k, *v) = (nk, nv);
        }
        self.capacity = capacity;
        Ok(())
    }

    /// One layer's whole preallocated (k, v), for kernels that write or read it directly.
    #[cfg(feature = "cuda")]
    fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Writes [1, KV, L, hd] keys/values at `self.len` and returns views of all valid positions.
    fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = &self.layers[layer];
        let total = self.len + k.dim(2)?;
        ck.slice_set(k, 2, self.len)?;
        cv.slice_set(v, 2, self.len)?;
        Ok((ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?))
    }
}

/// Rotary position embedding tables for a run of positions.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// cos/sin [L, hd/2] for positions `offset..offset+len`, computed in f32 like transformers.
    fn new(
        cfg: &TextConfig,
        offset: usize,
        len: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), dev)?;
        let pos: Vec<f32> = (offset..offset + len).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (len, 1), dev)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// [1, h, L, hd] -> [1, h, L, hd]
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
    }
}

/// Additive mask [L, S] for L new queries at `offset` over S = offset + L keys: causal, and
/// limited to the sliding window when there is one. `None` when nothing is masked.
fn attention_mask(
    offset: usize,
    len: usize,
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let total = offset + len;
    let windowed = window.is_some_and(|w| total > w);
    if len == 1 && !windowed {
        return Ok(None);
    }
    let mut mask = vec![0f32; len * total];
    for i in 0..len {
        let q = offset + i;
        for j in 0..total {
            let future = j > q;
            let too_old = window.is_some_and(|w| q >= j + w);
            if future || too_old {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(
        Tensor::from_vec(mask, (len, total), dev)?.to_dtype(dtype)?,
    ))
}

/// `lin(x)`, through our bf16 GEMV kernel for a single CUDA row when `GAZELLE_KERNELS` asks.
fn project(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels::enabled().gemv
        && kernels::usable(x)
        && lin.weight().dtype() == DType::BF16
        && x.elem_count() == x.dim(candle_core::D::Minus1)?
    {
        return kernels::gemv(x, lin.weight());
    }
    lin.forward(x)
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Mistral's sliding window, for the decode-attention kernel's first visible position.
    #[cfg(feature = "cuda")]
    window: Option<usize>,
}

impl Attention {
    fn load(cfg: &TextConfig, vb: VarBuilder, dt: DType) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if nh % nkv != 0 {
            candle_core::bail!("{nh} attention heads do not divide into {nkv} key/value heads");
        }
        Ok(Self {
            q_proj: Linear::load(h, nh * hd, dt, vb.pp("q_proj"))?,
            k_proj: Linear::load(h, nkv * hd, dt, vb.pp("k_proj"))?,
            v_proj: Linear::load(h, nkv * hd, dt, vb.pp("v_proj"))?,
            o_proj: Linear::load(nh * hd, h, dt, vb.pp("o_proj"))?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            #[cfg(feature = "cuda")]
            window: cfg.sliding_window,
        })
    }

    /// [1, L, D] -> [1, L, D], writing this step's keys/values into `cache` at its length.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = self.head_dim;
        let (q, k, v) = (
            project(&self.q_proj, x)?,
            project(&self.k_proj, x)?,
            project(&self.v_proj, x)?,
        );
        #[cfg(feature = "cuda")]
        if kernels::enabled().rope && kernels::usable(x) {
            return self.forward_fused(q, k, v, rope, mask, cache, layer);
        }
        let q = q.reshape((b, l, self.heads, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, l, self.kv_heads, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, l, self.kv_heads, hd))?.transpose(1, 2)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (k, v) = cache.write(layer, &k, &v.contiguous()?)?;
        self.attend(&q, &k, &v, mask)
    }

    /// Rotary + cache append in one kernel, then our decode-attention kernel for a single
    /// position (head_dim 128) or the matmul attention over the cache views otherwise.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = q.dims3()?;
        let (offset, total) = (cache.len, cache.len + l);
        let (kc, vc) = cache.layer(layer);
        let shape = (self.heads, self.kv_heads, self.head_dim);
        let q = kernels::rope_kv_append(&q, &k, &v, &rope.cos, &rope.sin, kc, vc, shape, offset)?;
        let rep = self.heads / self.kv_heads;
        if l == 1
            && kernels::enabled().attention
            && self.head_dim == kernels::ATTENTION_HEAD_DIM
            && rep <= kernels::ATTENTION_MAX_REP
        {
            let start = self.window.map_or(0, |w| total.saturating_sub(w));
            let scale = (self.head_dim as f64).powf(-0.5);
            let y = kernels::decode_attention(&q, kc, vc, start, total, scale)?;
            return project(
                &self.o_proj,
                &y.reshape((b, l, self.heads * self.head_dim))?,
            );
        }
        let (k, v) = (kc.narrow(2, 0, total)?, vc.narrow(2, 0, total)?);
        self.attend(&q, &k, &v, mask)
    }

    /// q [1, H, L, hd] over the valid cache k, v [1, KV, S, hd] -> o_proj output [1, L, D].
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, l, hd) = q.dims4()?;
        let s = k.dim(2)?;
        let rep = self.heads / self.kv_heads;
        // Query heads kv*rep..kv*rep+rep share key/value head kv: fold them into rows.
        let q = q.reshape((b, self.kv_heads, rep * l, hd))?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = match mask {
            Some(m) => att
                .reshape((b, self.kv_heads, rep, l, s))?
                .broadcast_add(m)?
                .reshape((b, self.kv_heads, rep * l, s))?,
            None => att,
        };
        let att = softmax_f32(&att)?;
        let y = att.matmul(v)?; // [1, KV, rep*L, hd]
        let y = y
            .reshape((b, self.heads, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * hd))?;
        project(&self.o_proj, &y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(cfg: &TextConfig, vb: VarBuilder, dt: DType) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(h, i, dt, vb.pp("gate_proj"))?,
            up_proj: Linear::load(h, i, dt, vb.pp("up_proj"))?,
            down_proj: Linear::load(i, h, dt, vb.pp("down_proj"))?,
        })
    }

    /// [1, L, D] -> [1, L, D]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (project(&self.gate_proj, x)?, project(&self.up_proj, x)?);
        #[cfg(feature = "cuda")]
        if kernels::enabled().swiglu && kernels::usable(&gate) {
            return project(&self.down_proj, &kernels::swiglu(&gate, &up)?);
        }
        let gate = candle_nn::ops::silu(&gate)?;
        project(&self.down_proj, &(gate * up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(cfg: &TextConfig, vb: VarBuilder, dt: DType) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(cfg, vb.pp("self_attn"), dt)?,
            mlp: Mlp::load(cfg, vb.pp("mlp"), dt)?,
            input_layernorm: rms_norm(cfg, vb.pp("input_layernorm"), dt)?,
            post_attention_layernorm: rms_norm(cfg, vb.pp("post_attention_layernorm"), dt)?,
        })
    }

    /// [1, L, D] -> [1, L, D]
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let a = self.self_attn.forward(&h, rope, mask, cache, layer)?;
        #[cfg(feature = "cuda")]
        if kernels::enabled().rmsnorm && kernels::usable(x) {
            let norm = &self.post_attention_layernorm;
            let (h, x) = kernels::rms_norm_residual(x, &a, norm.weight(), norm.eps())?;
            return x + self.mlp.forward(&h)?;
        }
        let x = (x + a)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        x + self.mlp.forward(&h)?
    }
}

/// An RMSNorm whose (small) weight is stored in the compute dtype.
fn rms_norm(cfg: &TextConfig, vb: VarBuilder, dt: DType) -> Result<RmsNorm> {
    let w = vb.get(cfg.hidden_size, "weight")?.to_dtype(dt)?;
    Ok(RmsNorm::new(w, cfg.rms_norm_eps))
}

/// `LlamaForCausalLM` / `MistralForCausalLM` (they differ only in config and defaults).
#[derive(Debug, Clone)]
pub struct CausalLm {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    config: TextConfig,
    dtype: DType,
    device: Device,
}

impl CausalLm {
    /// `vb` points at `language_model` (holding `model.*` and `lm_head.*`); weights keep the
    /// builder's dtype, activations and the KV cache use `compute` (see `linear.rs`).
    pub(crate) fn load(cfg: &TextConfig, vb: VarBuilder, compute: DType) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(cfg, m.pp("layers").pp(i), compute))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), compute)
        } else {
            Linear::load(cfg.hidden_size, cfg.vocab_size, compute, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(cfg, m.pp("norm"), compute)?,
            lm_head,
            config: cfg.clone(),
            dtype: compute,
            device: vb.device().clone(),
        })
    }

    /// A fresh per-call cache in this model's dtype and device.
    pub(crate) fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.config, capacity, self.dtype, &self.device)
    }

    /// [L] token ids -> [1, L, D] embeddings.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)
    }

    /// [1, L, D] embeddings at positions cache.len().. -> [1, L, D] final-normed hidden states.
    /// The cache grows by L.
    pub fn forward_embeds(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, l, _) = x.dims3()?;
        cache.reserve(l)?;
        let offset = cache.len();
        let rope = Rope::new(&self.config, offset, l, self.dtype, &self.device)?;
        let window = self.config.sliding_window;
        let mask = attention_mask(offset, l, window, self.dtype, &self.device)?;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &rope, mask.as_ref(), cache, i)?;
        }
        cache.len += l;
        self.norm.forward(&h)
    }

    /// [1, L, D] hidden states -> [1, L, V] logits.
    #[cfg(test)]
    pub(crate) fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// [1, L, D] hidden states -> [V] f32 logits of the last position.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = hidden.dim(1)?;
        let last = hidden.narrow(1, l - 1, 1)?;
        project(&self.lm_head, &last)?
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(DType::F32)
    }

    /// The compute dtype (activations, KV cache).
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        let m = attention_mask(2, 3, None, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(m[0], vec![0., 0., 0., f32::NEG_INFINITY, f32::NEG_INFINITY]);
        assert_eq!(m[2], vec![0.; 5]);
        assert!(attention_mask(9, 1, None, DType::F32, &Device::Cpu)
            .unwrap()
            .is_none());
        let w = attention_mask(4, 1, Some(3), DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let w: Vec<Vec<f32>> = w.to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(w[0], vec![inf, inf, 0., 0., 0.]);
    }

    #[test]
    fn cache_grows_and_truncates() {
        let cfg = TextConfig {
            num_hidden_layers: 1,
            num_key_value_heads: 1,
            head_dim: 2,
            max_position_embeddings: 64,
            ..TextConfig::llama2_7b()
        };
        let mut c = KvCache::new(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let kv = |x: f32, n: usize| Tensor::full(x, (1, 1, n, 2), &Device::Cpu).unwrap();
        c.reserve(2).unwrap();
        c.write(0, &kv(1., 2), &kv(1., 2)).unwrap();
        c.len += 2;
        c.reserve(3).unwrap();
        assert!(c.capacity() >= 5);
        let (k, _) = c.write(0, &kv(2., 3), &kv(2., 3)).unwrap();
        c.len += 3;
        let k: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(k, vec![1., 1., 1., 1., 2., 2., 2., 2., 2., 2.]);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        assert!(c.reserve(100).is_err(), "past max_position_embeddings");
    }
}
