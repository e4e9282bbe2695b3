// src/protocol.ts
function configStart(o) {
  return JSON.stringify({
    type: "websocket_audio_config_start",
    input_audio_config: { sampling_rate: o.rate, audio_encoding: "linear16" },
    // Output at the context's own rate, so decodeAudioData never resamples.
    output_audio_config: { sampling_rate: o.rate, audio_encoding: "linear16" },
    subscribe_transcript: true,
    system_prompt: o.systemPrompt || void 0,
    first_message: o.firstMessage || void 0
  });
}
function audioMessage(pcm) {
  return JSON.stringify({ type: "websocket_audio", data: toBase64(new Uint8Array(pcm)) });
}
function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 32768) {
    s += String.fromCharCode(...bytes.subarray(i, i + 32768));
  }
  return btoa(s);
}
function fromBase64(data) {
  const s = atob(data);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes.buffer;
}

// src/player.ts
var SegmentStart = class {
  /** @param arrivedAt performance.now() when its websocket message arrived. */
  constructor(arrivedAt) {
    this.arrivedAt = arrivedAt;
  }
  arrivedAt;
  /** performance.now() when its first sample reaches the speakers; null until scheduled. */
  heardAt = null;
  waiters = [];
  whenHeard(f) {
    if (this.heardAt !== null) f(this.heardAt);
    else this.waiters.push(f);
  }
  settle(heardAt) {
    this.heardAt = heardAt;
    for (const f of this.waiters.splice(0)) f(heardAt);
  }
};
var FIRST_CHUNK_CUSHION_S = 0.03;
var Player = class {
  constructor(ctx, out) {
    this.ctx = ctx;
    this.out = out;
  }
  ctx;
  out;
  sources = /* @__PURE__ */ new Set();
  nextTime = 0;
  /** Chunks received but not yet scheduled. */
  pending = 0;
  /** Decodes finish in order because each waits for the one before. */
  decoding = Promise.resolve();
  /** Bumped by clear(), so chunks still decoding from a cut reply are dropped. */
  generation = 0;
  /** Sources ever scheduled, for the page's counters and the browser test. */
  scheduled = 0;
  /** The latest stretch of bot audio that started from silence. */
  lastSegment = null;
  /** True while bot audio is playing, scheduled or being decoded. */
  get speaking() {
    return this.sources.size > 0 || this.pending > 0;
  }
  enqueue(wav, arrivedAt) {
    const generation = this.generation;
    const segment = this.speaking ? null : new SegmentStart(arrivedAt);
    if (segment) this.lastSegment = segment;
    this.pending++;
    const decoded = this.ctx.decodeAudioData(wav);
    this.decoding = this.decoding.then(async () => {
      let buffer = null;
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
  schedule(buffer, segment) {
    const now = this.ctx.currentTime;
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
  heardAt(t) {
    const ts = this.ctx.getOutputTimestamp();
    if (ts.contextTime && ts.performanceTime) {
      return ts.performanceTime + (t - ts.contextTime) * 1e3;
    }
    const latency = this.ctx.outputLatency || this.ctx.baseLatency || 0;
    return performance.now() + (t - this.ctx.currentTime + latency) * 1e3;
  }
  /** Stops everything scheduled, now. Returns how many sources it stopped. */
  clear() {
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
};

// src/waterfall.ts
function stages(t, playedMs) {
  const p = t.end_of_turn_probability;
  const decision = p === null || p === void 0 ? "turn end" : `turn end (p=${p.toFixed(2)})`;
  const rows = [{ key: "end_of_speech", label: "end of speech", ms: 0 }];
  if (t.pause_ms !== void 0 && t.pause_ms !== null) {
    rows.push({ key: "pause", label: "pause noticed", ms: t.pause_ms });
  }
  if (t.preemptive_start_ms !== void 0 && t.preemptive_start_ms !== null) {
    rows.push({ key: "preemptive_start", label: "preemptive start", ms: t.preemptive_start_ms });
  }
  rows.push(
    { key: "first_token", label: "first token", ms: t.first_token_ms },
    { key: "first_unit", label: "first text unit", ms: t.first_unit_ms },
    { key: "first_synth_byte", label: "first TTS byte", ms: t.first_synth_byte_ms },
    { key: "vad_end", label: decision, ms: t.vad_end_ms }
  );
  if (t.commit_ms !== void 0 && t.commit_ms !== null) {
    rows.push({ key: "commit", label: "commit", ms: t.commit_ms });
  }
  rows.push(
    { key: "first_audio_sent", label: "first audio sent", ms: t.first_audio_sent_ms },
    { key: "first_audio_played", label: "first audio played", ms: playedMs }
  );
  return rows;
}
var SVG = "http://www.w3.org/2000/svg";
var ROW = 16;
var LABEL_W = 118;
var WIDTH = 460;
var VALUE_W = 62;
function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== void 0) e.textContent = text;
  return e;
}
function draw(svg, rows) {
  svg.replaceChildren();
  const height = rows.length * ROW + 18;
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  svg.setAttribute("width", String(WIDTH));
  svg.setAttribute("height", String(height));
  const known = rows.map((r) => r.ms ?? 0);
  const span = Math.max(100, Math.ceil(Math.max(...known) / 100) * 100);
  const plot = WIDTH - LABEL_W - VALUE_W;
  const x = (ms) => LABEL_W + ms / span * plot;
  rows.forEach((r, i) => {
    const y = i * ROW;
    const g = el("g", { class: "stage", "data-stage": r.key, "data-ms": r.ms ?? "" });
    g.append(el("text", { x: LABEL_W - 6, y: y + 11, "text-anchor": "end" }, r.label));
    if (r.ms === null) {
      g.append(el("text", { x: LABEL_W + 4, y: y + 11, class: "missing" }, "—"));
    } else {
      const w = Math.max(2, x(r.ms) - LABEL_W);
      g.append(el("rect", { x: LABEL_W, y: y + 3, width: w, height: ROW - 6, rx: 2 }));
      const value = `${Math.round(r.ms)} ms`;
      g.append(el("text", { x: WIDTH - 4, y: y + 11, "text-anchor": "end" }, value));
    }
    svg.append(g);
  });
  const axisY = rows.length * ROW + 2;
  svg.append(el("line", { x1: LABEL_W, x2: x(span), y1: axisY, y2: axisY, class: "axis" }));
  for (const t of [0, span / 2, span]) {
    const tx = el("text", { x: x(t), y: axisY + 13, "text-anchor": "middle", class: "tick" });
    tx.textContent = t === span ? `${Math.round(t)} ms` : `${Math.round(t)}`;
    svg.append(tx);
  }
}

// src/app.ts
var $ = (id) => document.getElementById(id);
var ui = {
  start: $("start"),
  state: $("state"),
  meter: $("meter-level"),
  error: $("error"),
  mic: $("mic"),
  voice: $("voice"),
  systemPrompt: $("system-prompt"),
  firstMessage: $("first-message"),
  accessKeyField: $("access-key-field"),
  accessKey: $("access-key"),
  about: $("about"),
  log: $("log")
};
var stats = {
  state: "idle",
  /** What `/config` said the server needs: nothing, or a call token per call. */
  auth: "none",
  /** The model `/config` named, once shown. */
  slm: "",
  ready: false,
  received: 0,
  /** Microphone chunks sent, and the loudest chunk's RMS level. */
  sent: 0,
  peak: 0,
  clears: [],
  timelines: [],
  errors: [],
  transcript: [],
  get scheduled() {
    return call?.player.scheduled ?? 0;
  }
};
window.gazelle = stats;
var READY_TIMEOUT_MS = 1e4;
var UNREACHABLE = "The gazelle server is down or unreachable. Start `gazelle serve` and press Start.";
var KEY_STORE = "gazelle.access-key";
var call = null;
function showError(message) {
  stats.errors.push(message);
  ui.error.textContent = message;
  ui.error.hidden = false;
}
function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}
function setState(s) {
  stats.state = s;
  ui.state.textContent = s;
  ui.state.className = `state ${s}`;
}
function showAbout(slm, voices) {
  if (!slm) return;
  ui.about.replaceChildren(`Model: ${slm} · voice: ${voices.join(", ")}`);
  if (slm === "scripted") {
    const note = document.createElement("span");
    note.className = "hint";
    note.textContent = "The scripted model gives every turn the same fixed reply, to check the microphone, voice detection, voice and network without a GPU or weights. For a real model, see the table under “Try it” in the README (Gazelle on a GPU, or any OpenAI-compatible server).";
    ui.about.append(note);
  }
  ui.about.hidden = false;
  stats.slm = slm;
}
async function loadConfig() {
  try {
    const r = await fetch("/config", { cache: "no-store" });
    const c = await r.json();
    showAbout(c.slm, c.voices);
    ui.voice.replaceChildren(...c.voices.map((v) => new Option(v, v)));
    ui.voice.disabled = c.voices.length < 2;
    if (c.system_prompt && !ui.systemPrompt.value) ui.systemPrompt.value = c.system_prompt;
    if (c.first_message && !ui.firstMessage.value) ui.firstMessage.value = c.first_message;
    stats.auth = c.auth === "token" ? "token" : "none";
    ui.accessKeyField.hidden = stats.auth !== "token";
    return true;
  } catch {
    showError("Cannot reach the gazelle server. Is `gazelle serve` running? Reload once it is.");
    return false;
  }
}
var config = loadConfig();
function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) ?? "";
  } catch {
    return "";
  }
}
function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  } catch {
  }
}
async function callToken() {
  const key = ui.accessKey.value.trim();
  if (!key) {
    askForKey();
    return null;
  }
  let headers;
  try {
    headers = new Headers({ Authorization: `Bearer ${key}` });
  } catch {
    showError(
      "The access key has characters that cannot be sent. Check it, enter it again and press Start."
    );
    ui.accessKey.focus();
    return null;
  }
  let r;
  try {
    r = await fetch("/auth/token", { method: "POST", headers, cache: "no-store" });
  } catch {
    showError(UNREACHABLE);
    return null;
  }
  if (r.status === 401) {
    const why = await reasonOf(r);
    storeKey("");
    showError(
      `The server refused the access key${why ? ` (${why})` : ""}. Check the key with the server's operator, enter it again and press Start.`
    );
    ui.accessKey.focus();
    return null;
  }
  if (r.status === 404) {
    showError(
      "The server asks for an access key but has none configured, so it cannot issue call tokens (POST /auth/token: 404). Its operator needs to set an access key."
    );
    return null;
  }
  if (!r.ok) {
    const why = await reasonOf(r);
    showError(
      `The server could not issue a call token (HTTP ${r.status}${why ? `: ${why}` : ""}). Press Start to try again; if it keeps failing, see the server log.`
    );
    return null;
  }
  let token;
  try {
    token = (await r.json()).token;
  } catch {
    token = void 0;
  }
  if (typeof token !== "string" || !token) {
    showError("The server's answer to POST /auth/token has no call token. See the server log.");
    return null;
  }
  return token;
}
function askForKey() {
  showError("This server needs an access key. Enter it in the Access key field and press Start.");
  ui.accessKey.focus();
}
async function reasonOf(r) {
  const text = (await r.text().catch(() => "")).trim().replace(/\s+/g, " ");
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}
async function listMics() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const mics = devices.filter((d) => d.kind === "audioinput");
  const chosen = ui.mic.value;
  ui.mic.replaceChildren(
    new Option("default microphone", ""),
    ...mics.filter((d) => d.deviceId && d.deviceId !== "default").map((d, i) => new Option(d.label || `microphone ${i + 1}`, d.deviceId))
  );
  ui.mic.value = chosen;
}
async function waitForServer() {
  for (; ; ) {
    let health;
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
    const sofar = health.loading_s === void 0 ? "" : ` (${Math.floor(health.loading_s)} s so far)`;
    showError(`The model is loading${sofar}. Waiting for it…`);
    await new Promise((r) => setTimeout(r, 1e3));
    if (stopped()) return false;
  }
}
async function openMic() {
  const audio = { echoCancellation: true, channelCount: 1 };
  if (ui.mic.value) audio.deviceId = { exact: ui.mic.value };
  try {
    return await navigator.mediaDevices.getUserMedia({ audio });
  } catch (e) {
    const name = e.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      showError(
        "Microphone permission denied. Allow microphone access for this site (the icon in the address bar) and press Start again."
      );
    } else if (name === "NotFoundError" || name === "OverconstrainedError") {
      showError("No microphone found. Plug one in or pick another, then press Start.");
    } else {
      showError(`Cannot open the microphone: ${e.message}`);
    }
    return null;
  }
}
var stopped = () => ui.start.dataset.running !== "yes";
async function start() {
  clearError();
  ui.start.dataset.running = "yes";
  ui.start.textContent = "Stop";
  setState("connecting");
  if (!await config) config = loadConfig();
  if (!await config) return stopped() ? void 0 : stop("error");
  if (stopped()) return;
  if (stats.auth === "token" && !ui.accessKey.value.trim()) {
    askForKey();
    return stop("error");
  }
  if (!await waitForServer()) return stopped() ? void 0 : stop("error");
  clearError();
  const stream = await openMic();
  if (!stream) return stop("error");
  if (stopped()) return stream.getTracks().forEach((t) => t.stop());
  void listMics();
  const ctx = new AudioContext();
  try {
    await ctx.resume();
    await ctx.audioWorklet.addModule("/assets/worklet.js");
  } catch (e) {
    showError(`The page's audio worklet did not load: ${e.message}. Reload the page.`);
    stream.getTracks().forEach((t) => t.stop());
    void ctx.close();
    return stop("error");
  }
  const token = stats.auth === "token" ? await callToken() : null;
  if (stats.auth === "token" && token === null || stopped()) {
    stream.getTracks().forEach((t) => t.stop());
    void ctx.close();
    return stopped() ? void 0 : stop("error");
  }
  const capture = new AudioWorkletNode(ctx, "gazelle-capture");
  ctx.createMediaStreamSource(stream).connect(capture);
  const mute = ctx.createGain();
  mute.gain.value = 0;
  capture.connect(mute).connect(ctx.destination);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/conversation`;
  const ws = new WebSocket(token === null ? url : `${url}?token=${encodeURIComponent(token)}`);
  const c = {
    ctx,
    stream,
    ws,
    player: new Player(ctx, ctx.destination),
    level: 0,
    stopping: false,
    bots: /* @__PURE__ */ new Map(),
    refusal: null
  };
  call = c;
  let opened = false;
  const readyTimer = setTimeout(() => {
    if (!stats.ready) {
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
        firstMessage: ui.firstMessage.value.trim()
      })
    );
  };
  ws.onmessage = (e) => onMessage(c, JSON.parse(e.data));
  ws.onclose = (e) => {
    clearTimeout(readyTimer);
    if (c.stopping) return;
    if (!opened) {
      const refused = stats.auth === "token" ? ", or did not accept the call token" : "";
      showError(
        `Cannot connect to ${url}. The server is down or refused the call (it may be at its call limit${refused}).`
      );
    } else if (c.refusal) {
      showError(`${c.refusal} The server closed the call (code ${e.code}).`);
    } else {
      showError(closeText(e.code, e.reason));
    }
    stop("error");
  };
  capture.port.onmessage = (e) => {
    c.level = Math.max(e.data.rms, c.level * 0.85);
    stats.peak = Math.max(stats.peak, e.data.rms);
    if (stats.ready && ws.readyState === WebSocket.OPEN) {
      ws.send(audioMessage(e.data.pcm));
      stats.sent++;
    }
  };
  requestAnimationFrame(tick);
}
function stop(final = "idle") {
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
function onMessage(c, m) {
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
      botBubble(c, m.reply).querySelector(".text").append(`${m.text} `);
      break;
    case "gazelle_clear": {
      const stopped2 = c.player.clear();
      stats.clears.push({ reply: m.reply, stopped: stopped2, paused: m.paused === true });
      const bubble = c.bots.get(m.reply);
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
function errorText(kind, message) {
  switch (kind) {
    case "tts":
      return `The voice (TTS provider) failed: ${message}. The call goes on.`;
    case "slm":
      return `The speech-language model failed: ${message}. The call goes on.`;
    case "call_start":
      return `The server could not start the call: ${message}`;
    case "bad_config":
      return `The server refused the call's settings: ${message}. Fix the system prompt or first message and press Start again.`;
    case "start_timeout":
      return `The call did not start in time: ${message}. Press Start to try again.`;
    case "busy":
      return `The server is busy: ${message}. Try again in a little while.`;
    case "id_in_use":
      return `The server refused the call: its conversation id is already in use (${message}). Press Start to begin a new call.`;
    case "format_changed":
      return `The server refused an audio format change during the call: ${message}. Press Stop, then Start to begin a new call.`;
    case "audio_too_long":
      return `An audio message from the page was too long for the server: ${message}. If this repeats, reload the page.`;
    default:
      return `Server error (${kind}): ${message}`;
  }
}
function closeText(code, reason) {
  const said = reason ? ` The server said: “${reason}”.` : "";
  switch (code) {
    case 1e3:
      return `The server ended the call (code 1000).${said} Press Start to begin a new one.`;
    case 1001:
      return `The server is shutting down or restarting and closed the call (code 1001).${said} Wait a moment, then press Start to reconnect.`;
    case 1008: {
      const check = stats.auth === "token" ? "Check the access key, then press" : "Press";
      return `The server refused the call (code 1008, policy).${said} It does that when its access check fails (the access key, the call token, or this page's origin) or when the call was too slow to start. ${check} Start again; if it keeps happening, open the page from the server's own address or see the server log.`;
    }
    case 1009:
      return `A message was too large for the server (code 1009).${said} Shorten the system prompt or first message and press Start again.`;
    case 1011:
      return `The server hit an internal error and closed the call (code 1011).${said} See the server log, then press Start to try again.`;
    case 1013:
      return `The server is busy: it is at its call limit (code 1013).${said} Try again in a little while.`;
    default:
      return `The connection to the server closed (code ${code}).${said} The server may have stopped; press Start to reconnect.`;
  }
}
function botBubble(c, reply) {
  let el2 = c.bots.get(reply);
  if (!el2) {
    el2 = document.createElement("div");
    el2.className = "turn bot";
    el2.dataset.reply = String(reply);
    el2.innerHTML = '<span class="who">bot</span><span class="text"></span>';
    ui.log.append(el2);
    c.bots.set(reply, el2);
  }
  return el2;
}
function markInterrupted(el2, heard) {
  el2.classList.add("interrupted");
  const text = el2.querySelector(".text");
  const all = (text.textContent ?? "").trim();
  const cut = heard && all.startsWith(heard) ? heard.length : 0;
  const unheard = document.createElement("span");
  unheard.className = "unheard";
  unheard.textContent = all.slice(cut);
  text.replaceChildren(all.slice(0, cut), unheard);
}
function onTimeline(c, t, segment) {
  const el2 = document.createElement("div");
  el2.className = "turn user";
  el2.dataset.reply = String(t.reply);
  const secs = (t.user_audio_ms / 1e3).toFixed(1);
  el2.innerHTML = `<span class="who">you</span><span class="audio-bubble"><span class="wave"></span><span class="duration">${secs} s</span></span>`;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.classList.add("waterfall");
  el2.append(svg);
  const bot = c.bots.get(t.reply);
  if (bot) ui.log.insertBefore(el2, bot);
  else ui.log.append(el2);
  const entry = { ...t, first_audio_played_ms: null };
  stats.timelines.push(entry);
  draw(svg, stages(t, null));
  if (segment && t.first_audio_sent_ms !== null) {
    const sent = t.first_audio_sent_ms;
    segment.whenHeard((heardAt) => {
      entry.first_audio_played_ms = sent + (heardAt - segment.arrivedAt);
      draw(svg, stages(t, entry.first_audio_played_ms));
    });
  }
  el2.scrollIntoView({ block: "nearest" });
}
function tick() {
  const c = call;
  if (!c) return;
  const speaking = c.player.speaking;
  if (stats.ready) setState(speaking ? "speaking" : "listening");
  c.level *= 0.9;
  ui.meter.style.width = `${Math.min(100, Math.sqrt(c.level) * 180)}%`;
  requestAnimationFrame(tick);
}
ui.start.onclick = () => call || ui.start.dataset.running ? stop() : void start();
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
