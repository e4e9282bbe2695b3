//! A fuzzer for the decoders that read what callers send (test builds only): a small,
//! deterministic, structure-aware mutation engine on stable Rust. Each target starts from seeds
//! (valid messages, files and texts), mutates them (bit flips, interesting numbers, splices,
//! truncation, and JSON-aware edits of values), runs the decoder under `catch_unwind`, and
//! checks the target's invariants (no panic, bounded output). Crashing inputs are written to
//! `target/fuzz-crashes/` so they can be replayed.
//!
//! `cargo test --lib fuzz` runs a short pass in CI; `scripts/fuzz` runs a long one in release
//! (`GAZELLE_FUZZ_RUNS` executions per target, a table, and JSON).
//!
//! A nightly toolchain (for `cargo fuzz`) cannot be installed here, so coverage guidance is
//! traded for structure: the mutators know JSON, WAV headers and base64.

mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// SplitMix64: small, fast and good enough to drive mutations reproducibly.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Numbers that break parsers and arithmetic.
const INTERESTING: &[&str] = &[
    "0",
    "1",
    "-1",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "-0",
    "0.5",
    "NaN",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
];

/// Byte-level mutations.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        match rng.below(9) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = *rng.pick(&[0u8, 0xFF, 0x7F, 0x80, b'"', b'\\', b'{', b'}', b'\n']);
            }
            2 => {
                let i = rng.below(data.len() + 1);
                let len = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if !data.is_empty() => {
                let a = rng.below(data.len());
                let b = (a + 1 + rng.below(32)).min(data.len());
                data.drain(a..b);
            }
            4 if !data.is_empty() => {
                // Repeat a slice: long runs, nested brackets, repeated headers.
                let a = rng.below(data.len());
                let b = (a + 1 + rng.below(64)).min(data.len());
                let slice = data[a..b].to_vec();
                let times = 1 + rng.below(64);
                for _ in 0..times {
                    data.splice(b..b, slice.iter().copied());
                }
            }
            5 if !seeds.is_empty() => {
                let other = rng.pick(seeds);
                let i = rng.below(data.len() + 1);
                let a = rng.below(other.len() + 1);
                let b = a + rng.below(other.len() - a + 1);
                data.splice(i.., other[a..b].iter().copied());
            }
            6 => data.truncate(rng.below(data.len() + 1)),
            7 if data.len() >= 4 => {
                // An interesting little-endian u32 (WAV sizes, rates, channel counts).
                let i = rng.below(data.len() - 3);
                let v: u32 = *rng.pick(&[0, 1, 2, 8, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 96_000]);
                data[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                // Replace a run of digits with an interesting number.
                let digits: Vec<usize> = (0..data.len())
                    .filter(|&i| data[i].is_ascii_digit())
                    .collect();
                if let Some(&i) = digits.get(rng.below(digits.len().max(1))) {
                    let end = (i..data.len())
                        .find(|&j| !data[j].is_ascii_digit())
                        .unwrap_or(data.len());
                    data.splice(i..end, rng.pick(INTERESTING).bytes());
                }
            }
        }
    }
}

/// JSON-aware mutations: parse, change one value somewhere, print again.
fn mutate_json(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(data).ok()?;
    // Pick a node a few levels down, as a JSON pointer.
    let mut pointer = String::new();
    let mut node = &v;
    for _ in 0..rng.below(4) {
        let (step, next) = match node {
            serde_json::Value::Object(o) if !o.is_empty() => {
                let (k, next) = o.iter().nth(rng.below(o.len()))?;
                (k.replace('~', "~0").replace('/', "~1"), next)
            }
            serde_json::Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                (i.to_string(), &a[i])
            }
            _ => break,
        };
        pointer.push('/');
        pointer.push_str(&step);
        node = next;
    }
    let old = node.clone();
    let replacement: serde_json::Value = match rng.below(8) {
        0 => {
            let number: &&str = rng.pick(INTERESTING);
            serde_json::from_str(number).unwrap_or(serde_json::Value::Null)
        }
        1 => serde_json::Value::String("x".repeat(rng.below(5_000))),
        2 => serde_json::Value::String(
            ["é", "日本", "😀", "\n", "\u{202E}", "\0", "\"", " "]
                .iter()
                .cycle()
                .skip(rng.below(8))
                .take(rng.below(200))
                .copied()
                .collect(),
        ),
        3 => serde_json::json!([old.clone(), old]),
        4 => serde_json::json!({"nested": old}),
        5 => serde_json::Value::from(rng.next() as u32),
        6 => serde_json::Value::from(-(rng.below(1 << 20) as i64)),
        _ => {
            let mut old = old;
            if let serde_json::Value::Object(o) = &mut old {
                let keys: Vec<String> = o.keys().cloned().collect();
                if let Some(k) = keys.get(rng.below(keys.len().max(1))) {
                    o.remove(k);
                }
            }
            old
        }
    };
    *v.pointer_mut(&pointer)? = replacement;
    Some(serde_json::to_vec(&v).expect("values print"))
}

/// A decoder under test: seeds, and a function that must not panic.
pub(crate) struct Target {
    pub name: &'static str,
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; returns whether it got past the first parse (so the report can tell
    /// how much of the fuzzing reached the decoders), or `Err` when an invariant other than "no
    /// panic" breaks.
    pub run: fn(&[u8]) -> Result<bool, String>,
    /// Whether inputs are JSON, so JSON-aware mutations apply.
    pub json: bool,
}

/// What one target's run found.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Report {
    pub target: &'static str,
    pub executions: u64,
    /// Inputs that got past the first parse into the decoder proper.
    pub deep: u64,
    pub crashes: u64,
    pub invariant_failures: u64,
    pub seconds: f64,
    pub first_failure: Option<String>,
}

/// Runs `target` for `executions` inputs from `seed`.
pub(crate) fn fuzz(target: &Target, executions: u64, seed: u64) -> Report {
    let seeds = (target.seeds)();
    let mut rng = Rng::new(seed ^ target.name.len() as u64);
    let started = Instant::now();
    let mut report = Report {
        target: target.name,
        executions: 0,
        deep: 0,
        crashes: 0,
        invariant_failures: 0,
        seconds: 0.0,
        first_failure: None,
    };
    // A pool that grows with inputs the decoders accepted, so mutations build on them.
    let mut pool = seeds.clone();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..executions {
        let base = rng.pick(&pool).clone();
        let input = if target.json && rng.chance(2) {
            mutate_json(&mut rng, &base).unwrap_or(base)
        } else {
            let mut d = base;
            mutate_bytes(&mut rng, &mut d, &seeds);
            d
        };
        // Keep inputs small enough that a run stays fast (the frame limits cap real ones).
        let input = if input.len() > 256 * 1024 {
            input[..256 * 1024].to_vec()
        } else {
            input
        };
        report.executions += 1;
        match catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(Ok(deep)) => {
                if deep {
                    report.deep += 1;
                    if pool.len() < 512 && rng.chance(64) {
                        pool.push(input);
                    }
                }
            }
            Ok(Err(why)) => {
                report.invariant_failures += 1;
                record(&mut report, target.name, &input, &why);
            }
            Err(panic) => {
                report.crashes += 1;
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                record(&mut report, target.name, &input, &format!("panic: {why}"));
            }
        }
    }
    std::panic::set_hook(previous_hook);
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn record(report: &mut Report, target: &str, input: &[u8], why: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let n = report.crashes + report.invariant_failures;
    let path = dir.join(format!("{target}-{n}.bin"));
    let _ = std::fs::write(&path, input);
    if report.first_failure.is_none() {
        report.first_failure = Some(format!("{why} (input in {})", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Executions per target: a short pass by default (CI), `GAZELLE_FUZZ_RUNS` for a long one.
    fn runs() -> u64 {
        std::env::var("GAZELLE_FUZZ_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000)
    }

    #[test]
    fn every_decoder_survives_mutated_input() {
        let runs = runs();
        let seed: u64 = std::env::var("GAZELLE_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let reports: Vec<Report> = targets::ALL.iter().map(|t| fuzz(t, runs, seed)).collect();
        eprintln!(
            "{:<18} {:>12} {:>7} {:>8} {:>10} {:>9} {:>12}",
            "target", "executions", "deep %", "crashes", "invariant", "seconds", "exec/s"
        );
        for r in &reports {
            eprintln!(
                "{:<18} {:>12} {:>7.1} {:>8} {:>10} {:>9.1} {:>12.0}",
                r.target,
                r.executions,
                r.deep as f64 * 100.0 / r.executions.max(1) as f64,
                r.crashes,
                r.invariant_failures,
                r.seconds,
                r.executions as f64 / r.seconds.max(1e-9)
            );
        }
        let total: u64 = reports.iter().map(|r| r.executions).sum();
        eprintln!("total executions: {total}, seed {seed}");
        if let Ok(path) = std::env::var("GAZELLE_FUZZ_JSON") {
            let json = serde_json::json!({"seed": seed, "runs_per_target": runs, "total_executions": total, "targets": reports});
            std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        }
        let failed: Vec<&Report> = reports
            .iter()
            .filter(|r| r.crashes + r.invariant_failures > 0)
            .collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn mutations_are_reproducible_and_varied() {
        let seeds = vec![b"{\"type\":\"websocket_audio\",\"data\":\"AAAA\"}".to_vec()];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| {
                    let mut d = seeds[0].clone();
                    mutate_bytes(&mut rng, &mut d, &seeds);
                    d
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let distinct: std::collections::HashSet<_> = run(7).into_iter().collect();
        assert!(distinct.len() > 40);
        let mut rng = Rng::new(3);
        let changed = (0..50)
            .filter_map(|_| mutate_json(&mut rng, &seeds[0]))
            .filter(|m| m != &seeds[0])
            .count();
        assert!(changed > 25, "{changed}");
    }
}
