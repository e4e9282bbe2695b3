// The capture AudioWorklet: turns the microphone's float frames (128 samples at the context
// rate) into PCM16 chunks of 20 ms and posts them, with their RMS level, to the page. It runs on
// the audio thread, so it only converts and batches; sending happens on the main thread.

// The AudioWorkletGlobalScope is not in TypeScript's DOM lib; these are the parts we use.
declare const sampleRate: number;
declare class AudioWorkletProcessor {
  readonly port: MessagePort;
}
declare function registerProcessor(name: string, ctor: unknown): void;

/** What the worklet posts for each chunk. */
export interface CaptureChunk {
  pcm: ArrayBuffer;
  rms: number;
}

const CHUNK_MS = 20;

class CaptureProcessor extends AudioWorkletProcessor {
  private readonly size = Math.round((sampleRate * CHUNK_MS) / 1000);
  private chunk = new Int16Array(this.size);
  private filled = 0;
  private energy = 0;

  process(inputs: Float32Array[][]): boolean {
    const channel = inputs[0]?.[0];
    // No input yet (the track is starting): keep the node alive.
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.energy += s * s;
      this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.size) {
        const rms = Math.sqrt(this.energy / this.filled);
        const pcm = this.chunk.buffer;
        // Transferred, not copied: this detaches the chunk, so the next one is a new array.
        this.port.postMessage({ pcm, rms } satisfies CaptureChunk, [pcm]);
        this.chunk = new Int16Array(this.size);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("gazelle-capture", CaptureProcessor);
