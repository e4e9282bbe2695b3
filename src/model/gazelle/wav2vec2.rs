//! The audio tower: a wav2vec2-base `Wav2Vec2Model` (Baevski et al. 2020, "wav2vec 2.0",
//! arXiv:2006.11477), following transformers' `modeling_wav2vec2.py` for the `group`-norm,
//! post-LN layout that wav2vec2-base and every Gazelle release use.
//!
//! Raw 16 kHz samples are normalized over the whole clip, a 7-layer convolutional feature encoder
//! turns them into 512-channel frames at 50 Hz, a projection lifts them to the hidden size, a
//! weight-normalized grouped convolution adds relative positions, and 12 post-LN transformer
//! layers produce `last_hidden_state`. There is no attention mask: one clip per call.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, GroupNorm, LayerNorm, Linear, VarBuilder};

use super::config::Wav2Vec2Config;

/// Zero mean, unit variance over the whole clip, as `Wav2Vec2FeatureExtractor(do_normalize)`
/// does: `(x - mean) / sqrt(var + 1e-7)` with the population variance.
pub(crate) fn normalize(samples: &[f32]) -> Vec<f32> {
    if samples.is_empty() {
        return Vec::new();
    }
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = samples
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = 1.0 / (var + 1e-7).sqrt();
    samples
        .iter()
        .map(|&x| ((x as f64 - mean) * inv) as f32)
        .collect()
}

/// The convolutional feature encoder (`Wav2Vec2FeatureEncoder` with group norm on layer 0).
#[derive(Debug, Clone)]
struct FeatureEncoder {
    convs: Vec<Conv1d>,
    group_norm: GroupNorm,
}

impl FeatureEncoder {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("conv_layers");
        let mut convs = Vec::with_capacity(cfg.conv_dim.len());
        let mut in_ch = 1;
        for (i, &out_ch) in cfg.conv_dim.iter().enumerate() {
            let conv_cfg = Conv1dConfig {
                stride: cfg.conv_stride[i],
                ..Default::default()
            };
            let vbc = vb.pp(i).pp("conv");
            let k = cfg.conv_kernel[i];
            let conv = if cfg.conv_bias {
                candle_nn::conv1d(in_ch, out_ch, k, conv_cfg, vbc)?
            } else {
                candle_nn::conv1d_no_bias(in_ch, out_ch, k, conv_cfg, vbc)?
            };
            convs.push(conv);
            in_ch = out_ch;
        }
        let c0 = cfg.conv_dim[0];
        // One group per channel: each channel is normalized over time.
        let group_norm = candle_nn::group_norm(c0, c0, 1e-5, vb.pp(0).pp("layer_norm"))?;
        Ok(Self { convs, group_norm })
    }

    /// [B, S] samples -> [B, C, T] features.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.unsqueeze(1)?;
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i == 0 {
                h = self.group_norm.forward(&h)?;
            }
            h = h.gelu_erf()?;
        }
        Ok(h)
    }
}

/// `Wav2Vec2FeatureProjection`: LayerNorm then Linear (dropout is inference-off).
#[derive(Debug, Clone)]
struct FeatureProjection {
    layer_norm: LayerNorm,
    projection: Linear,
}

impl FeatureProjection {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let c = *cfg.conv_dim.last().expect("checked non-empty");
        Ok(Self {
            layer_norm: candle_nn::layer_norm(c, cfg.layer_norm_eps, vb.pp("layer_norm"))?,
            projection: candle_nn::linear(c, cfg.hidden_size, vb.pp("projection"))?,
        })
    }

    /// [B, T, C] -> [B, T, H]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.projection.forward(&self.layer_norm.forward(x)?)
    }
}

/// `Wav2Vec2PositionalConvEmbedding`: a grouped conv whose weight is `g * v / ||v||`, the norm
/// taken per kernel tap (weight_norm with dim=2). The weight is materialized once at load.
#[derive(Debug, Clone)]
struct PositionalConvEmbedding {
    conv: Conv1d,
    kernel: usize,
}

impl PositionalConvEmbedding {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let k = cfg.num_conv_pos_embeddings;
        let groups = cfg.num_conv_pos_embedding_groups;
        let vb = vb.pp("conv");
        // Newer transformers save torch's parametrizations; older checkpoints weight_g/weight_v.
        let (g_key, v_key) = if vb.contains_tensor("parametrizations.weight.original0") {
            (
                "parametrizations.weight.original0",
                "parametrizations.weight.original1",
            )
        } else {
            ("weight_g", "weight_v")
        };
        let dtype = vb.dtype();
        let g = vb.get((1, 1, k), g_key)?.to_dtype(DType::F32)?;
        let v = vb.get((h, h / groups, k), v_key)?.to_dtype(DType::F32)?;
        let norm = v.sqr()?.sum_keepdim(0)?.sum_keepdim(1)?.sqrt()?;
        let weight = v.broadcast_mul(&g.broadcast_div(&norm)?)?.to_dtype(dtype)?;
        let bias = vb.get(h, "bias")?;
        let conv_cfg = Conv1dConfig {
            padding: k / 2,
            groups,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv1d::new(weight, Some(bias), conv_cfg),
            kernel: k,
        })
    }

    /// [B, T, H] -> [B, T, H] positional term (to be added by the caller).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        let h = self.conv.forward(&x.transpose(1, 2)?)?;
        // Wav2Vec2SamePadLayer: an even kernel with k/2 padding yields one frame too many.
        let h = if self.kernel.is_multiple_of(2) {
            h.narrow(2, 0, t)?
        } else {
            h
        };
        h.gelu_erf()?.transpose(1, 2)
    }
}

/// Multi-head self-attention with biases (`Wav2Vec2Attention`, no mask).
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// [B, T, H] -> [B, T, H]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(x)? * scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let att = q.matmul(&k.t()?)?;
        let att = softmax_f32(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        self.out_proj.forward(&y)
    }
}

/// Softmax over the last dim, computed in f32 whatever the storage dtype.
pub(crate) fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// One post-LN `Wav2Vec2EncoderLayer`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    attention: Attention,
    layer_norm: LayerNorm,
    intermediate_dense: Linear,
    output_dense: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let ff = vb.pp("feed_forward");
        Ok(Self {
            attention: Attention::load(cfg, vb.pp("attention"))?,
            layer_norm: candle_nn::layer_norm(h, eps, vb.pp("layer_norm"))?,
            intermediate_dense: candle_nn::linear(h, i, ff.pp("intermediate_dense"))?,
            output_dense: candle_nn::linear(i, h, ff.pp("output_dense"))?,
            final_layer_norm: candle_nn::layer_norm(h, eps, vb.pp("final_layer_norm"))?,
        })
    }

    /// [B, T, H] -> [B, T, H]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .layer_norm
            .forward(&(x + self.attention.forward(x)?)?)?;
        let ff = self.intermediate_dense.forward(&h)?.gelu_erf()?;
        let ff = self.output_dense.forward(&ff)?;
        self.final_layer_norm.forward(&(h + ff)?)
    }
}

/// Intermediate results, kept for parity tests against PyTorch.
#[derive(Debug, Clone)]
pub(crate) struct Wav2Vec2Output {
    /// [B, C, T] output of the convolutional feature encoder.
    pub conv_features: Tensor,
    /// [B, T, H] `last_hidden_state`.
    pub last_hidden_state: Tensor,
}

/// `Wav2Vec2Model` without the masking head.
#[derive(Debug, Clone)]
pub(crate) struct Wav2Vec2Model {
    feature_extractor: FeatureEncoder,
    feature_projection: FeatureProjection,
    pos_conv_embed: PositionalConvEmbedding,
    encoder_layer_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl Wav2Vec2Model {
    /// `vb` points at the model root (`audio_tower` inside a Gazelle checkpoint).
    pub(crate) fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let enc = vb.pp("encoder");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(cfg, enc.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            feature_extractor: FeatureEncoder::load(cfg, vb.pp("feature_extractor"))?,
            feature_projection: FeatureProjection::load(cfg, vb.pp("feature_projection"))?,
            pos_conv_embed: PositionalConvEmbedding::load(cfg, enc.pp("pos_conv_embed"))?,
            encoder_layer_norm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                enc.pp("layer_norm"),
            )?,
            layers,
        })
    }

    /// [B, S] normalized samples -> [B, T, H] hidden states (and the conv features).
    pub(crate) fn forward_with_features(&self, x: &Tensor) -> Result<Wav2Vec2Output> {
        let conv_features = self.feature_extractor.forward(x)?;
        let h = self
            .feature_projection
            .forward(&conv_features.transpose(1, 2)?)?;
        let h = (&h + self.pos_conv_embed.forward(&h)?)?;
        let mut h = self.encoder_layer_norm.forward(&h)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok(Wav2Vec2Output {
            conv_features,
            last_hidden_state: h,
        })
    }
}
