"""Our segments vs silero-vad's get_speech_timestamps on the same files (see scripts/compare-vad).

Both use the same ONNX model, threshold 0.5, negative threshold 0.35, 200 ms minimum speech,
500 ms minimum silence and 30 ms padding (our [pipeline.vad] defaults). The reference runs on
whole files; ours runs frame by frame as the live pipeline does. Prints a table per file with the
boundary differences in milliseconds.
"""
import json
import subprocess
import sys
import tempfile
import wave

import numpy as np
from silero_vad import get_speech_timestamps, load_silero_vad


def read_wav_16k(path):
    with wave.open(path, "rb") as w:
        rate, n, ch, width = w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()
        if width != 2:
            raise SystemExit(f"{path}: only PCM16 files are compared")
        x = np.frombuffer(w.readframes(n), dtype="<i2").astype(np.float32) / 32768.0
    x = x.reshape(-1, ch).mean(axis=1)
    if rate != 16000:
        t = np.arange(0, len(x) * 16000 // rate) * rate / 16000
        x = np.interp(t, np.arange(len(x)), x).astype(np.float32)
    return x


def make_clips(tmp):
    """espeak-ng sentences with known silences between them."""
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Please call me back tomorrow morning at nine.", "Yes."]
    paths = []
    for i, text in enumerate(sentences):
        out = f"{tmp}/s{i}.wav"
        subprocess.run(["espeak-ng", "-w", out, text], check=True)
        paths.append(out)
    parts = [np.zeros(11200, np.float32)]
    for p in paths:
        parts += [read_wav_16k(p), np.zeros(24000, np.float32)]
    clip = np.concatenate(parts)
    out = f"{tmp}/clip.wav"
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())
    return [out]


def main():
    gazelle, files = sys.argv[1], sys.argv[2:]
    tmp = tempfile.mkdtemp()
    if not files:
        files = make_clips(tmp)
    model = load_silero_vad(onnx=True)
    worst = 0.0
    for f in files:
        ours = json.loads(subprocess.run([gazelle, "vad", "--json", f], check=True,
                                         capture_output=True, text=True).stdout)["segments"]
        ref = get_speech_timestamps(read_wav_16k(f), model, threshold=0.5, neg_threshold=0.35,
                                    min_speech_duration_ms=200, min_silence_duration_ms=500,
                                    speech_pad_ms=30, sampling_rate=16000)
        print(f"\n{f}: ours {len(ours)} segments, reference {len(ref)}")
        print(f"{'#':>3} {'ours start':>11} {'ref start':>10} {'Δ ms':>7} {'ours end':>9} {'ref end':>8} {'Δ ms':>7}")
        for i, (o, r) in enumerate(zip(ours, ref)):
            ds = (o["start"] - r["start"]) / 16.0
            de = (o["end"] - r["end"]) / 16.0
            worst = max(worst, abs(ds), abs(de))
            print(f"{i:>3} {o['start']/16000:>11.3f} {r['start']/16000:>10.3f} {ds:>7.0f} "
                  f"{o['end']/16000:>9.3f} {r['end']/16000:>8.3f} {de:>7.0f}")
        if len(ours) != len(ref):
            print("segment counts differ")
            worst = float("inf")
    print(f"\nlargest boundary difference: {worst:.0f} ms")


if __name__ == "__main__":
    main()
