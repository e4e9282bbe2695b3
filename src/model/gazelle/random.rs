//! Random-weight Gazelles at any config (e.g. the real wav2vec2-base + Mistral-7B shape), built
//! in memory with the checkpoint's exact key names and shapes. Speed does not depend on weight
//! values when the output length is forced, so benchmarks can run where real weights cannot be
//! fetched. The key/shape list doubles as a check against real safetensors headers.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::GazelleConfig;
use super::model::{Gazelle, Precision};

/// Every checkpoint key with its shape, in `save_pretrained` naming (parametrized pos conv).
pub(crate) fn checkpoint_shapes(cfg: &GazelleConfig) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |k: String, s: &[usize]| v.push((k, s.to_vec()));
    let a = &cfg.audio;
    let h = a.hidden_size;
    let fe = "audio_tower.feature_extractor.conv_layers";
    let mut in_ch = 1;
    for (i, &c) in a.conv_dim.iter().enumerate() {
        add(
            format!("{fe}.{i}.conv.weight"),
            &[c, in_ch, a.conv_kernel[i]],
        );
        if a.conv_bias {
            add(format!("{fe}.{i}.conv.bias"), &[c]);
        }
        in_ch = c;
    }
    for p in ["weight", "bias"] {
        add(format!("{fe}.0.layer_norm.{p}"), &[a.conv_dim[0]]);
        add(
            format!("audio_tower.feature_projection.layer_norm.{p}"),
            &[in_ch],
        );
        add(format!("audio_tower.encoder.layer_norm.{p}"), &[h]);
    }
    add(
        "audio_tower.feature_projection.projection.weight".into(),
        &[h, in_ch],
    );
    add(
        "audio_tower.feature_projection.projection.bias".into(),
        &[h],
    );
    let pc = "audio_tower.encoder.pos_conv_embed.conv";
    let k = a.num_conv_pos_embeddings;
    add(
        format!("{pc}.parametrizations.weight.original0"),
        &[1, 1, k],
    );
    add(
        format!("{pc}.parametrizations.weight.original1"),
        &[h, h / a.num_conv_pos_embedding_groups, k],
    );
    add(format!("{pc}.bias"), &[h]);
    add("audio_tower.masked_spec_embed".into(), &[h]);
    for l in 0..a.num_hidden_layers {
        let p = format!("audio_tower.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{p}.attention.{proj}.weight"), &[h, h]);
            add(format!("{p}.attention.{proj}.bias"), &[h]);
        }
        for n in ["layer_norm", "final_layer_norm"] {
            add(format!("{p}.{n}.weight"), &[h]);
            add(format!("{p}.{n}.bias"), &[h]);
        }
        let i = a.intermediate_size;
        add(
            format!("{p}.feed_forward.intermediate_dense.weight"),
            &[i, h],
        );
        add(format!("{p}.feed_forward.intermediate_dense.bias"), &[i]);
        add(format!("{p}.feed_forward.output_dense.weight"), &[h, i]);
        add(format!("{p}.feed_forward.output_dense.bias"), &[h]);
    }
    let t = &cfg.text;
    let (d, stacked, ph) = (t.hidden_size, h * cfg.stack_factor, cfg.projector_hidden);
    add("multi_modal_projector.ln_pre.weight".into(), &[stacked]);
    add(
        "multi_modal_projector.linear_1.weight".into(),
        &[ph, stacked],
    );
    add("multi_modal_projector.linear_2.weight".into(), &[d, ph / 2]);
    add("multi_modal_projector.ln_post.weight".into(), &[d]);
    add(
        "language_model.model.embed_tokens.weight".into(),
        &[t.vocab_size, d],
    );
    let (q, kv) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    for l in 0..t.num_hidden_layers {
        let p = format!("language_model.model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), &[q, d]);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, d]);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, d]);
        add(format!("{p}.self_attn.o_proj.weight"), &[d, q]);
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[t.intermediate_size, d],
        );
        add(format!("{p}.mlp.up_proj.weight"), &[t.intermediate_size, d]);
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[d, t.intermediate_size],
        );
        add(format!("{p}.input_layernorm.weight"), &[d]);
        add(format!("{p}.post_attention_layernorm.weight"), &[d]);
    }
    add("language_model.model.norm.weight".into(), &[d]);
    if !t.tie_word_embeddings {
        add("language_model.lm_head.weight".into(), &[t.vocab_size, d]);
    }
    v
}

/// xorshift64*: fast enough to fill 7B weights in seconds; quality is irrelevant here.
struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn random_tensor(shape: &[usize], scale: f32, rng: &mut Rng, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dev = &Device::Cpu;
    match dtype {
        DType::BF16 => {
            let v: Vec<half::bf16> = (0..n)
                .map(|_| half::bf16::from_f32(rng.next() * scale))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        DType::F16 => {
            let v: Vec<half::f16> = (0..n)
                .map(|_| half::f16::from_f32(rng.next() * scale))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        _ => {
            let v: Vec<f32> = (0..n).map(|_| rng.next() * scale).collect();
            Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)
        }
    }
}

/// A Gazelle with random weights: matrices uniform with std 1/sqrt(fan_in), norm weights 1,
/// biases small, stored as `precision` says.
pub fn random_gazelle(
    cfg: &GazelleConfig,
    precision: Precision,
    device: &Device,
    seed: u64,
) -> Result<Gazelle> {
    let (dtype, audio_dtype) = (precision.weights, precision.audio);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut tensors = HashMap::new();
    for (name, shape) in checkpoint_shapes(cfg) {
        let dt = if name.starts_with("language_model.") {
            dtype
        } else {
            audio_dtype
        };
        let is_norm = name.contains("norm") || name.ends_with("original0") || name.contains("ln_");
        let t = if is_norm && name.ends_with("weight") || name.ends_with("original0") {
            Tensor::ones(shape.as_slice(), dt, &Device::Cpu)?
        } else if shape.len() == 1 {
            random_tensor(&shape, 0.02, &mut rng, dt)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            random_tensor(&shape, (3.0 / fan_in as f32).sqrt(), &mut rng, dt)?
        };
        tensors.insert(name, t.to_device(device)?);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    Gazelle::new(cfg, vb, precision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gazelle::parity_tests::fixture_dir;

    #[test]
    fn shapes_match_the_fixture_safetensors_headers() {
        for variant in ["mistral", "llama"] {
            let d = fixture_dir(variant);
            let mut cfg = GazelleConfig::from_json_str(
                &std::fs::read_to_string(d.join("config.json")).unwrap(),
            )
            .unwrap();
            let st = unsafe {
                candle_core::safetensors::MmapedSafetensors::new(d.join("model.safetensors"))
                    .unwrap()
            };
            cfg.projector_hidden = st
                .get("multi_modal_projector.linear_1.weight")
                .unwrap()
                .shape()[0];
            let mut ours: Vec<(String, Vec<usize>)> = checkpoint_shapes(&cfg);
            ours.sort();
            let mut theirs: Vec<(String, Vec<usize>)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| {
                    let k = k.replace("weight_g", "parametrizations.weight.original0");
                    (
                        k.replace("weight_v", "parametrizations.weight.original1"),
                        v.shape().to_vec(),
                    )
                })
                .collect();
            theirs.sort();
            assert_eq!(ours, theirs, "{variant}");
        }
    }

    #[test]
    fn random_model_at_fixture_shape_runs() {
        let d = fixture_dir("mistral");
        let mut cfg =
            GazelleConfig::from_json_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                .unwrap();
        cfg.projector_hidden = 128;
        let p = Precision::new(DType::BF16, DType::F32, &Device::Cpu);
        let m = random_gazelle(&cfg, p, &Device::Cpu, 1).unwrap();
        let audio = m.encode_audio(&vec![0.5; 16000]).unwrap();
        assert_eq!(audio.dims(), &[1, 7, 64]);
        let mut cache = m.new_cache(8).unwrap();
        let logits = m.step(1, &mut cache).unwrap();
        assert_eq!(logits.dims(), &[cfg.text.vocab_size]);
    }
}
