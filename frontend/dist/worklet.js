// src/worklet.ts
var CHUNK_MS = 20;
var CaptureProcessor = class extends AudioWorkletProcessor {
  size = Math.round(sampleRate * CHUNK_MS / 1e3);
  chunk = new Int16Array(this.size);
  filled = 0;
  energy = 0;
  process(inputs) {
    const channel = inputs[0]?.[0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.energy += s * s;
      this.chunk[this.filled++] = s < 0 ? s * 32768 : s * 32767;
      if (this.filled === this.size) {
        const rms = Math.sqrt(this.energy / this.filled);
        const pcm = this.chunk.buffer;
        this.port.postMessage({ pcm, rms }, [pcm]);
        this.chunk = new Int16Array(this.size);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
};
registerProcessor("gazelle-capture", CaptureProcessor);
