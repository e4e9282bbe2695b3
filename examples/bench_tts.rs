//! Time-to-first-byte overhead of the speech providers (run through `scripts/bench-tts`). Each
//! provider speaks one-unit replies to its loopback peer (tests/tts_peers), which waits a fixed
//! delay before its first audio byte, as a model would. For every unit it takes the time from
//! handing the unit to the voice to the first audio chunk coming out, minus the peer's own time
//! from the request's arrival to its first byte: what is left is ours (request building,
//! loopback transport both ways, decoding, channel hops). Prints a table; `--json FILE` writes it.

#[path = "../tests/tts_peers/mod.rs"]
mod tts_peers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gazelle::audio::Encoding;
use gazelle::metrics::quantile;
use gazelle::metrics::Metrics;
use gazelle::tts::elevenlabs::{ElevenLabs, ElevenLabsConfig, ElevenLabsMode};
use gazelle::tts::http::ProviderTimeouts;
use gazelle::tts::openai::{OpenAi, OpenAiConfig};
use gazelle::tts::playht::{PlayHt, PlayHtConfig};
use gazelle::tts::xtts::{Xtts, XttsConfig};
use gazelle::tts::{OutputHint, Synthesizer, TextUnit};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tts_peers::{Behavior, Peer, KEY, USER};

#[derive(Parser)]
struct Args {
    /// Units per provider.
    #[arg(long, default_value_t = 200)]
    units: usize,
    /// The peer's own delay before its first byte, in milliseconds.
    #[arg(long, default_value_t = 20)]
    peer_delay_ms: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn build(which: &str, peer: &Peer) -> Box<dyn Synthesizer> {
    let m = Arc::new(Metrics::new());
    let timeouts = ProviderTimeouts::default();
    let key = "GAZELLE_BENCH_KEY".to_string();
    let eleven = |mode| {
        let c = ElevenLabsConfig {
            base_url: peer.url(),
            mode,
            api_key_env: key.clone(),
            timeouts,
            ..Default::default()
        };
        Box::new(ElevenLabs::new(&c, m.clone()).unwrap()) as Box<dyn Synthesizer>
    };
    match which {
        "elevenlabs multi" => eleven(ElevenLabsMode::Multi),
        "elevenlabs single" => eleven(ElevenLabsMode::Single),
        "elevenlabs http" => eleven(ElevenLabsMode::Http),
        "openai" => Box::new(
            OpenAi::new(
                &OpenAiConfig {
                    base_url: peer.url(),
                    api_key_env: key,
                    timeouts,
                    ..Default::default()
                },
                m,
            )
            .unwrap(),
        ),
        "playht" => Box::new(
            PlayHt::new(
                &PlayHtConfig {
                    base_url: peer.url(),
                    api_key_env: key,
                    user_id_env: "GAZELLE_BENCH_USER".into(),
                    timeouts,
                    ..Default::default()
                },
                m,
            )
            .unwrap(),
        ),
        "xtts" => Box::new(
            Xtts::new(
                &XttsConfig {
                    base_url: peer.url(),
                    studio_speaker: Some("Ana Florence".into()),
                    timeouts,
                    ..Default::default()
                },
                m,
            )
            .unwrap(),
        ),
        other => panic!("unknown provider {other}"),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    std::env::set_var("GAZELLE_BENCH_KEY", KEY);
    std::env::set_var("GAZELLE_BENCH_USER", USER);
    let delay = Duration::from_millis(args.peer_delay_ms);
    let mut rows = Vec::new();
    println!(
        "{:<18} {:>6} {:>10} {:>13} {:>13} {:>13}",
        "provider", "units", "peer ms", "overhead p50", "overhead p90", "overhead max"
    );
    for which in [
        "elevenlabs multi",
        "elevenlabs single",
        "elevenlabs http",
        "openai",
        "playht",
        "xtts",
    ] {
        let peer = tts_peers::start(vec![Behavior::Delay(delay)]).await;
        let synth = build(which, &peer);
        let mut voice = synth.open(OutputHint {
            sample_rate: 16_000,
            encoding: Encoding::Linear16,
        });
        // Let the warm connection (and XTTS' speaker) get ready, as they would during a call's
        // first user turn; the first reply is a warm-up and is not counted.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut client_ms = Vec::new();
        for i in 0..=args.units {
            let (tx, rx) = mpsc::channel(1);
            let mut audio = voice.synthesize(rx, CancellationToken::new());
            let t0 = Instant::now();
            tx.send(TextUnit {
                index: 0,
                text: format!("Benchmark sentence number {i}."),
            })
            .await
            .unwrap();
            drop(tx);
            let first = audio.recv().await.expect("audio").expect("no error");
            let t1 = Instant::now();
            assert!(!first.samples.is_empty());
            while audio.recv().await.is_some() {}
            if i > 0 {
                client_ms.push((t1 - t0).as_secs_f64() * 1e3);
            }
        }
        let stamps = peer.log.stamps.lock().unwrap().clone();
        let peer_ms: Vec<f64> = stamps[stamps.len() - args.units..]
            .iter()
            .map(|(a, f)| (*f - *a).as_secs_f64() * 1e3)
            .collect();
        let mut overhead: Vec<f64> = client_ms.iter().zip(&peer_ms).map(|(c, p)| c - p).collect();
        overhead.sort_by(f64::total_cmp);
        let mean_peer = peer_ms.iter().sum::<f64>() / peer_ms.len() as f64;
        let (p50, p90, max) = (
            quantile(&overhead, 0.5),
            quantile(&overhead, 0.9),
            *overhead.last().unwrap(),
        );
        println!(
            "{which:<18} {:>6} {mean_peer:>10.2} {p50:>13.3} {p90:>13.3} {max:>13.3}",
            args.units
        );
        rows.push(serde_json::json!({
            "provider": which, "units": args.units, "peer_first_byte_ms": mean_peer,
            "overhead_ms_p50": p50, "overhead_ms_p90": p90, "overhead_ms_max": max,
        }));
    }
    if let Some(path) = args.json {
        let doc = serde_json::json!({ "peer_delay_ms": args.peer_delay_ms, "rows": rows });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {}", path.display());
    }
}
