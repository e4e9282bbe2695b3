// Gapless playback of the bot's audio: every `websocket_audio` message is a whole WAV file, decoded
// with decodeAudioData and scheduled back to back on one AudioContext. A clear (barge-in) stops
// every scheduled source at once. It also measures when the first chunk of each stretch of bot
// audio is heard, in performance.now() milliseconds, for the latency waterfall.

/** The first chunk of a stretch of bot audio that arrived while nothing was playing. */
export class SegmentStart {
  /** performance.now() when its first sample reaches the speakers; null until scheduled. */
  heardAt: number | null = null;
  private waiters: ((heardAt: number) => void)[] = [];

  /** @param arrivedAt performance.now() when its websocket message arrived. */
  constructor(readonly arrivedAt: number) {}

  whenHeard(f: (heardAt: number) => void): void {
    if (this.heardAt !== null) f(this.heardAt);
    else this.waiters.push(f);
  }

  settle(heardAt: number): void {
    this.heardAt = heardAt;
    for (const f of this.waiters.splice(0)) f(heardAt);
  }
}

/** Room left before the first chunk after silence, so decoding jitter cannot cause a gap. */
const FIRST_CHUNK_CUSHION_S = 0.03;

export class Player {
  private sources = new Set<AudioBufferSourceNode>();
  private nextTime = 0;
  /** Chunks received but not yet scheduled. */
  private pending = 0;
  /** Decodes finish in order because each waits for the one before. */
  private decoding: Promise<void> = Promise.resolve();
  /** Bumped by clear(), so chunks still decoding from a cut reply are dropped. */
  private generation = 0;
  /** Sources ever scheduled, for the page's counters and the browser test. */
  scheduled = 0;
  /** The latest stretch of bot audio that started from silence. */
  lastSegment: SegmentStart | null = null;

  constructor(
    private ctx: AudioContext,
    private out: AudioNode,
  ) {}

  /** True while bot audio is playing, scheduled or being decoded. */
  get speaking(): boolean {
    return this.sources.size > 0 || this.pending > 0;
  }

  enqueue(wav: ArrayBuffer, arrivedAt: number): void {
    const generation = this.generation;
    const segment = this.speaking ? null : new SegmentStart(arrivedAt);
    if (segment) this.lastSegment = segment;
    this.pending++;
    const decoded = this.ctx.decodeAudioData(wav);
    this.decoding = this.decoding.then(async () => {
      let buffer: AudioBuffer | null = null;
      try {
        buffer = await decoded;
      } catch (e) {
        console.warn("undecodable audio chunk", e);
      }
      if (generation !== this.generation) return;
      this.pending--;
      if (buffer) this.schedule(buffer, segment);
    });
  }

  private schedule(buffer: AudioBuffer, segment: SegmentStart | null): void {
    const now = this.ctx.currentTime;
    // After silence, or if decoding fell behind the clock, start a little ahead of now.
    const startAt = this.nextTime > now ? this.nextTime : now + FIRST_CHUNK_CUSHION_S;
    const src = this.ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.out);
    src.onended = () => {
      this.sources.delete(src);
      src.disconnect();
    };
    src.start(startAt);
    this.sources.add(src);
    this.scheduled++;
    this.nextTime = startAt + buffer.duration;
    segment?.settle(this.heardAt(startAt));
  }

  /** performance.now() at which context time `t` is heard, output latency included. */
  private heardAt(t: number): number {
    const ts = this.ctx.getOutputTimestamp();
    if (ts.contextTime && ts.performanceTime) {
      return ts.performanceTime + (t - ts.contextTime) * 1000;
    }
    // Some outputs give no timestamp yet: map through currentTime and the reported latency.
    const latency = this.ctx.outputLatency || this.ctx.baseLatency || 0;
    return performance.now() + (t - this.ctx.currentTime + latency) * 1000;
  }

  /** Stops everything scheduled, now. Returns how many sources it stopped. */
  clear(): number {
    this.generation++;
    this.decoding = Promise.resolve();
    this.pending = 0;
    const n = this.sources.size;
    for (const src of this.sources) {
      src.onended = null;
      src.stop();
      src.disconnect();
    }
    this.sources.clear();
    this.nextTime = 0;
    return n;
  }
}
