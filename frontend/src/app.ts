// The page gazelle serves at `/`: microphone capture through an AudioWorklet, the Vocode websocket,
// gapless playback with barge-in, the transcript, user turns as audio bubbles, and each turn's
// latency waterfall. Errors (no microphone permission, server down, model loading, provider
// failure, a refused access key, the server closing the call) are shown in the banner; nothing
// waits silently. When `/config` says `auth: "token"`, each Start first trades the access key for a
// single-use call token (`POST /auth/token`) and opens the websocket with it.

import { audioMessage, configStart, fromBase64, type ServerMessage, type Timeline } from "./protocol";
import { Player, type SegmentStart } from "./player";
import { draw, stages } from "./waterfall";
import type { CaptureChunk } from "./worklet";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const ui = {
  start: $<HTMLButtonElement>("start"),
  state: $("state"),
  meter: $("meter-level"),
  error: $("error"),
  mic: $<HTMLSelectElement>("mic"),
  voice: $<HTMLSelectElement>("voice"),
  systemPrompt: $<HTMLTextAreaElement>("system-prompt"),
  firstMessage: $<HTMLInputElement>("first-message"),
  accessKeyField: $("access-key-field"),
  accessKey: $<HTMLInputElement>("access-key"),
  about: $("about"),
  log: $("log"),
};

/** What the browser test reads; also handy in the console. */
const stats = {
  state: "idle",
  /** What `/config` said the server needs: nothing, or a call token per call. */
  auth: "none" as Auth,
  /** The model `/config` named, once shown. */
  slm: "",
  ready: false,
  received: 0,
  /** Microphone chunks sent, and the loudest chunk's RMS level. */
  sent: 0,
  peak: 0,
  clears: [] as { reply: number; stopped: number; paused: boolean }[],
  timelines: [] as (Timeline & { first_audio_played_ms: number | null })[],
  errors: [] as string[],
  transcript: [] as string[],
  get scheduled() {
    return call?.player.scheduled ?? 0;
  },
};
(window as unknown as { gazelle: typeof stats }).gazelle = stats;

/** How long the server has to say websocket_ready after the socket opens. */
const READY_TIMEOUT_MS = 10_000;

const UNREACHABLE =
  "The gazelle server is down or unreachable. Start `gazelle serve` and press Start.";

type Auth = "none" | "token";
/**
 * Where the access key is kept: this tab's sessionStorage, so it survives a reload but not the tab.
 * Never localStorage, never the URL, never logged.
 */
const KEY_STORE = "gazelle.access-key";

interface Call {
  ctx: AudioContext;
  stream: MediaStream;
  ws: WebSocket;
  player: Player;
  level: number;
  stopping: boolean;
  /** Each reply's bot bubble, by the reply id the server's messages carry. */
  bots: Map<number, HTMLElement>;
  /**
   * A `gazelle_error` that came before `websocket_ready`: the server's own reason the call did not
   * start, which beats anything the page could guess when the socket then closes or stays silent.
   */
  refusal: string | null;
}
let call: Call | null = null;

function showError(message: string): void {
  stats.errors.push(message);
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError(): void {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setState(s: "idle" | "connecting" | "loading" | "listening" | "speaking" | "error") {
  stats.state = s;
  ui.state.textContent = s;
  ui.state.className = `state ${s}`;
}

/** Says what the page talks to: the server's model and voice, and what the scripted model is. */
function showAbout(slm: string | undefined, voices: string[]) {
  if (!slm) return;
  ui.about.replaceChildren(`Model: ${slm} · voice: ${voices.join(", ")}`);
  if (slm === "scripted") {
    const note = document.createElement("span");
    note.className = "hint";
    note.textContent =
      "The scripted model gives every turn the same fixed reply, to check the microphone, voice " +
      "detection, voice and network without a GPU or weights. For a real model, see the table " +
      "under “Try it” in the README (Gazelle on a GPU, or any OpenAI-compatible server).";
    ui.about.append(note);
  }
  ui.about.hidden = false;
  stats.slm = slm;
}

/** Loads `/config`; false (with the reason shown) when the server cannot be reached. */
async function loadConfig(): Promise<boolean> {
  try {
    const r = await fetch("/config", { cache: "no-store" });
    const c = (await r.json()) as {
      slm?: string;
      voices: string[];
      system_prompt: string | null;
      first_message: string | null;
      auth?: string;
    };
    showAbout(c.slm, c.voices);
    ui.voice.replaceChildren(...c.voices.map((v) => new Option(v, v)));
    // A choice is only offered when there is one to make.
    ui.voice.disabled = c.voices.length < 2;
    if (c.system_prompt && !ui.systemPrompt.value) ui.systemPrompt.value = c.system_prompt;
    if (c.first_message && !ui.firstMessage.value) ui.firstMessage.value = c.first_message;
    // A server that predates the field needs no credentials.
    stats.auth = c.auth === "token" ? "token" : "none";
    ui.accessKeyField.hidden = stats.auth !== "token";
    return true;
  } catch {
    showError("Cannot reach the gazelle server. Is `gazelle serve` running? Reload once it is.");
    return false;
  }
}
/** The page-load `/config`; Start loads it again if that failed. */
let config = loadConfig();

function storedKey(): string {
  try {
    return sessionStorage.getItem(KEY_STORE) ?? "";
  } catch {
    return ""; // storage disabled: the key lives in the field only
  }
}

function storeKey(key: string): void {
  try {
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  } catch {
    // storage disabled: the key lives in the field only
  }
}

/**
 * Trades the access key for a call token (`POST /auth/token`, `Authorization: Bearer <key>`, no
 * body). A token is single-use and short-lived, so every Start gets a fresh one, right before the
 * websocket opens. Null, with the reason shown, when there is none.
 */
async function callToken(): Promise<string | null> {
  const key = ui.accessKey.value.trim();
  if (!key) {
    askForKey();
    return null;
  }
  let headers: Headers;
  try {
    headers = new Headers({ Authorization: `Bearer ${key}` });
  } catch {
    // fetch refuses header values with line breaks or non-Latin-1 characters.
    showError(
      "The access key has characters that cannot be sent. Check it, enter it again and press Start.",
    );
    ui.accessKey.focus();
    return null;
  }
  let r: Response;
  try {
    r = await fetch("/auth/token", { method: "POST", headers, cache: "no-store" });
  } catch {
    showError(UNREACHABLE);
    return null;
  }
  if (r.status === 401) {
    const why = await reasonOf(r);
    storeKey(""); // never keep a refused key
    showError(
      `The server refused the access key${why ? ` (${why})` : ""}. Check the key with the server's ` +
        "operator, enter it again and press Start.",
    );
    ui.accessKey.focus();
    return null;
  }
  if (r.status === 404) {
    showError(
      "The server asks for an access key but has none configured, so it cannot issue call tokens " +
        "(POST /auth/token: 404). Its operator needs to set an access key.",
    );
    return null;
  }
  if (!r.ok) {
    const why = await reasonOf(r);
    showError(
      `The server could not issue a call token (HTTP ${r.status}${why ? `: ${why}` : ""}). Press ` +
        "Start to try again; if it keeps failing, see the server log.",
    );
    return null;
  }
  let token: unknown;
  try {
    token = ((await r.json()) as { token?: unknown }).token;
  } catch {
    token = undefined;
  }
  if (typeof token !== "string" || !token) {
    showError("The server's answer to POST /auth/token has no call token. See the server log.");
    return null;
  }
  return token;
}

function askForKey(): void {
  showError("This server needs an access key. Enter it in the Access key field and press Start.");
  ui.accessKey.focus();
}

/** A plain-text error body, kept short for the banner. */
async function reasonOf(r: Response): Promise<string> {
  const text = (await r.text().catch(() => "")).trim().replace(/\s+/g, " ");
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

async function listMics(): Promise<void> {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const mics = devices.filter((d) => d.kind === "audioinput");
  const chosen = ui.mic.value;
  ui.mic.replaceChildren(
    new Option("default microphone", ""),
    ...mics
      .filter((d) => d.deviceId && d.deviceId !== "default")
      .map((d, i) => new Option(d.label || `microphone ${i + 1}`, d.deviceId)),
  );
  ui.mic.value = chosen;
}

/** Waits until /health says the model is ready, showing why while it waits. */
async function waitForServer(): Promise<boolean> {
  for (;;) {
    let health: { status: string; loading_s?: number; error?: string };
    try {
      const r = await fetch("/health", { cache: "no-store" });
      health = await r.json();
    } catch {
      showError(UNREACHABLE);
      return false;
    }
    if (health.status === "ok") return true;
    if (health.status === "error") {
      showError(`The model failed to load: ${health.error ?? "no reason given"}. See the server log.`);
      return false;
    }
    setState("loading");
    const sofar = health.loading_s === undefined ? "" : ` (${Math.floor(health.loading_s)} s so far)`;
    showError(`The model is loading${sofar}. Waiting for it…`);
    await new Promise((r) => setTimeout(r, 1000));
    if (stopped()) return false;
  }
}

async function openMic(): Promise<MediaStream | null> {
  const audio: MediaTrackConstraints = { echoCancellation: true, channelCount: 1 };
  if (ui.mic.value) audio.deviceId = { exact: ui.mic.value };
  try {
    return await navigator.mediaDevices.getUserMedia({ audio });
  } catch (e) {
    const name = (e as DOMException).name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      showError(
        "Microphone permission denied. Allow microphone access for this site (the icon in the " +
          "address bar) and press Start again.",
      );
    } else if (name === "NotFoundError" || name === "OverconstrainedError") {
      showError("No microphone found. Plug one in or pick another, then press Start.");
    } else {
      showError(`Cannot open the microphone: ${(e as Error).message}`);
    }
    return null;
  }
}

/** True once Stop was pressed while start() was still awaiting something. */
const stopped = () => ui.start.dataset.running !== "yes";

async function start(): Promise<void> {
  clearError();
  ui.start.dataset.running = "yes";
  ui.start.textContent = "Stop";
  setState("connecting");
  // Whether this server wants an access key; asked again if the page-load request failed.
  if (!(await config)) config = loadConfig();
  if (!(await config)) return stopped() ? undefined : stop("error");
  if (stopped()) return;
  if (stats.auth === "token" && !ui.accessKey.value.trim()) {
    askForKey();
    return stop("error");
  }
  if (!(await waitForServer())) return stopped() ? undefined : stop("error");
  clearError();
  const stream = await openMic();
  if (!stream) return stop("error");
  if (stopped()) return stream.getTracks().forEach((t) => t.stop());
  void listMics(); // labels are only visible once permission is granted
  const ctx = new AudioContext();
  try {
    await ctx.resume();
    await ctx.audioWorklet.addModule("/assets/worklet.js");
  } catch (e) {
    showError(`The page's audio worklet did not load: ${(e as Error).message}. Reload the page.`);
    stream.getTracks().forEach((t) => t.stop());
    void ctx.close();
    return stop("error");
  }
  // Last before the socket: the token is single-use and lives about a minute, and the microphone
  // permission prompt above may have taken longer than that.
  const token = stats.auth === "token" ? await callToken() : null;
  if ((stats.auth === "token" && token === null) || stopped()) {
    stream.getTracks().forEach((t) => t.stop());
    void ctx.close();
    return stopped() ? undefined : stop("error");
  }
  const capture = new AudioWorkletNode(ctx, "gazelle-capture");
  ctx.createMediaStreamSource(stream).connect(capture);
  // The worklet must be pulled by the graph to run; a muted path keeps it running silently.
  const mute = ctx.createGain();
  mute.gain.value = 0;
  capture.connect(mute).connect(ctx.destination);

  // `url` is what the page shows; the token never appears in a message.
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/conversation`;
  const ws = new WebSocket(token === null ? url : `${url}?token=${encodeURIComponent(token)}`);
  const c: Call = {
    ctx,
    stream,
    ws,
    player: new Player(ctx, ctx.destination),
    level: 0,
    stopping: false,
    bots: new Map(),
    refusal: null,
  };
  call = c;
  let opened = false;
  const readyTimer = setTimeout(() => {
    if (!stats.ready) {
      // A refusal the server already explained stays in the banner.
      if (!c.refusal) {
        showError("The server accepted the connection but never became ready. Check its log.");
      }
      stop("error");
    }
  }, READY_TIMEOUT_MS);
  ws.onopen = () => {
    opened = true;
    ws.send(
      configStart({
        rate: ctx.sampleRate,
        systemPrompt: ui.systemPrompt.value.trim(),
        firstMessage: ui.firstMessage.value.trim(),
      }),
    );
  };
  ws.onmessage = (e) => onMessage(c, JSON.parse(e.data as string) as ServerMessage);
  ws.onclose = (e) => {
    clearTimeout(readyTimer);
    if (c.stopping) return;
    if (!opened) {
      // Before the handshake completes a browser never sees the server's close code (it reports
      // 1006), so all the page knows is that the upgrade failed.
      const refused = stats.auth === "token" ? ", or did not accept the call token" : "";
      showError(
        `Cannot connect to ${url}. The server is down or refused the call (it may be at its ` +
          `call limit${refused}).`,
      );
    } else if (c.refusal) {
      showError(`${c.refusal} The server closed the call (code ${e.code}).`);
    } else {
      showError(closeText(e.code, e.reason));
    }
    stop("error");
  };
  capture.port.onmessage = (e: MessageEvent<CaptureChunk>) => {
    c.level = Math.max(e.data.rms, c.level * 0.85);
    stats.peak = Math.max(stats.peak, e.data.rms);
    if (stats.ready && ws.readyState === WebSocket.OPEN) {
      ws.send(audioMessage(e.data.pcm));
      stats.sent++;
    }
  };
  requestAnimationFrame(tick);
}

function stop(final: "idle" | "error" = "idle"): void {
  ui.start.dataset.running = "";
  ui.start.textContent = "Start";
  stats.ready = false;
  const c = call;
  call = null;
  if (c) {
    c.stopping = true;
    c.player.clear();
    if (c.ws.readyState === WebSocket.OPEN) c.ws.send(JSON.stringify({ type: "websocket_stop" }));
    c.ws.close();
    c.stream.getTracks().forEach((t) => t.stop());
    void c.ctx.close();
  }
  ui.meter.style.width = "0";
  setState(final);
}

function onMessage(c: Call, m: ServerMessage): void {
  const now = performance.now();
  switch (m.type) {
    case "websocket_ready":
      stats.ready = true;
      setState("listening");
      break;
    case "websocket_audio":
      stats.received++;
      c.player.enqueue(fromBase64(m.data), now);
      break;
    case "websocket_transcript":
      stats.transcript.push(m.text);
      botBubble(c, m.reply).querySelector(".text")!.append(`${m.text} `);
      break;
    case "gazelle_clear": {
      const stopped = c.player.clear();
      stats.clears.push({ reply: m.reply, stopped, paused: m.paused === true });
      const bubble = c.bots.get(m.reply);
      // Only paused (a short sound over the bot): its audio may follow again.
      if (bubble && !m.paused) markInterrupted(bubble, m.spoken_text);
      break;
    }
    case "gazelle_timeline":
      onTimeline(c, m, c.player.lastSegment);
      break;
    case "gazelle_error": {
      const text = errorText(m.kind, m.message);
      if (!stats.ready) c.refusal = text;
      showError(text);
      break;
    }
    case "websocket_stop":
      showError("The server ended the call. Press Start to begin a new one.");
      stop("error");
      break;
  }
}

function errorText(kind: string, message: string): string {
  switch (kind) {
    case "tts":
      return `The voice (TTS provider) failed: ${message}. The call goes on.`;
    case "slm":
      return `The speech-language model failed: ${message}. The call goes on.`;
    case "call_start":
      return `The server could not start the call: ${message}`;
    case "bad_config":
      // The server's message names the setting and its limit.
      return (
        `The server refused the call's settings: ${message}. Fix the system prompt or first ` +
        "message and press Start again."
      );
    case "start_timeout":
      return `The call did not start in time: ${message}. Press Start to try again.`;
    case "busy":
      return `The server is busy: ${message}. Try again in a little while.`;
    case "id_in_use":
      return (
        `The server refused the call: its conversation id is already in use (${message}). ` +
        "Press Start to begin a new call."
      );
    case "format_changed":
      return (
        `The server refused an audio format change during the call: ${message}. Press Stop, then ` +
        "Start to begin a new call."
      );
    case "audio_too_long":
      return (
        `An audio message from the page was too long for the server: ${message}. If this ` +
        "repeats, reload the page."
      );
    default:
      return `Server error (${kind}): ${message}`;
  }
}

/** What a websocket close code from an open call means, and what to do about it. */
function closeText(code: number, reason: string): string {
  const said = reason ? ` The server said: “${reason}”.` : "";
  switch (code) {
    case 1000:
      return `The server ended the call (code 1000).${said} Press Start to begin a new one.`;
    case 1001:
      return (
        `The server is shutting down or restarting and closed the call (code 1001).${said} ` +
        "Wait a moment, then press Start to reconnect."
      );
    case 1008: {
      const check = stats.auth === "token" ? "Check the access key, then press" : "Press";
      return (
        `The server refused the call (code 1008, policy).${said} It does that when its access ` +
        "check fails (the access key, the call token, or this page's origin) or when the call was " +
        `too slow to start. ${check} Start again; if it keeps happening, open the page from the ` +
        "server's own address or see the server log."
      );
    }
    case 1009:
      return (
        `A message was too large for the server (code 1009).${said} Shorten the system prompt or ` +
        "first message and press Start again."
      );
    case 1011:
      return (
        `The server hit an internal error and closed the call (code 1011).${said} See the server ` +
        "log, then press Start to try again."
      );
    case 1013:
      return (
        `The server is busy: it is at its call limit (code 1013).${said} Try again in a little ` +
        "while."
      );
    default:
      return (
        `The connection to the server closed (code ${code}).${said} The server may have ` +
        "stopped; press Start to reconnect."
      );
  }
}

function botBubble(c: Call, reply: number): HTMLElement {
  let el = c.bots.get(reply);
  if (!el) {
    el = document.createElement("div");
    el.className = "turn bot";
    el.dataset.reply = String(reply);
    el.innerHTML = '<span class="who">bot</span><span class="text"></span>';
    ui.log.append(el);
    c.bots.set(reply, el);
  }
  return el;
}

/** Splits the cut reply's text into what the user heard and what they never did. */
function markInterrupted(el: HTMLElement, heard: string): void {
  el.classList.add("interrupted");
  const text = el.querySelector(".text")!;
  const all = (text.textContent ?? "").trim();
  const cut = heard && all.startsWith(heard) ? heard.length : 0;
  const unheard = document.createElement("span");
  unheard.className = "unheard";
  unheard.textContent = all.slice(cut);
  text.replaceChildren(all.slice(0, cut), unheard);
}

/** The user's turn: an audio bubble with its duration, and the reply's latency waterfall. */
function onTimeline(c: Call, t: Timeline, segment: SegmentStart | null): void {
  const el = document.createElement("div");
  el.className = "turn user";
  el.dataset.reply = String(t.reply);
  const secs = (t.user_audio_ms / 1000).toFixed(1);
  el.innerHTML =
    `<span class="who">you</span><span class="audio-bubble"><span class="wave"></span>` +
    `<span class="duration">${secs} s</span></span>`;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.classList.add("waterfall");
  el.append(svg);
  // The user spoke before the bot's reply text began, so the bubble goes above it.
  const bot = c.bots.get(t.reply);
  if (bot) ui.log.insertBefore(el, bot);
  else ui.log.append(el);
  const entry = { ...t, first_audio_played_ms: null as number | null };
  stats.timelines.push(entry);
  draw(svg, stages(t, null));
  // The reply's first audio message came just before this timeline (the server sends the
  // timeline once that audio is out), so `segment` is its first chunk.
  if (segment && t.first_audio_sent_ms !== null) {
    const sent = t.first_audio_sent_ms;
    segment.whenHeard((heardAt) => {
      entry.first_audio_played_ms = sent + (heardAt - segment.arrivedAt);
      draw(svg, stages(t, entry.first_audio_played_ms));
    });
  }
  el.scrollIntoView({ block: "nearest" });
}

function tick(): void {
  const c = call;
  if (!c) return;
  const speaking = c.player.speaking;
  if (stats.ready) setState(speaking ? "speaking" : "listening");
  c.level *= 0.9;
  ui.meter.style.width = `${Math.min(100, Math.sqrt(c.level) * 180)}%`;
  requestAnimationFrame(tick);
}

ui.start.onclick = () => (call || ui.start.dataset.running ? stop() : void start());
ui.accessKey.value = storedKey();
ui.accessKey.addEventListener("input", () => storeKey(ui.accessKey.value));
ui.accessKey.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !call && !ui.start.dataset.running) void start();
});
navigator.mediaDevices?.addEventListener("devicechange", () => void listMics());
if (!navigator.mediaDevices) {
  showError("This page needs microphone access, which browsers only give to https or localhost.");
} else {
  void listMics();
}
