//! The multi-modal projector of tincans-ai/gazelle (`GazelleProjector` in its
//! `modeling_gazelle.py`): it stacks 8 wav2vec2 frames into one vector and maps it into the
//! language model's embedding space, so 50 Hz audio becomes 6.25 "audio tokens" per second.
//!
//! Two details differ from what a reader might expect, and both are reproduced on purpose:
//! - the padding adds `stack - T % stack` zero frames, i.e. a whole extra group when T is already
//!   a multiple of the stack factor (that group projects to an all-zero embedding);
//! - the SwiGLU takes `silu` of the SECOND half and multiplies the first half, the opposite of
//!   `candle_nn::ops::swiglu`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::GazelleConfig;

/// Gazelle's RMSNorm: normalize in f32, cast back, then scale (eps 1e-6).
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    /// [.., C] -> [.., C]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf
            .broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        y.broadcast_mul(&self.weight)
    }
}

/// `GazelleProjector` (the "mlp" projector type).
#[derive(Debug, Clone)]
pub(crate) struct GazelleProjector {
    ln_pre: RmsNorm,
    linear_1: Linear,
    linear_2: Linear,
    ln_post: RmsNorm,
    stack_factor: usize,
}

impl GazelleProjector {
    /// `vb` points at `multi_modal_projector`; the hidden width is `config.projector_hidden`.
    pub(crate) fn load(cfg: &GazelleConfig, vb: VarBuilder) -> Result<Self> {
        let d_in = cfg.audio.hidden_size * cfg.stack_factor;
        let hidden = cfg.projector_hidden;
        let d_out = cfg.text.hidden_size;
        if !hidden.is_multiple_of(2) {
            candle_core::bail!("projector hidden size {hidden} must be even for SwiGLU");
        }
        Ok(Self {
            ln_pre: RmsNorm::load(d_in, 1e-6, vb.pp("ln_pre"))?,
            linear_1: candle_nn::linear_no_bias(d_in, hidden, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear_no_bias(hidden / 2, d_out, vb.pp("linear_2"))?,
            ln_post: RmsNorm::load(d_out, 1e-6, vb.pp("ln_post"))?,
            stack_factor: cfg.stack_factor,
        })
    }

    /// [B, T, C] -> [B, T/8 + 1, D]
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let pad = self.stack_factor - t % self.stack_factor;
        let x = x.pad_with_zeros(1, 0, pad)?;
        let x = x.reshape((b, (t + pad) / self.stack_factor, c * self.stack_factor))?;
        let h = self.linear_1.forward(&self.ln_pre.forward(&x)?)?;
        let half = h.dim(D::Minus1)? / 2;
        let (first, gate) = (
            h.narrow(D::Minus1, 0, half)?,
            h.narrow(D::Minus1, half, half)?,
        );
        let h = (candle_nn::ops::silu(&gate)? * first)?;
        self.ln_post.forward(&self.linear_2.forward(&h)?)
    }
}
