//! GPU checks (`cargo test --features cuda`, NEEDS A CUDA GPU; they fail, not skip, without one).
//! The fixtures against PyTorch on CUDA, and each fused kernel against the stock candle ops it
//! replaces on fresh random bf16 inputs at Mistral-7B shapes. With `GAZELLE_KERNELS=all` in the
//! environment the fixture checks also run the decoder through the fused kernels.

use candle_core::{DType, Device, Tensor, D};

use super::model::Precision;
use super::parity_tests::{check_on, rel_err_l2};
use crate::model::cuda as kernels;

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (built with --features cuda)")
}

#[test]
fn f32_fixtures_on_cuda_within_1e_4_of_pytorch() {
    for variant in ["mistral", "llama"] {
        check_on(variant, Precision::uniform(DType::F32), 1e-4, true, &cuda());
    }
}

#[test]
fn bf16_fixtures_on_cuda_within_5e_2_of_bf16_pytorch() {
    for variant in ["mistral", "llama"] {
        let same = check_on(
            variant,
            Precision::uniform(DType::BF16),
            5e-2,
            true,
            &cuda(),
        );
        eprintln!("{variant}: leading greedy tokens equal to PyTorch bf16: {same:?}");
    }
}

fn randn(shape: &[usize], dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let ours = ours.to_dtype(DType::F32).unwrap();
    let nan: f32 = ours
        .ne(&ours)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(
        nan, 0.0,
        "{what}: NaN in the output (an unwritten element?)"
    );
    let e = rel_err_l2(
        &ours.to_device(&Device::Cpu).unwrap(),
        &reference.to_device(&Device::Cpu).unwrap(),
    );
    eprintln!("{what}: l2-rel {e:.2e}");
    assert!(e < tol, "{what}: l2-rel {e} >= {tol}");
}

#[test]
fn rmsnorm_residual_matches_candle() {
    let dev = cuda();
    for rows in [1, 7, 64] {
        let (x, r, w) = (
            randn(&[1, rows, 4096], &dev),
            randn(&[1, rows, 4096], &dev),
            randn(&[4096], &dev),
        );
        let (h, s) = kernels::rms_norm_residual(&x, &r, &w, 1e-5).unwrap();
        let sum = (&x + &r).unwrap();
        let norm = candle_nn::RmsNorm::new(w.clone(), 1e-5);
        let href = candle_core::Module::forward(&norm, &sum).unwrap();
        assert_close("rmsnorm sum", &s, &sum, 1e-3);
        assert_close("rmsnorm out", &h, &href, 1e-2);
    }
}

#[test]
fn swiglu_matches_candle() {
    let dev = cuda();
    for rows in [1, 33] {
        let (g, u) = (
            randn(&[1, rows, 14336], &dev),
            randn(&[1, rows, 14336], &dev),
        );
        let reference = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        assert_close(
            "swiglu",
            &kernels::swiglu(&g, &u).unwrap(),
            &reference,
            1e-2,
        );
    }
}

#[test]
fn gemv_matches_matmul() {
    let dev = cuda();
    for (n, k) in [
        (4096, 4096),
        (1024, 4096),
        (14336, 4096),
        (4096, 14336),
        (32000, 4096),
        (8, 24),
    ] {
        let (x, w) = (randn(&[1, 1, k], &dev), randn(&[n, k], &dev));
        let reference = x
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        assert_close(
            &format!("gemv {n}x{k}"),
            &kernels::gemv(&x, &w).unwrap(),
            &reference,
            1e-2,
        );
    }
}

/// Stock rotary (candle's rope on [1, h, L, hd]) for the reference.
fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), cos, sin).unwrap()
}

#[test]
fn rope_kv_append_and_decode_attention_match_candle() {
    let dev = cuda();
    let (h, kv, hd, cap) = (32, 8, 128, 4160);
    for (offset, l) in [(0, 5), (127, 1), (4095, 1)] {
        let kc = randn(&[1, kv, cap, hd], &dev);
        let vc = randn(&[1, kv, cap, hd], &dev);
        let (q, k, v) = (
            randn(&[1, l, h * hd], &dev),
            randn(&[1, l, kv * hd], &dev),
            randn(&[1, l, kv * hd], &dev),
        );
        let ang = Tensor::rand(0f32, std::f32::consts::TAU, (l, hd / 2), &dev).unwrap();
        let (cos, sin) = (
            ang.cos().unwrap().to_dtype(DType::BF16).unwrap(),
            ang.sin().unwrap().to_dtype(DType::BF16).unwrap(),
        );
        let qh = q.reshape((1, l, h, hd)).unwrap().transpose(1, 2).unwrap();
        let kh = k.reshape((1, l, kv, hd)).unwrap().transpose(1, 2).unwrap();
        let vh = v.reshape((1, l, kv, hd)).unwrap().transpose(1, 2).unwrap();
        let (q_ref, k_ref) = (rope_ref(&qh, &cos, &sin), rope_ref(&kh, &cos, &sin));
        let before = kc.narrow(2, 0, offset).unwrap().copy().unwrap();
        let q_out =
            kernels::rope_kv_append(&q, &k, &v, &cos, &sin, &kc, &vc, (h, kv, hd), offset).unwrap();
        assert_close("rope q", &q_out, &q_ref, 1e-2);
        assert_close(
            "rope k in cache",
            &kc.narrow(2, offset, l).unwrap(),
            &k_ref,
            1e-2,
        );
        assert_close("v in cache", &vc.narrow(2, offset, l).unwrap(), &vh, 1e-6);
        if offset > 0 {
            assert_close(
                "cache before offset untouched",
                &kc.narrow(2, 0, offset).unwrap(),
                &before,
                1e-6,
            );
        }
        if l != 1 {
            continue;
        }
        let total = offset + l;
        for window in [None, Some(1000)] {
            let start = window.map_or(0, |w: usize| total.saturating_sub(w));
            let y =
                kernels::decode_attention(&q_out, &kc, &vc, start, total, (hd as f64).powf(-0.5))
                    .unwrap();
            // Reference in f32 over the visible positions, query heads grouped per kv head.
            let k = kc
                .narrow(2, start, total - start)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let v = vc
                .narrow(2, start, total - start)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let qf = q_out
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((1, kv, h / kv, hd))
                .unwrap();
            let att = (qf.matmul(&k.t().unwrap()).unwrap() * (hd as f64).powf(-0.5)).unwrap();
            let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
            let reference = att.matmul(&v).unwrap().reshape((1, h, 1, hd)).unwrap();
            assert_close(
                &format!("decode attention len {total} window {window:?}"),
                &y,
                &reference,
                1e-2,
            );
        }
    }
}

/// bf16 greedy tokens on CUDA against PyTorch-CUDA bf16 (transformers), from the cases
/// `scripts/cuda_greedy_reference.py` wrote into `$GAZELLE_TORCH_GREEDY` (scripts/check-cuda
/// runs it first). A divergence passes only at a near-tie of PyTorch's top-2 logits.
#[test]
fn greedy_tokens_match_pytorch_cuda() {
    use super::config::GazelleConfig;
    use super::decoder::CausalLm;
    let dir = std::env::var("GAZELLE_TORCH_GREEDY").expect(
        "set GAZELLE_TORCH_GREEDY to the folder scripts/cuda_greedy_reference.py wrote \
         (scripts/check-cuda does both)",
    );
    let dev = cuda();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {dir}");
    for case in cases {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap())
                .unwrap();
        let cfg = std::fs::read_to_string(meta["config"].as_str().unwrap()).unwrap();
        let cfg = GazelleConfig::from_json_str(&cfg).unwrap();
        let weights = [meta["weights"].as_str().unwrap()];
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::BF16, &dev).unwrap()
        };
        let lm = CausalLm::load(&cfg.text, vb.pp("language_model"), DType::BF16).unwrap();
        let t = candle_core::safetensors::load(case.join("case.safetensors"), &dev).unwrap();
        let embeds = t["embeds"].to_dtype(DType::BF16).unwrap();
        let expected: Vec<u32> = t["tokens"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let gaps: Vec<f32> = t["gaps"].to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let mut cache = lm
            .new_cache(embeds.dim(1).unwrap() + expected.len() + 1)
            .unwrap();
        let hidden = lm.forward_embeds(&embeds, &mut cache).unwrap();
        let mut last = lm.last_logits(&hidden).unwrap();
        let mut tokens = Vec::new();
        for _ in 0..expected.len() {
            let tok = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            tokens.push(tok);
            let h = lm
                .forward_embeds(&lm.embed(&[tok]).unwrap(), &mut cache)
                .unwrap();
            last = lm.last_logits(&h).unwrap();
        }
        let same = tokens
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| a == b)
            .count();
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        eprintln!(
            "{name}: {same} of {} greedy tokens equal PyTorch-CUDA bf16",
            expected.len()
        );
        if same < expected.len() {
            eprintln!(
                "  ours  {tokens:?}\n  torch {expected:?}\n  torch top-2 gap there: {}",
                gaps[same]
            );
            assert!(
                gaps[same] < 0.125,
                "{name}: diverged at token {same} without a logit tie"
            );
        }
    }
}
