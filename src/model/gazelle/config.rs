//! Gazelle's `config.json`: the wav2vec2 audio config, the Llama/Mistral text config and the
//! projector settings, with the Hugging Face class defaults filled in.
//!
//! Gazelle checkpoints store `text_config` as a diff against `MistralConfig`/`LlamaConfig`
//! defaults (transformers' `to_diff_dict`), so a field that is absent means "the class default",
//! and an explicit `null` (e.g. Mistral v0.2's `sliding_window`) means "none". We therefore read
//! `text_config` as raw JSON instead of a serde struct with uniform defaults.

use serde::Deserialize;
use serde_json::Value;

/// Errors raised while reading or checking a Gazelle `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum GazelleConfigError {
    #[error("config.json is not valid JSON for a Gazelle model: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json field `{field}` is unsupported: {why}")]
    Unsupported { field: &'static str, why: String },
    #[error("config.json field `{field}` has the wrong type; expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}

fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_intermediate() -> usize {
    3072
}
fn d_conv_dim() -> Vec<usize> {
    vec![512; 7]
}
fn d_conv_kernel() -> Vec<usize> {
    vec![10, 3, 3, 3, 3, 2, 2]
}
fn d_conv_stride() -> Vec<usize> {
    vec![5, 2, 2, 2, 2, 2, 2]
}
fn d_pos_conv() -> usize {
    128
}
fn d_pos_groups() -> usize {
    16
}
fn d_ln_eps() -> f64 {
    1e-5
}
fn d_group() -> String {
    "group".into()
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_audio_token() -> u32 {
    32000
}
fn d_stack() -> usize {
    8
}

/// `Wav2Vec2Config` with transformers' defaults (which are wav2vec2-base).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Wav2Vec2Config {
    /// The audio tower's class; only `wav2vec2` is ported (absent means wav2vec2).
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_conv_dim")]
    pub conv_dim: Vec<usize>,
    #[serde(default = "d_conv_kernel")]
    pub conv_kernel: Vec<usize>,
    #[serde(default = "d_conv_stride")]
    pub conv_stride: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    #[serde(default = "d_pos_conv")]
    pub num_conv_pos_embeddings: usize,
    #[serde(default = "d_pos_groups")]
    pub num_conv_pos_embedding_groups: usize,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_group")]
    pub feat_extract_norm: String,
    #[serde(default)]
    pub do_stable_layer_norm: bool,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_gelu")]
    pub feat_extract_activation: String,
}

impl Default for Wav2Vec2Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl Wav2Vec2Config {
    /// The shapes of facebook/wav2vec2-base(-960h), the audio tower of every Gazelle release.
    pub(crate) fn base() -> Self {
        Self::default()
    }

    /// Rejects the variants this port does not implement, with a message naming the field.
    pub(crate) fn check(&self) -> Result<(), GazelleConfigError> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "wav2vec2") {
            return Err(GazelleConfigError::Unsupported {
                field: "audio_config.model_type",
                why: format!(
                    "the audio tower is `{t}`; this port implements wav2vec2 only (the tower of \
                     every Gazelle release)"
                ),
            });
        }
        let layers = self.conv_dim.len();
        if self.conv_kernel.len() != layers || self.conv_stride.len() != layers {
            return Err(GazelleConfigError::Unsupported {
                field: "audio_config.conv_dim",
                why: "conv_dim, conv_kernel and conv_stride must have the same length".into(),
            });
        }
        if self.feat_extract_norm != "group" || self.do_stable_layer_norm {
            return Err(GazelleConfigError::Unsupported {
                field: "audio_config.feat_extract_norm",
                why: "only the wav2vec2-base layout (group norm, post-LN encoder) is ported".into(),
            });
        }
        for (field, act) in [
            ("audio_config.hidden_act", &self.hidden_act),
            (
                "audio_config.feat_extract_activation",
                &self.feat_extract_activation,
            ),
        ] {
            if act != "gelu" {
                return Err(GazelleConfigError::Unsupported {
                    field,
                    why: format!("activation {act}"),
                });
            }
        }
        Ok(())
    }

    /// Number of encoder frames for `samples` input samples (320 samples per frame at 16 kHz).
    pub(crate) fn num_frames(&self, samples: usize) -> usize {
        let mut t = samples;
        for (&k, &s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            if t < k {
                return 0;
            }
            t = (t - k) / s + 1;
        }
        t
    }
}

/// Which Hugging Face decoder class `text_config` describes; it decides the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextArch {
    Llama,
    Mistral,
}

/// The resolved Llama/Mistral decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub arch: TextArch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    /// Mistral's sliding attention window; `None` attends to the whole history.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl TextConfig {
    /// Mistral-7B-Instruct-v0.2 (gazelle-v0.2's decoder), vocab including `<|audio|>`.
    pub(crate) fn mistral_7b_v02() -> Self {
        let mut v = serde_json::Map::new();
        v.insert("model_type".into(), "mistral".into());
        v.insert("vocab_size".into(), 32001.into());
        v.insert("rms_norm_eps".into(), 1e-5.into());
        v.insert("rope_theta".into(), 1e6.into());
        v.insert("sliding_window".into(), Value::Null);
        v.insert("max_position_embeddings".into(), 32768.into());
        Self::from_json(&Value::Object(v)).expect("valid preset")
    }

    /// Llama-2-7B-chat (gazelle-v0.1's decoder), vocab including `<|audio|>`.
    pub(crate) fn llama2_7b() -> Self {
        let mut v = serde_json::Map::new();
        v.insert("model_type".into(), "llama".into());
        v.insert("vocab_size".into(), 32001.into());
        v.insert("rms_norm_eps".into(), 1e-5.into());
        v.insert("max_position_embeddings".into(), 4096.into());
        Self::from_json(&Value::Object(v)).expect("valid preset")
    }

    /// Reads a (possibly diff-only) `text_config` object, filling in the class defaults.
    pub(crate) fn from_json(v: &Value) -> Result<Self, GazelleConfigError> {
        let arch = match v.get("model_type").and_then(Value::as_str) {
            // GazelleConfig treats a text_config without model_type as Llama.
            None | Some("llama") => TextArch::Llama,
            Some("mistral") => TextArch::Mistral,
            Some(other) => {
                return Err(GazelleConfigError::Unsupported {
                    field: "text_config.model_type",
                    why: format!("`{other}`; expected llama or mistral"),
                })
            }
        };
        let mistral = arch == TextArch::Mistral;
        let hidden_size = get_usize(v, "hidden_size", "text_config.hidden_size")?.unwrap_or(4096);
        let heads =
            get_usize(v, "num_attention_heads", "text_config.num_attention_heads")?.unwrap_or(32);
        let kv_default = if mistral { 8 } else { heads };
        // Llama's default num_key_value_heads is None, meaning MHA; null means the same.
        let kv = get_usize(v, "num_key_value_heads", "text_config.num_key_value_heads")?
            .unwrap_or(kv_default);
        let head_dim =
            get_usize(v, "head_dim", "text_config.head_dim")?.unwrap_or(hidden_size / heads);
        let rope_theta = match get_f64(v, "rope_theta", "text_config.rope_theta")? {
            Some(t) => t,
            None => match v.get("rope_parameters") {
                Some(p) => get_f64(p, "rope_theta", "text_config.rope_parameters")?.unwrap_or(1e4),
                None => 1e4,
            },
        };
        for field in ["rope_scaling", "rope_parameters"] {
            let kind = v
                .get(field)
                .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
                .and_then(Value::as_str);
            if let Some(kind) = kind.filter(|k| *k != "default") {
                return Err(GazelleConfigError::Unsupported {
                    field: "text_config.rope_scaling",
                    why: format!("rope type `{kind}` is not ported"),
                });
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if v.get(field).and_then(Value::as_bool) == Some(true) {
                return Err(GazelleConfigError::Unsupported {
                    field: "text_config.attention_bias",
                    why: format!("{field}=true is not ported"),
                });
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(GazelleConfigError::Unsupported {
                    field: "text_config.hidden_act",
                    why: format!("activation `{act}`; only silu is ported"),
                });
            }
        }
        let sliding_window = match v.get("sliding_window") {
            None if mistral => Some(4096),
            None | Some(Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or(GazelleConfigError::WrongType {
                field: "text_config.sliding_window",
                expected: "an integer or null",
            })? as usize),
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None => vec![2],
            Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            Some(x) => vec![x.as_u64().ok_or(GazelleConfigError::WrongType {
                field: "text_config.eos_token_id",
                expected: "an integer or a list of integers",
            })? as u32],
        };
        let bos_token_id = match v.get("bos_token_id") {
            None => Some(1),
            Some(x) => x.as_u64().map(|x| x as u32),
        };
        Ok(Self {
            arch,
            vocab_size: get_usize(v, "vocab_size", "text_config.vocab_size")?.unwrap_or(32000),
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", "text_config.intermediate_size")?
                .unwrap_or(if mistral { 14336 } else { 11008 }),
            num_hidden_layers: get_usize(v, "num_hidden_layers", "text_config.num_hidden_layers")?
                .unwrap_or(32),
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: get_usize(
                v,
                "max_position_embeddings",
                "text_config.max_position_embeddings",
            )?
            .unwrap_or(if mistral { 4096 * 32 } else { 2048 }),
            rms_norm_eps: get_f64(v, "rms_norm_eps", "text_config.rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta as f32,
            sliding_window,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool)
                == Some(true),
            bos_token_id,
            eos_token_ids,
        })
    }
}

fn get_usize(
    v: &Value,
    key: &str,
    field: &'static str,
) -> Result<Option<usize>, GazelleConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or(GazelleConfigError::WrongType {
                field,
                expected: "a non-negative integer",
            }),
    }
}

fn get_f64(v: &Value, key: &str, field: &'static str) -> Result<Option<f64>, GazelleConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or(GazelleConfigError::WrongType {
            field,
            expected: "a number",
        }),
    }
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    audio_config: Option<Wav2Vec2Config>,
    #[serde(default)]
    text_config: Option<Value>,
    #[serde(default = "d_audio_token")]
    audio_token_index: u32,
    #[serde(default = "d_stack")]
    stack_factor: usize,
    #[serde(default)]
    projector_type: Option<String>,
}

/// The whole Gazelle configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GazelleConfig {
    pub audio: Wav2Vec2Config,
    pub text: TextConfig,
    /// Id of the `<|audio|>` placeholder that the projector outputs replace.
    pub audio_token_index: u32,
    /// Audio frames stacked into one projector input (8: 50 Hz frames become 6.25 Hz tokens).
    pub stack_factor: usize,
    /// Width of `linear_1`'s output; SwiGLU halves it. Checkpoints do not always record it
    /// faithfully, so the loader takes it from the `linear_1` weight.
    pub projector_hidden: usize,
}

impl GazelleConfig {
    pub fn from_json_str(s: &str) -> Result<Self, GazelleConfigError> {
        let raw: RawConfig = serde_json::from_str(s)?;
        if let Some(p) = raw.projector_type.as_deref().filter(|p| *p != "mlp") {
            return Err(GazelleConfigError::Unsupported {
                field: "projector_type",
                why: format!("`{p}`; only the mlp projector is ported"),
            });
        }
        let audio = raw.audio_config.unwrap_or_default();
        audio.check()?;
        let text =
            TextConfig::from_json(&raw.text_config.unwrap_or(Value::Object(Default::default())))?;
        // The class default for the projector width; the loader replaces it with the real one.
        let v: Value = serde_json::from_str(s)?;
        let projector_hidden = get_usize(&v, "hidden_size", "hidden_size")?.unwrap_or(4096);
        Ok(Self {
            audio,
            text,
            audio_token_index: raw.audio_token_index,
            stack_factor: raw.stack_factor,
            projector_hidden,
        })
    }

    /// wav2vec2-base + Mistral-7B-v0.2, the shape of tincans-ai/gazelle-v0.2.
    pub(crate) fn gazelle_v02() -> Self {
        Self {
            audio: Wav2Vec2Config::base(),
            text: TextConfig::mistral_7b_v02(),
            audio_token_index: 32000,
            stack_factor: 8,
            // linear_1 is 6144 → 4096 (SwiGLU then halves it to 2048): the only width whose
            // parameters add up to the published shards (see the test below).
            projector_hidden: 4096,
        }
    }

    /// wav2vec2-base + Llama-2-7B, the shape of tincans-ai/gazelle-v0.1.
    pub(crate) fn gazelle_v01() -> Self {
        Self {
            text: TextConfig::llama2_7b(),
            ..Self::gazelle_v02()
        }
    }

    /// A named real-shape preset for random-weight benchmarks.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "mistral-7b" | "gazelle-v0.2" => Some(Self::gazelle_v02()),
            "llama2-7b" | "llama-2-7b" | "gazelle-v0.1" => Some(Self::gazelle_v01()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_only_text_config_gets_class_defaults() {
        let m = TextConfig::from_json(&serde_json::json!({"model_type": "mistral"})).unwrap();
        assert_eq!((m.num_key_value_heads, m.intermediate_size), (8, 14336));
        assert_eq!(m.sliding_window, Some(4096));
        let m = TextConfig::from_json(&serde_json::json!({"model_type": "mistral",
            "sliding_window": null, "rope_theta": 1e6}))
        .unwrap();
        assert_eq!((m.sliding_window, m.rope_theta), (None, 1e6));
        let l = TextConfig::from_json(&serde_json::json!({"num_attention_heads": 8})).unwrap();
        assert_eq!(
            (l.arch, l.num_key_value_heads, l.head_dim),
            (TextArch::Llama, 8, 512)
        );
        let bad = TextConfig::from_json(&serde_json::json!({"model_type": "gemma"}));
        assert!(bad.unwrap_err().to_string().contains("gemma"));
    }

    /// `config.json` as gazelle-v0.2 publishes it: `text_config` in diff form (no hidden size,
    /// heads or layers), reconstructed from the published file listing and shard sizes.
    const V02_CONFIG: &str = r#"{
        "architectures": ["GazelleForConditionalGeneration"],
        "audio_config": {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"],
            "vocab_size": 32, "feat_extract_norm": "group", "conv_bias": false,
            "do_stable_layer_norm": false, "num_conv_pos_embeddings": 128,
            "num_conv_pos_embedding_groups": 16},
        "audio_model_id": "facebook/wav2vec2-base-960h",
        "audio_token_index": 32000,
        "model_type": "gazelle",
        "stack_factor": 8,
        "text_config": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
            "vocab_size": 32001},
        "text_model_id": "mistralai/Mistral-7B-Instruct-v0.2",
        "torch_dtype": "bfloat16",
        "vocab_size": 32001
    }"#;

    #[test]
    fn the_published_v02_config_resolves_to_the_real_shape() {
        let c = GazelleConfig::from_json_str(V02_CONFIG).unwrap();
        let a = &c.audio;
        assert_eq!(a.model_type.as_deref(), Some("wav2vec2"));
        assert_eq!(
            (
                a.hidden_size,
                a.num_hidden_layers,
                a.num_attention_heads,
                a.intermediate_size
            ),
            (768, 12, 12, 3072)
        );
        assert_eq!(a.conv_dim, vec![512; 7]);
        assert_eq!(a.conv_kernel, vec![10, 3, 3, 3, 3, 2, 2]);
        assert_eq!(a.conv_stride, vec![5, 2, 2, 2, 2, 2, 2]);
        assert!(!a.conv_bias && !a.do_stable_layer_norm);
        assert_eq!(a.feat_extract_norm, "group");
        assert_eq!(
            (a.num_conv_pos_embeddings, a.num_conv_pos_embedding_groups),
            (128, 16)
        );
        assert_eq!(
            a.hidden_size / a.num_conv_pos_embedding_groups,
            48,
            "channels per group"
        );
        let t = &c.text;
        assert_eq!(t.arch, TextArch::Mistral);
        assert_eq!(
            (
                t.vocab_size,
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers
            ),
            (32001, 4096, 14336, 32)
        );
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            (32, 8, 128)
        );
        assert_eq!(t.max_position_embeddings, 32768);
        assert_eq!((t.rms_norm_eps, t.rope_theta), (1e-5, 1e6));
        assert_eq!(t.sliding_window, None);
        assert!(!t.tie_word_embeddings);
        assert_eq!(
            (t.bos_token_id, t.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert_eq!((c.audio_token_index, c.stack_factor), (32000, 8));
        assert_eq!(
            c.projector_hidden, 4096,
            "the class default until the weights say"
        );
        let mut preset = GazelleConfig::gazelle_v02();
        preset.audio.model_type = Some("wav2vec2".into());
        assert_eq!(c, preset, "the v0.2 preset is the published shape");
    }

    /// The resolved v0.2 shape, stored in bf16, weighs what the published shards weigh
    /// (4.96 + 4.92 + 4.86 GB, 14.7394 GB in all); a projector width of 8192 would not.
    #[test]
    fn the_v02_shape_adds_up_to_the_published_shards() {
        let bytes = |cfg: &GazelleConfig| -> f64 {
            crate::model::gazelle::random::checkpoint_shapes(cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as f64 * 2.0)
                .sum()
        };
        let real = GazelleConfig::from_json_str(V02_CONFIG).unwrap();
        let gb = bytes(&real) / 1e9;
        assert!((gb - 14.7394).abs() < 0.0005, "{gb:.4} GB");
        let wide = GazelleConfig {
            projector_hidden: 8192,
            ..real
        };
        assert!((bytes(&wide) / 1e9 - 14.81).abs() < 0.01);
    }

    /// The tincans notebook's dairy clip: 86,400 samples at 24 kHz become 57,600 at 16 kHz (as
    /// torchaudio's resampler gives), 179 wav2vec2 frames, and the 23 audio tokens published.
    #[test]
    fn the_dairy_clip_makes_23_audio_tokens() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/audio/tincans/test16.wav");
        let clip = crate::audio::wav::read(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!((clip.sample_rate, clip.samples.len()), (24_000, 86_400));
        let audio =
            crate::audio::resample::resample_all(&clip.samples, 24_000, crate::audio::MODEL_RATE)
                .unwrap();
        assert_eq!(audio.len(), 57_600);
        let frames = GazelleConfig::gazelle_v02().audio.num_frames(audio.len());
        assert_eq!((frames, frames / 8 + 1), (179, 23));
    }

    #[test]
    fn an_audio_tower_other_than_wav2vec2_is_refused() {
        let e = GazelleConfig::from_json_str(r#"{"audio_config": {"model_type": "whisper"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("whisper") && e.contains("wav2vec2 only"), "{e}");
    }

    #[test]
    fn wav2vec2_base_frame_count() {
        let c = Wav2Vec2Config::base();
        assert_eq!(c.num_frames(16000), 49);
        assert_eq!(c.num_frames(15600), 48);
        assert_eq!(c.num_frames(399), 0);
    }
}
