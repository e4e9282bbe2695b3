//! Token sampling and the streaming decode loop.
//!
//! The logits pipeline follows transformers' `generate`: repetition penalty (HF's rule: divide
//! positive logits, multiply negative ones, for every id already in the context), then
//! temperature, top-k and top-p, then a draw. Temperature 0 means greedy (first maximum wins,
//! like `torch.argmax`). The loop hands each token to a callback as soon as it is sampled, and
//! the callback can stop generation between any two steps.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::decoder::KvCache;
use super::model::Gazelle;

/// Sampling settings for one reply.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables nucleus sampling.
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Stop when an EOS id is sampled. Off only for fixed-length runs (tests, benchmarks).
    pub stop_on_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_on_eos: true,
        }
    }
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    Cancelled,
    /// The context (`max_position_embeddings`) is full.
    ContextFull,
}

/// HF `RepetitionPenaltyLogitsProcessor`, applied once per distinct id in `context`.
pub(crate) fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = &mut logits[i];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws token ids from logits with a seeded RNG.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    params: GenerationParams,
    rng: StdRng,
}

impl Sampler {
    pub(crate) fn new(params: &GenerationParams) -> Self {
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Picks the next id from [V] logits; `context` is every id so far (for the penalty).
    pub(crate) fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, context, p.repetition_penalty);
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let t = p.temperature as f32;
        let mut order: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        // Stable sort: ties keep the lower id first, as torch's sort does in practice.
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < order.len() {
            order.truncate(p.top_k);
        }
        let max = order[0].1;
        let mut probs: Vec<f32> = order.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest head whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                mass += q as f64;
                if mass >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (i, &q) in probs.iter().enumerate() {
            if u < q {
                return order[i].0;
            }
            u -= q;
        }
        order[probs.len() - 1].0
    }
}

/// What the decode loop produced.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    /// Sampled ids, without the EOS that ended the reply (if any).
    pub tokens: Vec<u32>,
    /// How many of `tokens` were fed back into the cache (the last one is not, unless EOS).
    pub fed: usize,
    pub stop: StopReason,
    /// Seconds from the loop's start to the first sampled token.
    pub first_token_s: f64,
    /// Seconds from the first to the last sampled token.
    pub decode_s: f64,
}

impl Generated {
    /// Tokens per second after the first.
    pub(crate) fn decode_tokens_per_s(&self) -> f64 {
        if self.tokens.len() > 1 && self.decode_s > 0.0 {
            (self.tokens.len() - 1) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// What to do after a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// A new reply token: hand it on, then feed it back if [`ReplyDecoder::wants_feed`] says so.
    Token(u32),
    /// The reply ended (see [`ReplyDecoder::stop`]).
    Stop,
}

/// The decode loop of one reply as a state machine, so that one sequence alone
/// ([`generate`]) and many in a batch (the engine) share every rule: sampling, the stop ids, the
/// token limit and the context limit.
#[derive(Debug, Clone)]
pub(crate) struct ReplyDecoder {
    sampler: Sampler,
    max_new_tokens: usize,
    stop_on_eos: bool,
    /// Sampled ids, without the EOS that ended the reply (if any).
    pub tokens: Vec<u32>,
    /// How many of `tokens` were fed back into the cache.
    pub fed: usize,
    /// Why the reply ended; `None` while it goes on.
    pub stop: Option<StopReason>,
}

impl ReplyDecoder {
    pub(crate) fn new(params: &GenerationParams) -> Self {
        Self {
            sampler: Sampler::new(params),
            max_new_tokens: params.max_new_tokens,
            stop_on_eos: params.stop_on_eos,
            tokens: Vec::new(),
            fed: 0,
            stop: (params.max_new_tokens == 0).then_some(StopReason::MaxTokens),
        }
    }

    /// Samples the next id from [V] `logits` after `context` (every id in the cache).
    pub(crate) fn sample(&mut self, logits: &[f32], context: &[u32], stop_ids: &[u32]) -> Next {
        if self.stop.is_some() {
            return Next::Stop;
        }
        let id = self.sampler.sample(logits, context);
        if self.stop_on_eos && stop_ids.contains(&id) {
            self.stop = Some(StopReason::Eos);
            return Next::Stop;
        }
        self.tokens.push(id);
        Next::Token(id)
    }

    /// The consumer stopped the reply after its newest token (cancellation, barge-in).
    pub(crate) fn cancel(&mut self) {
        self.stop.get_or_insert(StopReason::Cancelled);
    }

    /// Whether the newest token should be fed back for another step; if not, the reply has
    /// ended here (token limit or a full context, given the cache's length and limit).
    pub(crate) fn wants_feed(&mut self, cache_len: usize, cache_max: usize) -> bool {
        if self.stop.is_some() {
            return false;
        }
        if self.tokens.len() >= self.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return false;
        }
        if cache_len >= cache_max {
            self.stop = Some(StopReason::ContextFull);
            return false;
        }
        true
    }

    /// The newest token was written to the cache.
    pub(crate) fn fed_one(&mut self) {
        self.fed += 1;
    }
}

/// Samples up to `max_new_tokens` ids starting from `logits` ([V] f32, the prediction after
/// the cached positions). Each id goes to `on_token` at once; `Break` stops after that id.
/// `context` (the ids already in the cache) grows with each fed id.
pub(crate) fn generate(
    model: &Gazelle,
    cache: &mut KvCache,
    logits: &Tensor,
    context: &mut Vec<u32>,
    params: &GenerationParams,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generated> {
    let start = Instant::now();
    let mut d = ReplyDecoder::new(params);
    let mut logits: Vec<f32> = logits.to_vec1()?;
    let mut first_at = None;
    let mut decode_s = 0.0;
    while let Next::Token(id) = d.sample(&logits, context, stop_ids) {
        let now = Instant::now();
        let first = *first_at.get_or_insert(now);
        decode_s = (now - first).as_secs_f64();
        if on_token(id).is_break() {
            d.cancel();
            break;
        }
        if !d.wants_feed(cache.len(), cache.max_len()) {
            break;
        }
        logits = model.step(id, cache)?.to_vec1()?;
        context.push(id);
        d.fed_one();
    }
    Ok(Generated {
        stop: d.stop.unwrap_or(StopReason::MaxTokens),
        tokens: d.tokens,
        fed: d.fed,
        first_token_s: first_at.map_or(0.0, |f| (f - start).as_secs_f64()),
        decode_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_follows_hf_sign_rule_once_per_id() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(&GenerationParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0], &[]), 1);
        let p = GenerationParams {
            repetition_penalty: 4.0,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0, 1.0], &[1]), 2);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draw() {
        let logits = [5.0, 4.9, 0.0, -1.0];
        let p = GenerationParams {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits, &[])).collect();
        assert!(draws.iter().all(|&d| d < 2) && draws.contains(&0) && draws.contains(&1));
        let p = GenerationParams {
            temperature: 1.0,
            top_p: 0.3,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 0));
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = GenerationParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let mut s = Sampler::new(&p);
        let b: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(a, b);
    }
}
