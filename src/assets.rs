//! Finding the runtime files cargo cannot provide: the ONNX Runtime library, the Silero model, the
//! Smart Turn end-of-turn model and the espeak-ng voice. Each is looked up from an explicit flag, then an environment variable,
//! then the project cache that `scripts/setup` fills; a miss says how to get it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} not found (looked in: {tried}). Run scripts/setup to fetch it into the cache, or pass {flag} / set {env}")]
pub struct AssetError {
    pub what: &'static str,
    pub tried: String,
    pub flag: &'static str,
    pub env: &'static str,
}

/// The cache folder: `$GAZELLE_CACHE`, else `.cache/gazelle` under the working directory, else
/// the one beside the source tree the binary was built in.
pub(crate) fn cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("GAZELLE_CACHE") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join(".cache/gazelle"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/gazelle"));
    dirs.dedup();
    dirs
}

struct Lookup {
    what: &'static str,
    flag: &'static str,
    env: &'static [&'static str],
    /// Names inside the cache folder, first match wins.
    cached: fn(&Path) -> Option<PathBuf>,
    want_dir: bool,
}

fn find(l: &Lookup, explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    let ok = |p: &Path| if l.want_dir { p.is_dir() } else { p.is_file() };
    let mut tried = Vec::new();
    if let Some(p) = explicit {
        if ok(p) {
            return Ok(p.to_path_buf());
        }
        tried.push(format!("{} {}", l.flag, p.display()));
    }
    for var in l.env {
        if let Some(v) = std::env::var_os(var) {
            let p = PathBuf::from(v);
            if ok(&p) {
                return Ok(p);
            }
            tried.push(format!("${var}={}", p.display()));
        }
    }
    for dir in cache_dirs() {
        match (l.cached)(&dir) {
            Some(p) if ok(&p) => return Ok(p),
            _ => tried.push(dir.display().to_string()),
        }
    }
    Err(AssetError {
        what: l.what,
        tried: tried.join(", "),
        flag: l.flag,
        env: l.env[0],
    })
}

/// The ONNX Runtime shared library.
pub fn ort_lib(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        &Lookup {
            what: "the ONNX Runtime library",
            flag: "--ort-lib",
            env: &["GAZELLE_ORT_LIB", "ORT_DYLIB_PATH"],
            cached: |dir| {
                let dir = dir.join("onnxruntime");
                let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                    })
                    .collect();
                libs.sort();
                libs.pop()
            },
            want_dir: false,
        },
        explicit,
    )
}

/// The Silero VAD ONNX model.
pub fn vad_model(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        &Lookup {
            what: "the Silero VAD model",
            flag: "--vad-model",
            env: &["GAZELLE_VAD_MODEL"],
            cached: |dir| Some(dir.join("silero_vad.onnx")),
            want_dir: false,
        },
        explicit,
    )
}

/// The Smart Turn v3.2 end-of-turn ONNX model.
pub fn turn_model(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        &Lookup {
            what: "the Smart Turn end-of-turn model",
            flag: "--turn-model",
            env: &["GAZELLE_TURN_MODEL"],
            cached: |dir| Some(dir.join("smart-turn-v3.2-cpu.onnx")),
            want_dir: false,
        },
        explicit,
    )
}

/// The folder with libespeak-ng.so and espeak-ng-data/.
pub fn espeak_dir(explicit: Option<&Path>) -> Result<PathBuf, AssetError> {
    find(
        &Lookup {
            what: "the espeak-ng voice",
            flag: "--espeak-dir",
            env: &["GAZELLE_ESPEAK_DIR"],
            cached: |dir| Some(dir.join("espeak-ng")),
            want_dir: true,
        },
        explicit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_wins_and_misses_explain_themselves() {
        let dir = std::env::temp_dir().join(format!("gazelle-assets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("vad.onnx");
        std::fs::write(&model, b"x").unwrap();
        assert_eq!(vad_model(Some(&model)).unwrap(), model);
        let missing = dir.join("nope.onnx");
        let l = Lookup {
            what: "the thing",
            flag: "--thing",
            env: &["GAZELLE_TEST_NO_SUCH_VAR"],
            cached: |d| Some(d.join("no-such-file")),
            want_dir: false,
        };
        let err = find(&l, Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("the thing not found"), "{err}");
        assert!(err.contains("--thing"), "{err}");
        assert!(err.contains("nope.onnx"), "{err}");
        assert!(err.contains("scripts/setup"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
