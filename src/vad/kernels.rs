//! Which ONNX Runtime CPU kernels this machine gets, and so how far its model outputs may stand
//! from another machine's. ONNX Runtime's MLAS picks its matrix kernels by CPUID once per process
//! (`onnxruntime/core/mlas/lib/platform.cpp`), and the choice changes the numbers:
//! - the int8 kernels (Smart Turn v3.2 is quantized) fall in two arithmetic families. AVX2 and
//!   AVX-512 core multiply u8×s8 pairs with `vpmaddubsw`, whose 16-bit pair sums saturate; VNNI,
//!   AVX-VNNI, AMX and the SSE fallback accumulate every product exactly in 32 bits. A model
//!   whose activations reach the saturating range gives visibly different outputs between them.
//! - the f32 kernels (Silero VAD) differ only in summation order: last-bit differences.
//!
//! The flags come from CPUID, as MLAS reads them. `gazelle machine` prints this report, and a test that compares an ORT output against a stored
//! number names it in its failure message, so a report says which machine it came from.

use std::fmt;

/// The int8 GEMM kernel set MLAS uses for u8×s8 products on this CPU, in its own order of
/// preference (AMX first, SSE last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernels {
    Amx,
    Avx512Vnni,
    Avx512Core,
    AvxVnni,
    Avx2,
    Sse,
}

impl Int8Kernels {
    /// Whether this kernel set's u8×s8 pair sums saturate at 16 bits (`vpmaddubsw`), unlike the
    /// exact 32-bit accumulation of the others.
    pub fn saturates_pairs(self) -> bool {
        matches!(self, Int8Kernels::Avx512Core | Int8Kernels::Avx2)
    }

    fn name(self) -> &'static str {
        match self {
            Int8Kernels::Amx => "AMX",
            Int8Kernels::Avx512Vnni => "AVX-512 VNNI",
            Int8Kernels::Avx512Core => "AVX-512 core (vpmaddubsw)",
            Int8Kernels::AvxVnni => "AVX-VNNI",
            Int8Kernels::Avx2 => "AVX2 (vpmaddubsw)",
            Int8Kernels::Sse => "SSE",
        }
    }
}

/// What this machine's CPU is and which MLAS kernels it gets.
#[derive(Debug, Clone)]
pub struct CpuReport {
    pub model: String,
    /// The ISA flags MLAS's choice depends on, as `/proc/cpuinfo` names them, in that order.
    pub flags: Vec<&'static str>,
    pub int8: Int8Kernels,
    pub f32_gemm: &'static str,
}

/// The flags MLAS reads, in `/proc/cpuinfo` spelling.
const RELEVANT: [&str; 10] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
];

impl CpuReport {
    /// This machine: the flags from CPUID (with the operating system's support for the wider
    /// registers), as MLAS reads them, and the model name from `/proc/cpuinfo`.
    pub fn this_machine() -> CpuReport {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        CpuReport::from_flags(model, &detected())
    }

    /// The report for a CPU of this `model` with these flags (in `/proc/cpuinfo` spelling).
    pub fn from_flags(model: String, present: &[&str]) -> CpuReport {
        let flags: Vec<&'static str> = RELEVANT
            .into_iter()
            .filter(|f| present.contains(f))
            .collect();
        let has = |f: &str| flags.contains(&f);
        let avx2 = has("avx2") && has("fma");
        let avx512_core = has("avx512f") && has("avx512bw") && has("avx512dq") && has("avx512vl");
        // MLAS's own order: AVX2, then AVX-VNNI over it, then AVX-512 core (and VNNI) over
        // both, then AMX's dispatch over everything.
        let int8 = if avx2 && has("amx_tile") && has("amx_int8") {
            Int8Kernels::Amx
        } else if avx2 && avx512_core && has("avx512_vnni") {
            Int8Kernels::Avx512Vnni
        } else if avx2 && avx512_core {
            Int8Kernels::Avx512Core
        } else if avx2 && has("avx_vnni") {
            Int8Kernels::AvxVnni
        } else if avx2 {
            Int8Kernels::Avx2
        } else {
            Int8Kernels::Sse
        };
        let f32_gemm = if avx2 && has("avx512f") {
            "AVX-512F"
        } else if avx2 {
            "FMA3"
        } else {
            "SSE/AVX"
        };
        CpuReport {
            model: if model.is_empty() {
                "unknown".into()
            } else {
                model
            },
            flags,
            int8,
            f32_gemm,
        }
    }
}

/// The flags of [`RELEVANT`] this CPU has, from CPUID as MLAS reads it (so an emulator's CPU
/// model is seen as such, where `/proc/cpuinfo` would show the host's).
#[cfg(target_arch = "x86_64")]
fn detected() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    // AMX's detection macro is not stable yet: leaf 7's EDX bits 24 (AMX-TILE) and 25
    // (AMX-INT8), as MLAS reads them.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let amx = |bit: u32| leaf7.edx & (1 << bit) != 0;
    let found = [
        has!("avx2"),
        has!("fma"),
        has!("avx512f"),
        has!("avx512bw"),
        has!("avx512dq"),
        has!("avx512vl"),
        has!("avx512vnni"),
        has!("avxvnni"),
        amx(24),
        amx(25),
    ];
    RELEVANT
        .into_iter()
        .zip(found)
        .filter_map(|(name, yes)| yes.then_some(name))
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Vec<&'static str> {
    Vec::new()
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = if self.flags.is_empty() {
            "none of them".to_string()
        } else {
            self.flags.join(" ")
        };
        write!(
            f,
            "cpu: {}\nisa flags MLAS reads: {flags}\nORT int8 kernels: {} ({}); f32 GEMM: {}",
            self.model,
            self.int8.name(),
            if self.int8.saturates_pairs() {
                "16-bit pair sums saturate"
            } else {
                "exact 32-bit accumulation"
            },
            self.f32_gemm,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(flags: &str) -> CpuReport {
        let all = format!("fpu sse2 {flags}");
        let all: Vec<&str> = all.split_whitespace().collect();
        CpuReport::from_flags("Test CPU".into(), &all)
    }

    /// MLAS's dispatch order, one CPU generation per row.
    #[test]
    fn kernels_follow_mlas_dispatch_order() {
        let core = "avx2 fma avx512f avx512bw avx512dq avx512vl";
        for (flags, int8, f32_gemm) in [
            ("", Int8Kernels::Sse, "SSE/AVX"),
            ("avx2 fma", Int8Kernels::Avx2, "FMA3"),
            ("avx2 fma avx_vnni", Int8Kernels::AvxVnni, "FMA3"),
            (core, Int8Kernels::Avx512Core, "AVX-512F"),
            // AVX-512 core wins over AVX-VNNI, as in MLAS.
            (
                &format!("{core} avx_vnni"),
                Int8Kernels::Avx512Core,
                "AVX-512F",
            ),
            (
                &format!("{core} avx512_vnni"),
                Int8Kernels::Avx512Vnni,
                "AVX-512F",
            ),
            (
                &format!("{core} avx512_vnni amx_tile amx_int8"),
                Int8Kernels::Amx,
                "AVX-512F",
            ),
        ] {
            let r = report(flags);
            assert_eq!((r.int8, r.f32_gemm), (int8, f32_gemm), "flags {flags:?}");
            assert_eq!(r.model, "Test CPU");
        }
        assert!(Int8Kernels::Avx2.saturates_pairs());
        assert!(!Int8Kernels::Avx512Vnni.saturates_pairs());
        let shown = report("avx2 fma").to_string();
        assert!(
            shown.contains("AVX2 (vpmaddubsw)") && shown.contains("saturate"),
            "{shown}"
        );
    }
}
