//! The local voice: libespeak-ng, loaded at run time from the PyPI `espeakng-loader` wheel that
//! `scripts/setup` unpacks (or any libespeak-ng with its data folder), so a fresh machine speaks
//! without network, keys or root. The library keeps global state and is not thread-safe, so one
//! engine thread owns it and serves every call's units in turn; espeak runs far faster than real
//! time, so the queue stays short.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_short, c_uint, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    AudioStream, OutputHint, SynthChunk, Synthesizer, TextUnit, TtsError, Voice, AUDIO_QUEUE,
};

const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
const POS_CHARACTER: c_int = 1;
const ESPEAK_CHARS_UTF8: c_uint = 1;
const ESPEAK_RATE: c_int = 1;
/// Milliseconds of audio per callback: the granularity of streaming and of cancellation.
const BUFFER_MS: c_int = 40;
/// Longest unit audio kept in the cache: 4 s at espeak's 22,050 Hz.
const MAX_CACHED_SAMPLES: usize = 4 * 22_050;
/// Units waiting for the engine thread; callers wait when it is full.
const ENGINE_QUEUE: usize = 256;

type SynthCallback = unsafe extern "C" fn(*mut c_short, c_int, *mut c_void) -> c_int;

struct Api {
    _lib: libloading::Library,
    set_voice: unsafe extern "C" fn(*const c_char) -> c_int,
    set_param: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int,
    synth: unsafe extern "C" fn(
        *const c_void,
        usize,
        c_uint,
        c_int,
        c_uint,
        c_uint,
        *mut c_uint,
        *mut c_void,
    ) -> c_int,
}

/// Settings of the local voice.
#[derive(Debug, Clone)]
pub struct EspeakConfig {
    /// The folder holding `libespeak-ng.so` and `espeak-ng-data/`.
    pub dir: PathBuf,
    /// An espeak-ng voice name, e.g. `en-us`.
    pub voice: String,
    /// Words per minute.
    pub rate_wpm: u32,
    /// Units whose audio is kept for reuse (0 turns the cache off).
    pub cache_units: usize,
}

struct Job {
    text: String,
    voice: CString,
    rate_wpm: u32,
    cancel: CancellationToken,
    /// Unbounded on purpose: the engine thread is shared by every call and must never wait on one
    /// call's consumer. A unit is at most a sentence, so one job's audio is bounded.
    out: mpsc::UnboundedSender<Vec<f32>>,
    /// Set on a voice probe: the engine answers whether the voice exists instead of speaking.
    checked: Option<std::sync::mpsc::Sender<Result<(), TtsError>>>,
}

fn spawn_engine(dir: &Path) -> Result<(mpsc::Sender<Job>, u32), TtsError> {
    let lib_path = dir.join("libespeak-ng.so");
    let data = dir.join("espeak-ng-data");
    if !lib_path.is_file() || !data.is_dir() {
        return Err(TtsError::Unavailable(format!(
            "{} or {} is missing; run scripts/setup to fetch the espeak-ng voice",
            lib_path.display(),
            data.display()
        )));
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (jobs, rx) = mpsc::channel::<Job>(ENGINE_QUEUE);
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("espeak".into())
        .spawn(move || match init(&lib_path, &dir) {
            Ok((api, rate)) => {
                let _ = ready_tx.send(Ok(rate));
                engine(api, rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| TtsError::Unavailable(e.to_string()))?;
    let rate = ready_rx
        .recv()
        .map_err(|_| TtsError::Unavailable("the espeak thread died".into()))??;
    Ok((jobs, rate))
}

/// The espeak-ng synthesizer; cheap to clone. Every instance in the process shares one engine
/// thread (the library has process-wide state); each carries its own voice and rate.
#[derive(Clone)]
pub struct Espeak {
    jobs: mpsc::Sender<Job>,
    sample_rate: u32,
    voice: CString,
    rate_wpm: u32,
    /// Audio of recently spoken units (greetings and stock phrases repeat across calls).
    cache: Arc<UnitCache>,
}

#[allow(clippy::type_complexity)]
/// A small FIFO cache of synthesized units, shared by the clones of one [`Espeak`].
struct UnitCache {
    capacity: usize,
    /// The audio by key, and the keys oldest first.
    inner: std::sync::Mutex<(HashMap<String, Arc<[f32]>>, VecDeque<String>)>,
}

impl UnitCache {
    fn get(&self, key: &str) -> Option<Arc<[f32]>> {
        if self.capacity == 0 {
            return None;
        }
        self.inner.lock().expect("cache lock").0.get(key).cloned()
    }

    fn put(&self, key: String, audio: Arc<[f32]>) {
        // Stock phrases are short; a long unit is unlikely to repeat and would let the cache
        // grow to `capacity` × the longest unit. This caps it at `capacity` × 4 s.
        if self.capacity == 0 || audio.len() > MAX_CACHED_SAMPLES {
            return;
        }
        let mut guard = self.inner.lock().expect("cache lock");
        let (map, order) = &mut *guard;
        if map.insert(key.clone(), audio).is_none() {
            order.push_back(key);
        }
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

/// The process's engine: its queue and output rate, or why it could not start.
static ENGINE: std::sync::OnceLock<Result<(mpsc::Sender<Job>, u32), TtsError>> =
    std::sync::OnceLock::new();

thread_local! {
    /// The job the engine thread is speaking; the C callback writes into it.
    static CURRENT: RefCell<Option<(mpsc::UnboundedSender<Vec<f32>>, CancellationToken)>> =
        const { RefCell::new(None) };
}

unsafe extern "C" fn on_audio(wav: *mut c_short, n: c_int, _events: *mut c_void) -> c_int {
    CURRENT.with(|cur| {
        let cur = cur.borrow();
        let Some((out, cancel)) = cur.as_ref() else {
            return 1;
        };
        if cancel.is_cancelled() {
            return 1; // tells espeak to abort this utterance
        }
        if !wav.is_null() && n > 0 {
            // SAFETY: espeak hands us `n` valid samples for the duration of the callback.
            let pcm = unsafe { std::slice::from_raw_parts(wav, n as usize) };
            let samples = pcm
                .iter()
                .map(|&s| crate::audio::pcm::i16_to_f32(s))
                .collect();
            if out.send(samples).is_err() {
                return 1;
            }
        }
        0
    })
}

impl Espeak {
    /// Starts the engine thread on first use (later calls reuse it, whatever their `dir`) and
    /// checks the voice.
    pub fn start(config: &EspeakConfig) -> Result<Self, TtsError> {
        let (jobs, sample_rate) = ENGINE.get_or_init(|| spawn_engine(&config.dir)).clone()?;
        let voice = CString::new(config.voice.as_str())
            .map_err(|_| TtsError::Unavailable("voice names cannot contain NUL".into()))?;
        let (ok_tx, ok_rx) = std::sync::mpsc::channel();
        let probe = Job {
            text: String::new(),
            voice: voice.clone(),
            rate_wpm: config.rate_wpm,
            cancel: CancellationToken::new(),
            out: mpsc::unbounded_channel().0,
            checked: Some(ok_tx),
        };
        // At start-up the queue is empty; `try_send` also works inside an async runtime.
        jobs.try_send(probe).map_err(|_| gone())?;
        ok_rx.recv().map_err(|_| gone())??;
        let cache = Arc::new(UnitCache {
            capacity: config.cache_units,
            inner: Default::default(),
        });
        Ok(Espeak {
            jobs,
            sample_rate,
            voice,
            rate_wpm: config.rate_wpm,
            cache,
        })
    }

    /// The rate of the audio espeak-ng produces (22 050 Hz).
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Speaks one text to completion (for tests and tools).
    pub async fn speak(&self, text: &str) -> Result<Vec<f32>, TtsError> {
        let (out, mut rx) = mpsc::unbounded_channel();
        let job = self.job(text.to_string(), CancellationToken::new(), out);
        self.jobs.send(job).await.map_err(|_| gone())?;
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            all.extend(chunk);
        }
        Ok(all)
    }
}

impl Espeak {
    fn job(
        &self,
        text: String,
        cancel: CancellationToken,
        out: mpsc::UnboundedSender<Vec<f32>>,
    ) -> Job {
        Job {
            text,
            voice: self.voice.clone(),
            rate_wpm: self.rate_wpm,
            cancel,
            out,
            checked: None,
        }
    }
}

fn gone() -> TtsError {
    TtsError::Unavailable("the espeak engine thread has stopped".into())
}

fn init(lib_path: &Path, dir: &Path) -> Result<(Api, u32), TtsError> {
    let fail = |what: &str, e: String| TtsError::Unavailable(format!("{what}: {e}"));
    // SAFETY: loading a C library whose symbols we call with their documented signatures.
    unsafe {
        let lib = libloading::Library::new(lib_path).map_err(|e| {
            fail(
                &format!("cannot load {}", lib_path.display()),
                e.to_string(),
            )
        })?;
        let initialize: libloading::Symbol<
            unsafe extern "C" fn(c_int, c_int, *const c_char, c_int) -> c_int,
        > = lib
            .get(b"espeak_Initialize")
            .map_err(|e| fail("espeak_Initialize", e.to_string()))?;
        let set_cb: libloading::Symbol<unsafe extern "C" fn(SynthCallback)> = lib
            .get(b"espeak_SetSynthCallback")
            .map_err(|e| fail("espeak_SetSynthCallback", e.to_string()))?;
        let set_voice: libloading::Symbol<unsafe extern "C" fn(*const c_char) -> c_int> = lib
            .get(b"espeak_SetVoiceByName")
            .map_err(|e| fail("espeak_SetVoiceByName", e.to_string()))?;
        let set_param: libloading::Symbol<unsafe extern "C" fn(c_int, c_int, c_int) -> c_int> = lib
            .get(b"espeak_SetParameter")
            .map_err(|e| fail("espeak_SetParameter", e.to_string()))?;
        let synth = *lib
            .get(b"espeak_Synth")
            .map_err(|e| fail("espeak_Synth", e.to_string()))?;
        let path = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| fail("data path", e.to_string()))?;
        let rate = initialize(AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, path.as_ptr(), 0);
        if rate <= 0 {
            return Err(fail("espeak_Initialize", format!("returned {rate}")));
        }
        set_cb(on_audio);
        let set_voice = *set_voice;
        let set_param = *set_param;
        Ok((
            Api {
                _lib: lib,
                synth,
                set_voice,
                set_param,
            },
            rate as u32,
        ))
    }
}

fn engine(api: Api, mut rx: mpsc::Receiver<Job>) {
    // The voice and rate espeak is set to, to skip reloading them for every unit.
    let mut current: Option<(CString, u32)> = None;
    while let Some(job) = rx.blocking_recv() {
        if job.cancel.is_cancelled() {
            continue;
        }
        if current.as_ref() != Some(&(job.voice.clone(), job.rate_wpm)) {
            // SAFETY: valid NUL-terminated strings; called only from this thread.
            let ok = unsafe { (api.set_voice)(job.voice.as_ptr()) } == 0;
            if ok {
                unsafe { (api.set_param)(ESPEAK_RATE, job.rate_wpm as c_int, 0) };
                current = Some((job.voice.clone(), job.rate_wpm));
            } else {
                current = None;
            }
            if let Some(tx) = &job.checked {
                let _ = tx.send(if ok {
                    Ok(())
                } else {
                    Err(TtsError::Unavailable(format!(
                        "espeak-ng has no voice named {:?}",
                        job.voice.to_string_lossy()
                    )))
                });
                continue;
            }
            if !ok {
                continue; // the sender drops: an empty unit
            }
        }
        if let Some(tx) = &job.checked {
            let _ = tx.send(Ok(()));
            continue;
        }
        let Ok(text) = CString::new(job.text.replace('\0', " ")) else {
            continue;
        };
        CURRENT.with(|c| *c.borrow_mut() = Some((job.out, job.cancel)));
        // SAFETY: `text` is a valid NUL-terminated UTF-8 string that outlives the call; in
        // synchronous mode espeak returns only after the last callback.
        unsafe {
            (api.synth)(
                text.as_ptr() as *const c_void,
                text.as_bytes_with_nul().len(),
                0,
                POS_CHARACTER,
                0,
                ESPEAK_CHARS_UTF8,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
        // Dropping the sender ends the job's stream.
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}

impl Synthesizer for Espeak {
    fn name(&self) -> &str {
        "espeak"
    }

    fn open(&self, _hint: OutputHint) -> Box<dyn Voice> {
        Box::new(self.clone())
    }
}

impl Voice for Espeak {
    fn synthesize(
        &mut self,
        mut units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        let (tx, rx) = mpsc::channel(AUDIO_QUEUE);
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                let unit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    u = units.recv() => match u { Some(u) => u, None => return },
                };
                let key = engine.cache_key(&unit.text);
                if let Some(audio) = engine.cache.get(&key) {
                    if !engine.send_cached(&tx, unit.index, &audio).await {
                        return;
                    }
                    continue;
                }
                let (out, mut audio) = mpsc::unbounded_channel();
                let job = engine.job(unit.text.clone(), cancel.clone(), out);
                if engine.jobs.send(job).await.is_err() {
                    let _ = tx.send(Err(gone())).await;
                    return;
                }
                let mut whole = Vec::new();
                let mut pending: Option<Vec<f32>> = None;
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = audio.recv() => n,
                    };
                    // Hold one chunk back so the last one can carry `unit_done`.
                    let done = next.is_none();
                    if pending.is_some() || done {
                        let samples = pending.take().unwrap_or_default();
                        whole.extend_from_slice(&samples);
                        let chunk = SynthChunk {
                            unit: unit.index,
                            samples,
                            sample_rate: engine.sample_rate,
                            unit_done: done,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    match next {
                        Some(s) => pending = Some(s),
                        None => break,
                    }
                }
                if !cancel.is_cancelled() {
                    engine.cache.put(key, whole.into());
                }
            }
        });
        rx
    }
}

impl Espeak {
    fn cache_key(&self, text: &str) -> String {
        format!(
            "{}\0{}\0{}",
            self.voice.to_string_lossy(),
            self.rate_wpm,
            text
        )
    }

    /// Streams a cached unit in engine-sized chunks. False when the receiver is gone.
    async fn send_cached(
        &self,
        tx: &mpsc::Sender<Result<SynthChunk, TtsError>>,
        unit: usize,
        audio: &[f32],
    ) -> bool {
        let step = (self.sample_rate * BUFFER_MS as u32 / 1000) as usize;
        let mut chunks = audio.chunks(step).peekable();
        if chunks.peek().is_none() {
            let chunk = SynthChunk {
                unit,
                samples: Vec::new(),
                sample_rate: self.sample_rate,
                unit_done: true,
            };
            return tx.send(Ok(chunk)).await.is_ok();
        }
        while let Some(c) = chunks.next() {
            let chunk = SynthChunk {
                unit,
                samples: c.to_vec(),
                sample_rate: self.sample_rate,
                unit_done: chunks.peek().is_none(),
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return false;
            }
        }
        true
    }
}
