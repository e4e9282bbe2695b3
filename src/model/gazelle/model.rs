//! The assembled Gazelle model (tincans-ai/gazelle, `GazelleForConditionalGeneration`): a
//! wav2vec2 audio tower, the stacking projector and a Llama/Mistral decoder, LLaVA-style. The
//! prompt carries one `<|audio|>` token per clip; splicing replaces it by all of that clip's
//! projector outputs, and positions then simply run 0..L-1.
//!
//! `Gazelle` holds immutable weights only and is shared by calls behind an `Arc`; per-call state
//! (the KV cache) lives in [`super::session::GazelleSession`].

use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::GazelleConfig;
use super::decoder::{CausalLm, KvCache};
use super::projector::GazelleProjector;
use super::wav2vec2::{normalize, Wav2Vec2Model};

/// Every stage of audio encoding, for parity tests and timing.
#[derive(Debug, Clone)]
pub struct AudioStages {
    /// [1, S] normalized samples.
    pub normalized: Tensor,
    /// [1, C, T] conv feature encoder output.
    pub conv_features: Tensor,
    /// [1, T, H] wav2vec2 `last_hidden_state`.
    pub encoder_output: Tensor,
    /// [1, N, D] projector output (N = T/8 + 1 audio tokens).
    pub audio_embeds: Tensor,
}

/// Which dtypes the parts of the model store and compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Decoder weight storage (what the checkpoint is converted to at load).
    pub weights: DType,
    /// Decoder activations and KV cache.
    pub compute: DType,
    /// Audio tower and projector, weights and activations.
    pub audio: DType,
}

impl Precision {
    /// The shipping choice: on the CPU, half-precision decoder weights compute in f32 (faster
    /// there, and closer to f32); elsewhere compute follows the weights.
    pub fn new(weights: DType, audio: DType, device: &Device) -> Self {
        let half = matches!(weights, DType::BF16 | DType::F16);
        let compute = if half && device.is_cpu() {
            DType::F32
        } else {
            weights
        };
        Self {
            weights,
            compute,
            audio,
        }
    }

    /// Everything in one dtype, as PyTorch runs a model after `.to(dtype)`.
    #[cfg(test)]
    pub(crate) fn uniform(dtype: DType) -> Self {
        Self {
            weights: dtype,
            compute: dtype,
            audio: dtype,
        }
    }
}

/// Immutable Gazelle weights.
#[derive(Debug, Clone)]
pub struct Gazelle {
    config: GazelleConfig,
    audio_tower: Wav2Vec2Model,
    multi_modal_projector: GazelleProjector,
    language_model: CausalLm,
    audio_dtype: DType,
}

impl Gazelle {
    /// Builds the model from a root `VarBuilder` holding the checkpoint keys.
    pub(crate) fn new(cfg: &GazelleConfig, vb: VarBuilder, precision: Precision) -> Result<Self> {
        let avb = vb.clone().set_dtype(precision.audio);
        let lvb = vb.set_dtype(precision.weights);
        Ok(Self {
            config: cfg.clone(),
            audio_tower: Wav2Vec2Model::load(&cfg.audio, avb.pp("audio_tower"))?,
            multi_modal_projector: GazelleProjector::load(cfg, avb.pp("multi_modal_projector"))?,
            language_model: CausalLm::load(&cfg.text, lvb.pp("language_model"), precision.compute)?,
            audio_dtype: precision.audio,
        })
    }

    /// Loads safetensors shards, correcting the config from the tensor shapes: the vocab size
    /// from the embedding (32000 + `<|audio|>`) and the projector width from `linear_1`.
    pub(crate) fn load(
        cfg: &GazelleConfig,
        weights: &[PathBuf],
        precision: Precision,
        device: &Device,
    ) -> Result<Self> {
        let mut cfg = cfg.clone();
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume
        // nobody truncates them while the model is loaded.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(weights)? };
        let shape = |name: &str| -> Result<Vec<usize>> { Ok(st.get(name)?.shape().to_vec()) };
        cfg.text.vocab_size = shape("language_model.model.embed_tokens.weight")?[0];
        cfg.projector_hidden = shape("multi_modal_projector.linear_1.weight")?[0];
        if !cfg.text.tie_word_embeddings && !has(&st, "language_model.lm_head.weight") {
            cfg.text.tie_word_embeddings = true;
        }
        drop(st);
        // SAFETY: as above.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(weights, precision.weights, device)? };
        Self::new(&cfg, vb, precision)
    }

    pub fn config(&self) -> &GazelleConfig {
        &self.config
    }

    pub fn language_model(&self) -> &CausalLm {
        &self.language_model
    }

    /// The language model's compute dtype.
    pub fn dtype(&self) -> DType {
        self.language_model.dtype()
    }

    pub fn device(&self) -> &Device {
        self.language_model.device()
    }

    /// A fresh per-call KV cache.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        self.language_model.new_cache(capacity)
    }

    /// 16 kHz mono samples -> every stage up to [1, N, D] audio embeddings.
    pub(crate) fn encode_audio_stages(&self, samples: &[f32]) -> Result<AudioStages> {
        let min = self.config.audio.conv_kernel.first().copied().unwrap_or(1);
        if self.config.audio.num_frames(samples.len()) == 0 {
            candle_core::bail!(
                "audio clip of {} samples is too short; wav2vec2 needs at least {min}",
                samples.len()
            );
        }
        let dev = self.device();
        let normalized = Tensor::from_vec(normalize(samples), (1, samples.len()), dev)?
            .to_dtype(self.audio_dtype)?;
        let out = self.audio_tower.forward_with_features(&normalized)?;
        let audio_embeds = self.multi_modal_projector.forward(&out.last_hidden_state)?;
        Ok(AudioStages {
            normalized,
            conv_features: out.conv_features,
            encoder_output: out.last_hidden_state,
            audio_embeds,
        })
    }

    /// 16 kHz mono samples -> [1, N, D] audio embeddings.
    pub fn encode_audio(&self, samples: &[f32]) -> Result<Tensor> {
        Ok(self.encode_audio_stages(samples)?.audio_embeds)
    }

    /// [L] ids with one `<|audio|>` per clip -> [1, L - A + ΣN, D]: each audio token replaced by
    /// the next clip's [1, N, D] embeddings, in order.
    pub fn splice(&self, ids: &[u32], audio: &[&Tensor]) -> Result<Tensor> {
        let audio_id = self.config.audio_token_index;
        let count = ids.iter().filter(|&&t| t == audio_id).count();
        if count != audio.len() {
            candle_core::bail!(
                "prompt has {count} <|audio|> tokens but {} clips",
                audio.len()
            );
        }
        let mut parts = Vec::with_capacity(2 * count + 1);
        let mut clips = audio.iter();
        for run in ids.split_inclusive(|&t| t == audio_id) {
            let (text, is_audio) = match run.split_last() {
                Some((&last, rest)) if last == audio_id => (rest, true),
                _ => (run, false),
            };
            if !text.is_empty() {
                parts.push(self.language_model.embed(text)?);
            }
            if is_audio {
                let clip = clips.next().expect("counted above");
                parts.push(clip.to_dtype(self.dtype())?);
            }
        }
        if parts.is_empty() {
            candle_core::bail!("empty prompt");
        }
        Tensor::cat(&parts, 1)
    }

    /// [1, L, D] spliced embeddings -> [1, L, D] hidden states, appended to `cache`.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.language_model.forward_embeds(embeds, cache)
    }

    /// One decode step: token id at position cache.len() -> [V] f32 logits.
    pub fn step(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.language_model.embed(&[token])?;
        let h = self.language_model.forward_embeds(&x, cache)?;
        self.language_model.last_logits(&h)
    }
}

fn has(st: &candle_core::safetensors::MmapedSafetensors, name: &str) -> bool {
    st.get(name).is_ok()
}
