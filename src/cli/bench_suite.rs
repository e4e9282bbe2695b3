//! `gazelle bench-model --suite`: the GPU benchmark of the CUDA issue, on one device in one run.
//! Decode tok/s at several context lengths, prefill ms, encoder ms per clip length, time to first
//! token for a 5 s turn, device memory, and the measured roofline: a large device-to-device copy
//! gives the bandwidth, and the bytes a decode step must read (every decoder weight once, the
//! lm_head, the KV cache so far) over it give the fastest possible tok/s.
//!
//! Every timed region ends in a device synchronisation (or a host read of a token, which waits),
//! so the host clock measures finished work. Each number is the median of `--repeats` runs after
//! one warm-up.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use gazelle::model::gazelle::{Gazelle, GazelleConfig};

/// What `--suite` measures (from `gazelle bench-model`'s flags).
pub struct SuiteOptions {
    /// Context lengths for decode tok/s.
    pub contexts: Vec<usize>,
    /// Prompt lengths for prefill.
    pub prefill_lengths: Vec<usize>,
    /// Clip lengths (seconds) for the audio encoder.
    pub encoder_seconds: Vec<f64>,
    /// Forced decode length.
    pub decode_tokens: usize,
    /// Timed repetitions; the median is reported.
    pub repeats: usize,
}

/// What one `--suite` run reports (also the JSON).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SuiteReport {
    pub device: String,
    pub kernels: String,
    pub copy_gb_per_s: f64,
    /// Bytes a decode step reads at context 0 (weights + lm_head), without the KV cache.
    pub weight_bytes_per_token: u64,
    pub decode: Vec<DecodePoint>,
    pub prefill: Vec<(usize, f64)>,
    pub encoder: Vec<(f64, f64)>,
    pub ttft_5s_ms: f64,
    pub device_memory_used_max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DecodePoint {
    pub context: usize,
    pub tokens_per_s: f64,
    pub roofline_tokens_per_s: f64,
    pub ratio_to_roofline: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    gazelle::metrics::quantile(&v, 0.5)
}

/// Used bytes on the whole device (all processes), when the device can say.
fn device_used(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = dev;
    None
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffers.
fn copy_bandwidth(dev: &Device) -> candle_core::Result<f64> {
    let elems = 1usize << 29; // bf16: 1 GiB
    let src = Tensor::ones(elems, DType::BF16, dev)?;
    let reps = 20;
    let mut times = Vec::new();
    for rep in 0..=reps {
        dev.synchronize()?;
        let t = Instant::now();
        let dst = src.copy()?;
        dev.synchronize()?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        drop(dst);
    }
    Ok(2.0 * (elems * 2) as f64 / median(times) / 1e9)
}

/// Bytes one decode step reads from the decoder: all layer weights plus the lm_head row matrix
/// (the embedding lookup reads one row: ignored).
pub fn weight_bytes_per_token(cfg: &GazelleConfig, bytes_per_weight: u64) -> u64 {
    let t = &cfg.text;
    let (h, i, hd) = (
        t.hidden_size as u64,
        t.intermediate_size as u64,
        t.head_dim as u64,
    );
    let (nh, nkv) = (t.num_attention_heads as u64, t.num_key_value_heads as u64);
    let attn = h * nh * hd * 2 + h * nkv * hd * 2;
    let mlp = 3 * h * i;
    let layers = t.num_hidden_layers as u64 * (attn + mlp + 2 * h);
    (layers + t.vocab_size as u64 * h + h) * bytes_per_weight
}

fn kv_bytes(cfg: &GazelleConfig, context: usize, bytes: u64) -> u64 {
    let t = &cfg.text;
    2 * (t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context) as u64 * bytes
}

/// Seconds of reproducible noise at 16 kHz (speed does not depend on what the audio says).
pub fn random_audio(seconds: f64) -> Vec<f32> {
    let mut seed = 12345u32;
    (0..(seconds * 16000.0) as usize)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 0.2 - 0.1
        })
        .collect()
}

/// `i` as a text id of `cfg`'s vocabulary: below its size and never the `<|audio|>` id.
pub fn text_id(cfg: &GazelleConfig, i: u32) -> u32 {
    let vocab = cfg.text.vocab_size as u32;
    let id = i % vocab;
    if id == cfg.audio_token_index {
        (id + 1) % vocab
    } else {
        id
    }
}

/// `n` text ids spread over the vocabulary.
pub fn token_ids(cfg: &GazelleConfig, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| text_id(cfg, 100 + (i * 7919) % 30000))
        .collect()
}

/// Runs the suite on an already built model.
pub fn run_suite(model: &Gazelle, args: &SuiteOptions) -> anyhow::Result<SuiteReport> {
    let dev = model.device().clone();
    let cfg = model.config().clone();
    let lm = model.language_model();
    let bytes = model.dtype().size_in_bytes() as u64;
    let mut used_max = device_used(&dev);
    let mut note_mem = |dev: &Device| {
        if let Some(u) = device_used(dev) {
            used_max = Some(used_max.map_or(u, |m| m.max(u)));
        }
    };
    let mut report = SuiteReport {
        device: format!("{dev:?}"),
        kernels: std::env::var("GAZELLE_KERNELS").unwrap_or_else(|_| "none".into()),
        weight_bytes_per_token: weight_bytes_per_token(&cfg, bytes),
        ..Default::default()
    };
    report.copy_gb_per_s = copy_bandwidth(&dev)?;
    eprintln!("device-to-device copy: {:.0} GB/s", report.copy_gb_per_s);
    let reps = args.repeats.max(1);

    for &ctx in &args.contexts {
        let mut times = Vec::new();
        for rep in 0..=reps {
            let mut cache = model.new_cache(ctx + args.decode_tokens + 8)?;
            for chunk in token_ids(&cfg, ctx).chunks(512) {
                lm.forward_embeds(&lm.embed(chunk)?, &mut cache)?;
            }
            let mut tok = 1u32;
            dev.synchronize()?;
            let t = Instant::now();
            for _ in 0..args.decode_tokens {
                tok = model.step(tok, &mut cache)?.argmax(0)?.to_scalar::<u32>()?;
            }
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            note_mem(&dev);
        }
        let tps = args.decode_tokens as f64 / median(times);
        // Mean context over the timed tokens, for the cache bytes each step reads.
        let mean_ctx = ctx + args.decode_tokens / 2;
        let step_bytes = report.weight_bytes_per_token + kv_bytes(&cfg, mean_ctx, bytes);
        let roof = report.copy_gb_per_s * 1e9 / step_bytes as f64;
        eprintln!("decode at context {ctx}: {tps:.1} tok/s (roofline {roof:.1})");
        report.decode.push(DecodePoint {
            context: ctx,
            tokens_per_s: tps,
            roofline_tokens_per_s: roof,
            ratio_to_roofline: tps / roof,
        });
    }

    for &n in &args.prefill_lengths {
        let ids = token_ids(&cfg, n);
        let mut times = Vec::new();
        for rep in 0..=reps {
            let mut cache = model.new_cache(n + 8)?;
            dev.synchronize()?;
            let t = Instant::now();
            let hidden = lm.forward_embeds(&lm.embed(&ids)?, &mut cache)?;
            lm.last_logits(&hidden)?.argmax(0)?.to_scalar::<u32>()?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            note_mem(&dev);
        }
        let ms = median(times);
        eprintln!("prefill {n} tokens: {ms:.1} ms");
        report.prefill.push((n, ms));
    }

    for &secs in &args.encoder_seconds {
        let audio = random_audio(secs);
        let mut times = Vec::new();
        for rep in 0..=reps {
            dev.synchronize()?;
            let t = Instant::now();
            model.encode_audio(&audio)?;
            dev.synchronize()?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            note_mem(&dev);
        }
        let ms = median(times);
        eprintln!("encoder {secs} s: {ms:.1} ms");
        report.encoder.push((secs, ms));
    }

    // A 5 s turn: end of speech (all audio in hand) -> first token id on the host.
    let audio = random_audio(5.0);
    let mut ids = token_ids(&cfg, 30);
    ids.insert(15, cfg.audio_token_index);
    let mut times = Vec::new();
    for rep in 0..=reps {
        let mut cache = model.new_cache(256)?;
        dev.synchronize()?;
        let t = Instant::now();
        let clip = model.encode_audio(&audio)?;
        let hidden = model.forward_embeds(&model.splice(&ids, &[&clip])?, &mut cache)?;
        lm.last_logits(&hidden)?.argmax(0)?.to_scalar::<u32>()?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    report.ttft_5s_ms = median(times);
    note_mem(&dev);
    report.device_memory_used_max_bytes = used_max;
    Ok(report)
}

/// The suite's table (markdown) on stdout.
pub fn print_suite(r: &SuiteReport) {
    println!("| {} (GAZELLE_KERNELS={}) | value |", r.device, r.kernels);
    println!("|---|---|");
    println!(
        "| device-to-device copy (read+write) | {:.0} GB/s |",
        r.copy_gb_per_s
    );
    println!(
        "| decoder bytes per token (no KV) | {:.2} GB |",
        r.weight_bytes_per_token as f64 / 1e9
    );
    for d in &r.decode {
        println!(
            "| decode tok/s, context {} | {:.1} (roofline {:.1}, {:.0}%) |",
            d.context,
            d.tokens_per_s,
            d.roofline_tokens_per_s,
            100.0 * d.ratio_to_roofline
        );
    }
    for (n, ms) in &r.prefill {
        println!("| prefill ms, {n} tokens | {ms:.1} |");
    }
    for (s, ms) in &r.encoder {
        println!("| encoder ms, {s} s audio | {ms:.1} |");
    }
    println!(
        "| time to first token, 5 s turn + 30 tokens | {:.1} ms |",
        r.ttft_5s_ms
    );
    match r.device_memory_used_max_bytes {
        Some(b) => println!(
            "| device memory in use, max sampled | {:.2} GiB |",
            b as f64 / 1073741824.0
        ),
        None => println!("| device memory in use | n/a |"),
    }
}
