// The messages of gazelle's `/conversation` websocket (the Vocode protocol plus the `gazelle_*`
// extensions documented in src/transport/vocode/PROTOCOL.md), as the page sends and reads them.

export interface Timeline {
  reply: number;
  user_audio_ms: number;
  vad_end_ms: number | null;
  first_token_ms: number | null;
  first_unit_ms: number | null;
  first_synth_byte_ms: number | null;
  first_audio_sent_ms: number | null;
  /** Smart turn policy: when the pause the turn ended at was noticed, and the end-of-turn
   * model's probability that the turn was complete there. */
  pause_ms?: number | null;
  end_of_turn_probability?: number | null;
  /** Preemptive replies: started at the pause, committed when the turn was over. */
  preemptive_start_ms?: number | null;
  commit_ms?: number | null;
}

export type ServerMessage =
  | { type: "websocket_ready" }
  | { type: "websocket_audio"; data: string }
  | { type: "websocket_transcript"; text: string; sender: string; timestamp: string; reply: number }
  | { type: "websocket_stop" }
  | { type: "gazelle_clear"; reply: number; spoken_text: string; paused?: boolean }
  | ({ type: "gazelle_timeline" } & Timeline)
  | { type: "gazelle_history"; conversation: unknown }
  | { type: "gazelle_error"; kind: string; message: string };

export interface StartOptions {
  rate: number;
  systemPrompt: string;
  firstMessage: string;
}

export function configStart(o: StartOptions): string {
  return JSON.stringify({
    type: "websocket_audio_config_start",
    input_audio_config: { sampling_rate: o.rate, audio_encoding: "linear16" },
    // Output at the context's own rate, so decodeAudioData never resamples.
    output_audio_config: { sampling_rate: o.rate, audio_encoding: "linear16" },
    subscribe_transcript: true,
    system_prompt: o.systemPrompt || undefined,
    first_message: o.firstMessage || undefined,
  });
}

export function audioMessage(pcm: ArrayBuffer): string {
  return JSON.stringify({ type: "websocket_audio", data: toBase64(new Uint8Array(pcm)) });
}

function toBase64(bytes: Uint8Array): string {
  let s = "";
  // Chunked so String.fromCharCode never gets more arguments than the engine allows.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export function fromBase64(data: string): ArrayBuffer {
  const s = atob(data);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes.buffer;
}
