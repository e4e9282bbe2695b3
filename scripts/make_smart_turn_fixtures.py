#!/usr/bin/env python3
"""Build the Smart Turn v3.2 reference fixtures in tests/fixtures/smart-turn/.

The Rust end-of-turn detector (Smart Turn v3.2, an int8 QDQ ONNX model of Whisper-tiny's encoder
with a classifier head) is tested against these files. They are committed, so Python is only
needed to regenerate them. The model itself is not committed; it ships in the PyPI wheel
`pipecat-ai==1.14.0` (BSD-2-Clause) as pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx.

Set-up (no torch needed; transformers then uses its numpy feature extractor):

    python3 -m venv /work/venv-st
    /work/venv-st/bin/pip install onnxruntime==1.31.1 numpy transformers==4.57.1 soundfile
    python3 -m pip download --no-deps --only-binary=:all: pipecat-ai==1.14.0 -d /tmp/pipecat

Recompute reference.json and features.f32 from the committed clips:

    /work/venv-st/bin/python scripts/make_smart_turn_fixtures.py \
        --pipecat-wheel /tmp/pipecat/pipecat_ai-1.14.0-py3-none-any.whl

(`--model PATH` instead of `--pipecat-wheel` uses an already extracted .onnx; with the wheel the
script also cross-checks transformers' features against pipecat's own numpy port of them.
`--time` also times one model run with 1 and 2 intra-op threads, median of 20.)

Rebuild the clips themselves from their source packages first (sox must be installed):

    apt-get download asterisk-core-sounds-en-wav          # Debian bookworm, 1.6.1-1
    curl -LO https://files.pythonhosted.org/packages/61/e7/13e0e787ff467218de880310d79cba14424f13b87171ac44af0bde1e428c/pocketsphinx-5.1.1.tar.gz
    /work/venv-st/bin/python scripts/make_smart_turn_fixtures.py --pipecat-wheel WHEEL \
        --clips-from asterisk-core-sounds-en-wav_1.6.1-1_all.deb pocketsphinx-5.1.1.tar.gz

What the references reproduce is pipecat 1.14's LocalSmartTurnAnalyzerV3._predict_endpoint for
16 kHz input: int16 PCM / 32768 -> keep the last 8 s (128000 samples) or left-pad with zeros to
8 s -> WhisperFeatureExtractor(chunk_length=8)(audio, sampling_rate=16000, padding="max_length",
max_length=128000, truncation=True, do_normalize=True) -> [1, 80, 800] float32 "input_features"
-> onnxruntime (sequential, 1 inter-op thread, ORT_ENABLE_ALL) -> output "logits" [1, 1], which
is already a sigmoid probability of "turn complete"; pipecat calls it complete when > 0.5.
"""

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import wave
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "smart-turn")

MODEL_MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
PIPECAT_FEATURES_MEMBER = "pipecat/audio/turn/smart_turn/_whisper_features.py"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
MODEL_BYTES = 8679182

SAMPLE_RATE = 16000
WINDOW = 8 * SAMPLE_RATE  # 128000 samples
N_MELS = 80
N_FRAMES = 800
THRESHOLD = 0.5

# The clip whose whole feature matrix is written to features.f32.
FEATURES_CLIP = "sense-0880-full.wav"

LIBRIVOX = "pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-{}.wav"
ASTERISK = "./usr/share/asterisk/sounds/en_US_f_Allison/{}.wav"
ASTERISK_COPYRIGHT = "./usr/share/doc/asterisk-core-sounds-en-wav/copyright"
POCKETSPHINX_LICENSE = "pocketsphinx-5.1.1/LICENSE"

# origin: "librivox" and "pocketsphinx" come from the pocketsphinx 5.1.1 sdist, "asterisk" from the
# Debian asterisk-core-sounds-en-wav 1.6.1-1 package. cut_s: keep audio up to this time (seconds,
# the end of the last kept word by a pocketsphinx forced alignment), then 5 ms fade-out and the
# recording's own first 0.2 s (room tone before the first word) appended as trailing silence.
CLIPS = [
    dict(file="sense-0870-full.wav", origin="librivox", member=LIBRIVOX.format("0870"),
         text="and mister john dashwood had then leisure to consider how much there might be "
              "prudently in his power to do for them",
         complete=True),
    dict(file="sense-0880-full.wav", origin="librivox", member=LIBRIVOX.format("0880"),
         text="he was not an ill disposed young man", complete=True),
    dict(file="sense-0890-cut.wav", origin="librivox", member=LIBRIVOX.format("0890"),
         text="unless to be rather cold hearted and [cut; the recording goes on: rather selfish "
              "is to be ill disposed]",
         complete=False, cut_s=2.39),
    dict(file="sense-0920-cut.wav", origin="librivox", member=LIBRIVOX.format("0920"),
         text="had he married a more amiable woman [cut; the recording goes on: he might have "
              "been made still more respectable than he was]",
         complete=False, cut_s=2.49),
    dict(file="goforward.wav", origin="pocketsphinx",
         member="pocketsphinx-5.1.1/test/data/goforward.raw",
         text="go forward ten meters", complete=True),
    dict(file="vm-savefolder.wav", origin="asterisk", member=ASTERISK.format("vm-savefolder"),
         text="Which folder should I save the message to?", complete=True),
    dict(file="agent-pass.wav", origin="asterisk", member=ASTERISK.format("agent-pass"),
         text="Please enter your password followed by the pound key.", complete=True),
    dict(file="conf-thereare.wav", origin="asterisk", member=ASTERISK.format("conf-thereare"),
         text="There are currently", complete=False),
    dict(file="confbridge-leave-in.wav", origin="asterisk",
         member=ASTERISK.format("confbridge-leave-in"),
         text="To leave the conference...", complete=False),
]

# Cases the references are computed for: every clip alone, plus clips joined end to end (longer
# than 8 s, so the "keep the last 8 s" branch is exercised).
CONCATS = [
    dict(name="sense-0870+0880", files=["sense-0870-full.wav", "sense-0880-full.wav"],
         complete=True),
]


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def read_wav_int16(path):
    with wave.open(path, "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2 or w.getframerate() != SAMPLE_RATE:
            raise SystemExit(f"{path}: want 16 kHz mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def write_wav_int16(path, samples):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


# ----------------------------------------------------------------------------------------------
# Clip building


def deb_members(deb_path, names):
    """Return {name: bytes} for members of a .deb's data archive (via dpkg-deb)."""
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", deb_path], check=True, capture_output=True
    ).stdout
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for name in names:
            out[name] = tf.extractfile(name).read()
    return out


def tar_members(tar_path, names):
    out = {}
    with tarfile.open(tar_path) as tf:
        for name in names:
            out[name] = tf.extractfile(name).read()
    return out


def wav_bytes_to_int16(data):
    with wave.open(io.BytesIO(data), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def sox_to_16k(data):
    """Resample a WAV (bytes) to 16 kHz 16-bit mono with sox's very-high-quality rate, no dither."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.wav")
        dst = os.path.join(tmp, "out.wav")
        with open(src, "wb") as f:
            f.write(data)
        subprocess.run(
            ["sox", "-D", src, "-b", "16", "-c", "1", dst, "rate", "-v", str(SAMPLE_RATE)],
            check=True,
        )
        with open(dst, "rb") as f:
            rate, samples = wav_bytes_to_int16(f.read())
    assert rate == SAMPLE_RATE
    return samples


def cut_with_room_tone(samples, cut_s):
    """Keep samples[:cut], fade the last 5 ms out, append the recording's first 0.2 s."""
    cut = int(round(cut_s * SAMPLE_RATE))
    head = samples[:cut].astype(np.float64)
    fade = int(0.005 * SAMPLE_RATE)
    head[-fade:] *= 0.5 * (1.0 + np.cos(np.pi * np.arange(1, fade + 1) / fade))
    tail = samples[: int(0.2 * SAMPLE_RATE)].astype(np.float64)
    out = np.concatenate([head, tail])
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def build_clips(deb_path, sdist_path):
    with open(deb_path, "rb") as f:
        deb_sha = sha256_bytes(f.read())
    with open(sdist_path, "rb") as f:
        sdist_sha = sha256_bytes(f.read())
    print(f"asterisk deb {os.path.basename(deb_path)} sha256 {deb_sha}")
    print(f"pocketsphinx sdist {os.path.basename(sdist_path)} sha256 {sdist_sha}")
    ast = deb_members(deb_path, [c["member"] for c in CLIPS if c["origin"] == "asterisk"]
                      + [ASTERISK_COPYRIGHT])
    ps = tar_members(sdist_path, [c["member"] for c in CLIPS if c["origin"] != "asterisk"]
                     + [POCKETSPHINX_LICENSE])
    os.makedirs(OUT_DIR, exist_ok=True)
    # The licences travel with the clips, copied unchanged.
    for data, name in ((ast[ASTERISK_COPYRIGHT], "LICENSE.asterisk-core-sounds"),
                       (ps[POCKETSPHINX_LICENSE], "LICENSE.pocketsphinx")):
        with open(os.path.join(OUT_DIR, name), "wb") as f:
            f.write(data)
    for clip in CLIPS:
        if clip["origin"] == "asterisk":
            samples = sox_to_16k(ast[clip["member"]])
        elif clip["member"].endswith(".raw"):
            samples = np.frombuffer(ps[clip["member"]], dtype="<i2").copy()
        else:
            rate, samples = wav_bytes_to_int16(ps[clip["member"]])
            assert rate == SAMPLE_RATE
        if clip.get("cut_s"):
            samples = cut_with_room_tone(samples, clip["cut_s"])
        write_wav_int16(os.path.join(OUT_DIR, clip["file"]), samples)
        print(f"wrote {clip['file']}: {len(samples)} samples")


# ----------------------------------------------------------------------------------------------
# References


def pipecat_window(audio):
    """pipecat's truncate_audio_to_last_n_seconds(n=8): keep the end, or left-pad with zeros."""
    if len(audio) > WINDOW:
        return audio[-WINDOW:], 0, len(audio) - WINDOW
    pad = WINDOW - len(audio)
    return np.pad(audio, (pad, 0), mode="constant", constant_values=0), pad, 0


def load_model(args):
    if args.pipecat_wheel:
        with zipfile.ZipFile(args.pipecat_wheel) as z:
            model = z.read(MODEL_MEMBER)
            features_src = z.read(PIPECAT_FEATURES_MEMBER).decode()
        # pipecat's numpy port of the extractor, loaded only to cross-check against transformers.
        mod = types.ModuleType("pipecat_whisper_features")
        exec(compile(features_src, PIPECAT_FEATURES_MEMBER, "exec"), mod.__dict__)
        pipecat_features = mod.compute_whisper_log_mel_features
    else:
        with open(args.model, "rb") as f:
            model = f.read()
        pipecat_features = None
    digest = sha256_bytes(model)
    if digest != MODEL_SHA256 or len(model) != MODEL_BYTES:
        raise SystemExit(f"unexpected model: sha256 {digest}, {len(model)} bytes")
    return model, pipecat_features


def make_session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Exact int8 products on every x86-64 CPU, as the server's sessions run (src/vad/silero.rs
    # sets it where the kernels would saturate): without it AVX2 and AVX-512-without-VNNI CPUs
    # saturate u8*s8 pair sums and give other probabilities than VNNI CPUs.
    so.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def stats(a):
    a64 = a.astype(np.float64)
    return dict(min=float(a64.min()), max=float(a64.max()), mean=float(a64.mean()),
                std=float(a64.std()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipecat-wheel", help="pipecat_ai-1.14.0-py3-none-any.whl")
    src.add_argument("--model", help="smart-turn-v3.2-cpu.onnx")
    ap.add_argument("--clips-from", nargs=2, metavar=("ASTERISK_DEB", "POCKETSPHINX_SDIST"),
                    help="rebuild the WAV clips from their source packages first")
    ap.add_argument("--time", action="store_true", help="time the model (1 and 2 threads)")
    args = ap.parse_args()

    if args.clips_from:
        build_clips(*args.clips_from)

    from transformers import WhisperFeatureExtractor
    import transformers
    import onnxruntime

    model, pipecat_features = load_model(args)
    session = make_session(model, 1)
    (inp,) = session.get_inputs()
    (outp,) = session.get_outputs()
    assert inp.name == "input_features" and inp.shape[1:] == [N_MELS, N_FRAMES], inp
    assert outp.name == "logits" and outp.shape[1:] == [1], outp

    fe = WhisperFeatureExtractor(chunk_length=8)  # feature_size 80, hop 160, n_fft 400, 16 kHz

    audio = {c["file"]: read_wav_int16(os.path.join(OUT_DIR, c["file"])) for c in CLIPS}
    cases = [dict(name=c["file"], files=[c["file"]], complete=c["complete"]) for c in CLIPS]
    cases += CONCATS

    results = []
    for case in cases:
        pcm = np.concatenate([audio[f] for f in case["files"]])
        x = pcm.astype(np.float32) / 32768.0  # pipecat: int16 -> float32 / 32768
        win, pad, dropped = pipecat_window(x)
        feats = fe(win, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length",
                   max_length=WINDOW, truncation=True, do_normalize=True).input_features
        assert feats.shape == (1, N_MELS, N_FRAMES) and feats.dtype == np.float32
        prob = float(session.run(None, {"input_features": feats})[0][0].item())
        entry = dict(
            files=case["files"],
            samples=int(len(pcm)),
            left_pad_samples=int(pad),
            dropped_leading_samples=int(dropped),
            expected_complete=case["complete"],
            probability=prob,
            pipecat_complete=prob > THRESHOLD,
            waveform_mean=float(win.mean()),
            waveform_std=float(np.sqrt(win.var() + 1e-7)),
            features=stats(feats[0]),
            features_first_frame_mean=float(feats[0, :, 0].astype(np.float64).mean()),
            features_last_frame_mean=float(feats[0, :, -1].astype(np.float64).mean()),
        )
        if len(case["files"]) == 1:
            clip = next(c for c in CLIPS if c["file"] == case["files"][0])
            entry["file"] = clip["file"]
            entry["text"] = clip["text"]
        else:
            entry["name"] = case["name"]
        if pipecat_features is not None:
            pf = pipecat_features(win, do_normalize=True)[None]
            entry["pipecat_numpy_features_max_abs_diff"] = float(np.abs(pf - feats).max())
            entry["pipecat_numpy_probability"] = float(
                session.run(None, {"input_features": pf})[0][0].item())
        if case["name"] == FEATURES_CLIP:
            feats[0].astype("<f4").tofile(os.path.join(OUT_DIR, "features.f32"))
            entry["features_file"] = "features.f32"
        results.append(entry)
        print(f"{case['name']:28s} samples {len(pcm):7d}  p(complete) {prob:.6f}  "
              f"expected {'complete' if case['complete'] else 'incomplete'}")

    reference = dict(
        model=dict(file="smart-turn-v3.2-cpu.onnx", sha256=MODEL_SHA256, bytes=MODEL_BYTES,
                   source="PyPI pipecat-ai==1.14.0 wheel, " + MODEL_MEMBER),
        input=dict(name="input_features", dtype="float32", shape=[1, N_MELS, N_FRAMES]),
        output=dict(name="logits", dtype="float32", shape=[1, 1],
                    meaning="sigmoid probability that the turn is complete (despite the name)"),
        threshold=THRESHOLD,
        features_f32=dict(file="features.f32", clip=FEATURES_CLIP, dtype="float32 little-endian",
                          shape=[N_MELS, N_FRAMES],
                          layout="row-major: value(mel m, frame t) at index m*800 + t"),
        recipe=("pcm/32768 -> last 128000 samples or zero left-pad to 128000 -> (x-mean)/sqrt(var"
                "+1e-7) over all 128000 -> reflect-pad 200 each side -> periodic hann 400, "
                "hop 160, rfft 400, |X|^2 -> slaney-normalised slaney-scale mel 80 bins "
                "0..8000 Hz -> max(.,1e-10) -> log10 -> drop last of 801 frames -> "
                "max(., global max - 8) -> (x+4)/4"),
        generated_with=dict(transformers=transformers.__version__,
                            onnxruntime=onnxruntime.__version__, numpy=np.__version__,
                            intra_op_threads=1, x64quantprecision=1),
        cases=results,
    )
    with open(os.path.join(OUT_DIR, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.join(OUT_DIR, 'reference.json')}")

    if args.time:
        feats = np.fromfile(os.path.join(OUT_DIR, "features.f32"), "<f4")
        feats = feats.reshape(1, N_MELS, N_FRAMES)
        for threads in (1, 2):
            s = make_session(model, threads)
            for _ in range(3):
                s.run(None, {"input_features": feats})
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                s.run(None, {"input_features": feats})
                times.append((time.perf_counter() - t0) * 1000)
            print(f"{threads} intra-op thread(s): median {statistics.median(times):.2f} ms "
                  f"(min {min(times):.2f}, max {max(times):.2f}) over 20 runs")
        t0 = time.perf_counter()
        for _ in range(5):
            fe(win, sampling_rate=SAMPLE_RATE, return_tensors="np",
               padding="max_length", max_length=WINDOW, truncation=True, do_normalize=True)
        print(f"transformers feature extraction: {(time.perf_counter() - t0) / 5 * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
