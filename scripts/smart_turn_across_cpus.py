#!/usr/bin/env python3
"""Measures how the Smart Turn v3.2 model's probabilities move with ONNX Runtime's CPU kernels, and
writes tests/fixtures/smart-turn/across-cpus.json (the bound of the reference test in
src/vad/smart_turn.rs rests on it).

ONNX Runtime's MLAS picks its int8 kernels by CPUID. This machine's own kernels are measured
natively; AVX2 and SSE4.2 ones under QEMU user mode (`-cpu Haswell`, `-cpu Nehalem`), whose CPUID
reports those CPUs while the same Python, numpy and onnxruntime run. QEMU 7.2 cannot emulate AVX-512
or AVX-VNNI. Each set runs with no session options and with session.x64quantprecision=1 (as the
server's sessions run).

Needs (none of it at run time of the product; nothing here is installed by scripts/setup):
    apt-get install qemu-user
    pip install --target /tmp/st-site onnxruntime==1.31.1 numpy transformers==4.57.1
    PYTHONPATH=/tmp/st-site python3 scripts/smart_turn_across_cpus.py [--model PATH]
About 3 minutes per kernel set under QEMU on this 2-core machine; progress goes to stderr.

    PYTHONPATH=/tmp/st-site python3 scripts/smart_turn_across_cpus.py --speed
times the model on this CPU, natively, with and without session.x64quantprecision (batch 1 and
8, one thread, median of 5 after a warm-up) and prints a table: what the option costs where it
changes no number.
"""
import json
import os
import subprocess
import sys
import tempfile
import wave

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "smart-turn")
WINDOW = 128000
EMULATED = {"AVX2": "Haswell", "SSE4.2": "Nehalem"}
OPTIONS = {"default": {}, "x64quantprecision": {"session.x64quantprecision": "1"}}


def case_name(c):
    return c.get("name") or c["file"]


def features(out_dir):
    """The reference features of every case, as scripts/make_smart_turn_fixtures.py makes them."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    ref = json.load(open(os.path.join(FIXTURES, "reference.json")))
    fe = WhisperFeatureExtractor(chunk_length=8)
    for c in ref["cases"]:
        pcm = []
        for f in c["files"]:
            with wave.open(os.path.join(FIXTURES, f), "rb") as w:
                pcm.append(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"))
        x = np.concatenate(pcm).astype(np.float32) / 32768.0
        x = x[-WINDOW:] if len(x) > WINDOW else np.pad(x, (WINDOW - len(x), 0))
        f = fe(x, sampling_rate=16000, return_tensors="np", padding="max_length",
               max_length=WINDOW, truncation=True, do_normalize=True).input_features
        np.save(os.path.join(out_dir, case_name(c) + ".npy"), f)
    return [case_name(c) for c in ref["cases"]]


def session(model, entries):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def speed(model, feats_dir, name):
    import time

    import numpy as np

    x = np.load(os.path.join(feats_dir, name + ".npy"))
    print("| options | batch | median ms |\n|---|---:|---:|")
    for label, entries in OPTIONS.items():
        s = session(model, entries)
        s.run(None, {"input_features": x})
        for batch in (1, 8):
            xb = np.repeat(x, batch, axis=0)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                s.run(None, {"input_features": xb})
                times.append(time.perf_counter() - t)
            print(f"| {label} | {batch} | {sorted(times)[2] * 1e3:.1f} |", flush=True)


def run(model, feats_dir, names):
    """Probabilities per option set, on whatever CPU this process sees."""
    import numpy as np

    out = {}
    for label, entries in OPTIONS.items():
        s = session(model, entries)
        out[label] = {}
        for n in names:
            x = np.load(os.path.join(feats_dir, n + ".npy"))
            out[label][n] = round(float(s.run(None, {"input_features": x})[0].item()), 7)
            print(f"  {label} {n}: {out[label][n]}", file=sys.stderr, flush=True)
    return out


def native_kernels():
    """This CPU's int8 kernel set, as `gazelle machine` names it."""
    report = subprocess.run(
        ["cargo", "run", "--quiet", "--profile", "test", "--bin", "gazelle", "--", "machine"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    line = next(l for l in report.splitlines() if l.startswith("ORT int8 kernels: "))
    return line.removeprefix("ORT int8 kernels: ").split(" (")[0]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--run":  # inside QEMU
        _, _, model, feats_dir, names = sys.argv
        print(json.dumps(run(model, feats_dir, names.split(","))))
        return
    model = os.path.join(ROOT, ".cache", "gazelle", "smart-turn-v3.2-cpu.onnx")
    if len(sys.argv) > 2 and sys.argv[1] == "--model":
        model = sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        names = features(tmp)
        if "--speed" in sys.argv:
            speed(model, tmp, names[0])
            return
        kernels = {}
        native = native_kernels()
        print(f"{native}: natively", file=sys.stderr)
        kernels[native] = run(model, tmp, names)
        for label, cpu in EMULATED.items():
            print(f"{label}: qemu-x86_64 -cpu {cpu}", file=sys.stderr)
            cmd = ["qemu-x86_64", "-cpu", cpu, sys.executable, os.path.abspath(__file__),
                   "--run", model, tmp, ",".join(names)]
            got = subprocess.run(cmd, check=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=os.environ)
            kernels[label] = json.loads(got.stdout)
    out = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "made_by": "scripts/smart_turn_across_cpus.py",
        "kernels": kernels,
    }
    with open(os.path.join(FIXTURES, "across-cpus.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
