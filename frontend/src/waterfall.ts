// The per-turn latency waterfall: one SVG bar per stage, from the true end of the user's speech
// (time 0) to the moment that stage happened. Server stages come from `gazelle_timeline`; the last
// one, first audio played, is measured in the browser (see frontend/README.md for the method).

import type { Timeline } from "./protocol";

export interface Stage {
  key: string;
  label: string;
  ms: number | null;
}

export function stages(t: Timeline, playedMs: number | null): Stage[] {
  const p = t.end_of_turn_probability;
  const decision = p === null || p === undefined ? "turn end" : `turn end (p=${p.toFixed(2)})`;
  const rows: Stage[] = [{ key: "end_of_speech", label: "end of speech", ms: 0 }];
  // The smart turn policy's pause, and a reply started there, come only when they happened.
  if (t.pause_ms !== undefined && t.pause_ms !== null) {
    rows.push({ key: "pause", label: "pause noticed", ms: t.pause_ms });
  }
  if (t.preemptive_start_ms !== undefined && t.preemptive_start_ms !== null) {
    rows.push({ key: "preemptive_start", label: "preemptive start", ms: t.preemptive_start_ms });
  }
  rows.push(
    { key: "first_token", label: "first token", ms: t.first_token_ms },
    { key: "first_unit", label: "first text unit", ms: t.first_unit_ms },
    { key: "first_synth_byte", label: "first TTS byte", ms: t.first_synth_byte_ms },
    { key: "vad_end", label: decision, ms: t.vad_end_ms },
  );
  if (t.commit_ms !== undefined && t.commit_ms !== null) {
    rows.push({ key: "commit", label: "commit", ms: t.commit_ms });
  }
  rows.push(
    { key: "first_audio_sent", label: "first audio sent", ms: t.first_audio_sent_ms },
    { key: "first_audio_played", label: "first audio played", ms: playedMs },
  );
  return rows;
}

const SVG = "http://www.w3.org/2000/svg";
const ROW = 16;
const LABEL_W = 118;
const WIDTH = 460;
const VALUE_W = 62;

function el(name: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Draws (or redraws) the waterfall of one turn into `svg`. */
export function draw(svg: SVGSVGElement, rows: Stage[]): void {
  svg.replaceChildren();
  const height = rows.length * ROW + 18;
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  svg.setAttribute("width", String(WIDTH));
  svg.setAttribute("height", String(height));
  const known = rows.map((r) => r.ms ?? 0);
  // Round the scale up to a whole 100 ms so turns are easy to compare by eye.
  const span = Math.max(100, Math.ceil(Math.max(...known) / 100) * 100);
  const plot = WIDTH - LABEL_W - VALUE_W;
  const x = (ms: number) => LABEL_W + (ms / span) * plot;
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
