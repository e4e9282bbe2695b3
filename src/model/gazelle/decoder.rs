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

use super::config::TextConfig;
pub use super::kv_cache::KvCache;
use super::linear::Linear;
use super::ops::{self, project, Heads};
use super::wav2vec2::softmax_f32;

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
        Self::at(cfg, &(offset..offset + len).collect::<Vec<_>>(), dtype, dev)
    }

    /// cos/sin [L, hd/2] for the given positions, one row each (a decode batch, where every
    /// sequence is at its own position).
    fn at(cfg: &TextConfig, positions: &[usize], dtype: DType, dev: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let len = positions.len();
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), dev)?;
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
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

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    h: Heads,
    /// Mistral's sliding window, for the decode-attention kernel's first visible position.
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
            h: Heads {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            },
            window: cfg.sliding_window,
        })
    }

    /// The query, key and value projections of x [1, L, D].
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            project(&self.q_proj, x)?,
            project(&self.k_proj, x)?,
            project(&self.v_proj, x)?,
        ))
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
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = self.h;
        let (q, k, v) = self.qkv(x)?;
        let tables = (&rope.cos, &rope.sin);
        if let Some(q) = ops::fused_rope_append(&q, &k, &v, tables, cache, layer, self.h)? {
            // Rotary and the cache append ran in one kernel; attend over the cache as it is now.
            let total = cache.len() + l;
            let start = self.window.map_or(0, |w| total.saturating_sub(w));
            if let Some(y) = ops::decode_attention(&q, cache, layer, (start, total), self.h)? {
                return project(&self.o_proj, &y.reshape((b, l, nh * hd))?);
            }
            let (kc, vc) = cache.layer(layer);
            let (k, v) = (kc.narrow(2, 0, total)?, vc.narrow(2, 0, total)?);
            return project(&self.o_proj, &self.attend(&q, &k, &v, mask)?);
        }
        let q = q.reshape((b, l, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, l, nkv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (k, v) = cache.write(layer, &k, &v.contiguous()?)?;
        project(&self.o_proj, &self.attend(&q, &k, &v, mask)?)
    }

    /// One decode step of B sequences: x [1, B, D] holds one new position per sequence, row i
    /// at position `caches[i].len()`. The projections run once over all rows (the weights are
    /// read once per step); rotary embedding uses each row's own position; each row attends
    /// over its own cache, of its own length, so nothing is padded.
    fn forward_batch(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let (_, b, _) = x.dims3()?;
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = self.h;
        let (q, k, v) = self.qkv(x)?;
        // The batch rows stand in the sequence dimension, so one rotary call with one table row
        // per sequence rotates every row at its own position.
        let q = rope.apply(&q.reshape((1, b, nh, hd))?.transpose(1, 2)?)?;
        let k = rope.apply(&k.reshape((1, b, nkv, hd))?.transpose(1, 2)?)?;
        let v = v.reshape((1, b, nkv, hd))?.transpose(1, 2)?;
        let mut rows = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let ki = k.narrow(2, i, 1)?.contiguous()?;
            let vi = v.narrow(2, i, 1)?.contiguous()?;
            let (kc, vc) = cache.write(layer, &ki, &vi)?;
            let total = kc.dim(2)?;
            // Mistral's sliding window: the new position sees only the last `window` keys.
            let start = self.window.map_or(0, |w| total.saturating_sub(w));
            let (kc, vc) = (
                kc.narrow(2, start, total - start)?,
                vc.narrow(2, start, total - start)?,
            );
            let qi = q.narrow(2, i, 1)?.contiguous()?;
            rows.push(self.attend(&qi, &kc, &vc, None)?);
        }
        project(&self.o_proj, &Tensor::cat(&rows, 1)?)
    }

    /// q [1, H, L, hd] over the valid cache k, v [1, KV, S, hd] -> [1, L, H*hd], before o_proj.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, l, hd) = q.dims4()?;
        let s = k.dim(2)?;
        let Heads {
            heads: nh,
            kv_heads: nkv,
            ..
        } = self.h;
        let rep = nh / nkv;
        // Query heads kv*rep..kv*rep+rep share key/value head kv: fold them into rows.
        let q = q.reshape((b, nkv, rep * l, hd))?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = match mask {
            Some(m) => att
                .reshape((b, nkv, rep, l, s))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * l, s))?,
            None => att,
        };
        let att = softmax_f32(&att)?;
        let y = att.matmul(v)?; // [1, KV, rep*L, hd]
        y.reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))
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
        project(&self.down_proj, &ops::swiglu(&gate, &up)?)
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
        self.around(x, |h| self.self_attn.forward(h, rope, mask, cache, layer))
    }

    /// The pre-norm residual block around an attention: `attend` maps the normed x to the
    /// attention output.
    fn around(&self, x: &Tensor, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let a = attend(&self.input_layernorm.forward(x)?)?;
        let (h, x) = ops::add_norm(x, &a, &self.post_attention_layernorm)?;
        x + self.mlp.forward(&h)?
    }

    /// One decode step of B sequences, [1, B, D] -> [1, B, D] (see `Attention::forward_batch`).
    fn forward_batch(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        self.around(x, |h| self.self_attn.forward_batch(h, rope, caches, layer))
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
        tracing::debug!(kernels = ?ops::enabled(), "decoder ops (GAZELLE_KERNELS)");
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
        cache.advance(l);
        self.norm.forward(&h)
    }

    /// One decode step for a batch: `tokens[i]` goes in at position `caches[i].len()` of its
    /// own cache -> [B, V] f32 next-token logits. Every cache grows by one.
    pub(crate) fn decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            candle_core::bail!("{} tokens for {} caches", tokens.len(), caches.len());
        }
        for c in caches.iter_mut() {
            c.reserve(1)?;
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let rope = Rope::at(&self.config, &positions, self.dtype, &self.device)?;
        let mut h = self.embed(tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_batch(&h, &rope, caches, i)?;
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        let h = self.norm.forward(&h)?;
        project(&self.lm_head, &h)?.squeeze(0)?.to_dtype(DType::F32)
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
    use crate::model::gazelle::model::Precision;
    use crate::model::gazelle::parity_tests::fixture_dir;
    use crate::model::gazelle::random::random_gazelle;
    use crate::model::gazelle::GazelleConfig;

    /// One batched decode step over sequences of different lengths equals each sequence's own
    /// step, with a sliding window shorter than some of them (the fixtures have none).
    #[test]
    fn a_batched_step_equals_each_sequence_alone_with_a_sliding_window() {
        let text = std::fs::read_to_string(fixture_dir("mistral").join("config.json")).unwrap();
        let mut cfg = GazelleConfig::from_json_str(&text).unwrap();
        cfg.text.sliding_window = Some(6);
        let model = random_gazelle(&cfg, Precision::uniform(DType::F32), &Device::Cpu, 3).unwrap();
        let lm = model.language_model();
        let lengths = [1usize, 4, 9, 15];
        let mut batch: Vec<KvCache> = Vec::new();
        let mut alone: Vec<KvCache> = Vec::new();
        for (i, &n) in lengths.iter().enumerate() {
            let ids: Vec<u32> = (0..n as u32)
                .map(|k| 3 + (k * 7 + i as u32) % 150)
                .collect();
            let mut c = lm.new_cache(32).unwrap();
            lm.forward_embeds(&lm.embed(&ids).unwrap(), &mut c).unwrap();
            batch.push(c.clone());
            alone.push(c);
        }
        for step in 0..3u32 {
            let tokens: Vec<u32> = (0..lengths.len() as u32).map(|i| 10 + i + step).collect();
            let mut caches: Vec<&mut KvCache> = batch.iter_mut().collect();
            let rows: Vec<Vec<f32>> = lm
                .decode_batch(&tokens, &mut caches)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, (&t, c)) in tokens.iter().zip(alone.iter_mut()).enumerate() {
                let h = lm.forward_embeds(&lm.embed(&[t]).unwrap(), c).unwrap();
                let want: Vec<f32> = lm.last_logits(&h).unwrap().to_vec1().unwrap();
                let err = rows[i]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "step {step}, sequence {i}: {err}");
                assert_eq!(batch[i].len(), c.len());
            }
        }
    }

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
}
