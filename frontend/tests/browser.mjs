// The end-to-end browser test, driven by tests/browser.rs (which starts the server and makes the
// fake-microphone WAV): opens gazelle's page in headless Debian Chromium through playwright-core,
// talks to the bot with the WAV as the microphone, and checks what the page did. Then a tiny page
// built on the public `vocode` React SDK (bundled here with esbuild, never shipped) talks to the
// same server. Prints one JSON summary line prefixed `SUMMARY ` and exits non-zero on any failure.
// The access-key flow (a server whose `/config` says `auth: "token"`) is checked with `/config`,
// `/auth/token` and the websocket faked by playwright's routing, so the server under test needs no key.
//
//   node tests/browser.mjs --url http://127.0.0.1:PORT/ --wav speech.wav --out DIR [--reply TEXT]

import { chromium } from "playwright-core";
import { build } from "esbuild";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1]]);
    return acc;
  }, []),
);
const CHROMIUM = "/usr/bin/chromium";
// headless-shell style UA strings say "HeadlessChrome", which the SDK rejects as unsupported.
const CHROME_UA =
  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36";

class Failure extends Error {}
function fail(message) {
  throw new Failure(message);
}
function check(cond, message) {
  if (!cond) fail(message);
}

async function launch(wav) {
  if (!existsSync(CHROMIUM)) fail(`${CHROMIUM} is missing: install Debian's chromium (scripts/test does)`);
  const profile = mkdtempSync(join(tmpdir(), "gazelle-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    chromiumSandbox: false,
    userAgent: CHROME_UA,
    viewport: { width: 1100, height: 760 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${resolve(wav)}`,
    ],
  });
  return {
    context,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` in the page until it returns a truthy value. */
async function until(page, what, fn, arg, timeoutMs) {
  try {
    const h = await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling: 50 });
    return await h.jsonValue();
  } catch {
    const g = await page.evaluate(() => JSON.stringify(window.gazelle ?? window.sdk ?? null));
    fail(`timed out after ${timeoutMs} ms waiting for ${what}; page state: ${g}`);
  }
}

async function gazellePage(wav, url, out, reply) {
  const browser = await launch(wav);
  const page = await browser.context.newPage();
  const consoleLines = [];
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  try {
    await page.goto(url);
    await page.click("#start");
    await until(page, "websocket_ready", () => window.gazelle.ready, null, 10_000);
    const t0 = Date.now();

    // First turn: the reply's audio is scheduled, its text shows, its waterfall is complete.
    await until(page, "the first reply's timeline", () => window.gazelle.timelines.length >= 1, null, 20_000);
    await until(
      page,
      "first audio played for turn 1",
      () => window.gazelle.timelines[0].first_audio_played_ms !== null,
      null,
      5_000,
    );
    const firstWords = reply.split(/[ ,.]/)[0];
    await until(
      page,
      "the bot's text in the transcript",
      (w) => document.querySelector("#log .turn.bot .text")?.textContent.includes(w),
      firstWords,
      5_000,
    );
    const scheduledBeforeClear = await page.evaluate(() => window.gazelle.scheduled);
    check(scheduledBeforeClear > 0, "no bot audio was scheduled in the page");
    const firstWaterfall = await page.evaluate(() => {
      const turn = document.querySelector("#log .turn.user");
      if (!turn) return null;
      const rows = [...turn.querySelectorAll("svg.waterfall g.stage")];
      return Object.fromEntries(rows.map((g) => [g.dataset.stage, g.dataset.ms === "" ? null : Number(g.dataset.ms)]));
    });
    const wanted = [
      "end_of_speech",
      "vad_end",
      "first_token",
      "first_unit",
      "first_synth_byte",
      "first_audio_sent",
      "first_audio_played",
    ];
    check(firstWaterfall, "no waterfall was drawn for the first turn");
    for (const k of wanted) {
      check(Number.isFinite(firstWaterfall[k]), `waterfall stage ${k} missing: ${JSON.stringify(firstWaterfall)}`);
    }
    const bars = await page.evaluate(
      () => document.querySelectorAll("#log .turn.user svg.waterfall g.stage rect").length,
    );
    check(bars >= wanted.length, `only ${bars} waterfall bars drawn`);

    // The second utterance lands while the reply plays: the page is told to clear and stops the
    // sources it had scheduled.
    const clear = await until(
      page,
      "gazelle_clear from the second utterance",
      () => window.gazelle.clears[0] ?? null,
      null,
      15_000,
    );
    check(clear.stopped > 0, `the clear stopped ${clear.stopped} scheduled sources; playback was not cut`);
    // The first clear may only pause the reply (speech over the bot that might be a cough); the
    // utterance goes on and cuts it.
    await until(
      page,
      "the reply cut by the second utterance",
      () => window.gazelle.clears.find((c) => !c.paused) ?? null,
      null,
      15_000,
    );
    const interrupted = await page.evaluate(() => document.querySelectorAll("#log .turn.bot.interrupted").length);
    check(interrupted >= 1, "the cut reply is not marked interrupted");

    // The reply to the second utterance: screenshot mid-conversation, while the bot speaks.
    await until(
      page,
      "the second reply, speaking",
      () =>
        window.gazelle.timelines.length >= 2 &&
        window.gazelle.timelines[1].first_audio_played_ms !== null &&
        window.gazelle.state === "speaking",
      null,
      20_000,
    );
    await page.waitForTimeout(600);
    const shot = join(out, "frontend-mid-conversation.png");
    await page.screenshot({ path: shot });
    const g = await page.evaluate(() => ({
      timelines: window.gazelle.timelines,
      clears: window.gazelle.clears,
      scheduled: window.gazelle.scheduled,
      received: window.gazelle.received,
      errors: window.gazelle.errors,
      state: window.gazelle.state,
      slm: window.gazelle.slm,
      about: document.getElementById("about")?.hidden ? "" : document.getElementById("about")?.textContent,
    }));
    check(g.errors.length === 0, `the page showed errors: ${JSON.stringify(g.errors)}`);
    const consoleErrors = consoleLines.filter((l) => l.startsWith("error:") || l.startsWith("pageerror:"));
    check(consoleErrors.length === 0, `the page logged errors: ${JSON.stringify(consoleErrors)}`);
    return { ...g, first_waterfall: firstWaterfall, screenshot: shot, seconds: (Date.now() - t0) / 1000 };
  } catch (e) {
    const detail = e instanceof Failure ? e.message : e.stack;
    fail(`${detail}\npage console:\n${consoleLines.join("\n")}`);
  } finally {
    await browser.close();
  }
}

/** Makes the page's `/config` say the server wants an access key (the real answer, plus `auth`). */
function tokenConfig(page) {
  return page.route("**/config", async (r) => {
    const real = await (await r.fetch()).json();
    await r.fulfill({ json: { ...real, auth: "token" } });
  });
}

/** Counts the page's `POST /auth/token` requests in `seen.tokens`, answering each with `answer`. */
function tokenRoute(page, seen, answer) {
  seen.tokens = 0;
  return page.route("**/auth/token", (r) => {
    seen.tokens++;
    return r.fulfill(answer);
  });
}

/**
 * Each failure the page must explain, never hang on: the real page, with the failing piece faked
 * by playwright's routing (a denied microphone, /health saying the model loads, /health
 * unreachable, the socket closing or closed with a code the server gives a meaning, a provider
 * error message, an access key missing or refused). `expect` is the text (or every text of a list)
 * the banner must show; `before` runs between loading the page and pressing Start; `verify` checks
 * what happened besides the banner.
 */
async function errorStates(wav, url) {
  const browser = await launch(wav);
  const shown = {};
  const cases = {
    mic_denied: {
      init: () => {
        navigator.mediaDevices.getUserMedia = () =>
          Promise.reject(new DOMException("denied", "NotAllowedError"));
      },
      expect: "Microphone permission denied",
    },
    model_loading: {
      route: (page) =>
        page.route("**/health", (r) =>
          r.fulfill({ status: 503, json: { status: "loading", loading_s: 12.5 } }),
        ),
      expect: "model is loading (12 s so far)",
    },
    model_failed: {
      route: (page) =>
        page.route("**/health", (r) =>
          r.fulfill({ status: 503, json: { status: "error", error: "config.json not found" } }),
        ),
      expect: "The model failed to load: config.json not found",
    },
    server_down: {
      route: (page) => page.route("**/health", (r) => r.abort("connectionrefused")),
      expect: "server is down",
    },
    socket_refused: {
      route: (page) => page.routeWebSocket(/\/conversation$/, (ws) => ws.close({ code: 1011 })),
      expect: "Cannot connect to",
    },
    socket_closed: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage(() => {
            ws.send(JSON.stringify({ type: "websocket_ready" }));
            ws.close({ code: 1011 });
          });
        }),
      expect: ["internal error", "(code 1011)"],
    },
    // What a browser reports when the server dies mid-call: no code the server chose.
    socket_dropped: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage(() => {
            ws.send(JSON.stringify({ type: "websocket_ready" }));
            ws.close({ code: 1006 });
          });
        }),
      expect: "closed (code 1006)",
    },
    socket_busy: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage((m) => {
            if (!String(m).includes("websocket_audio_config_start")) return;
            ws.close({ code: 1013, reason: "at the call limit (2 calls)" });
          });
        }),
      expect: ["The server is busy", "(code 1013)", "at the call limit (2 calls)"],
    },
    socket_policy: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage((m) => {
            if (!String(m).includes("websocket_audio_config_start")) return;
            ws.close({ code: 1008, reason: "origin not allowed" });
          });
        }),
      expect: ["refused the call (code 1008", "origin not allowed"],
    },
    // The server explains a refused start, then closes: the explanation stays in the banner.
    prompt_too_long: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage((m) => {
            if (!String(m).includes("websocket_audio_config_start")) return;
            const message = "system_prompt has 9000 characters; the limit is 8000";
            ws.send(JSON.stringify({ type: "gazelle_error", kind: "bad_config", message }));
            setTimeout(() => ws.close({ code: 1008, reason: "bad config" }), 100);
          });
        }),
      expect: ["refused the call's settings", "the limit is 8000", "closed the call (code 1008)"],
    },
    key_missing: {
      route: async (page, seen) => {
        await tokenConfig(page);
        await tokenRoute(page, seen, { status: 500, body: "unexpected" });
      },
      before: (page) => page.waitForSelector("#access-key", { state: "visible", timeout: 5_000 }),
      expect: "needs an access key",
      verify: (page, seen) => check(seen.tokens === 0, "the page asked for a token without a key"),
    },
    key_refused: {
      route: async (page, seen) => {
        await tokenConfig(page);
        await tokenRoute(page, seen, { status: 401, contentType: "text/plain", body: "wrong access key" });
        seen.sockets = 0;
        await page.routeWebSocket(/\/conversation/, (ws) => {
          seen.sockets++;
          ws.close();
        });
      },
      before: (page) => page.fill("#access-key", "not-the-key", { timeout: 5_000 }),
      expect: ["The server refused the access key", "wrong access key"],
      verify: async (page, seen) => {
        check(seen.tokens === 1, `the page made ${seen.tokens} token requests for one Start`);
        check(seen.sockets === 0, "the page opened the websocket after its access key was refused");
        const kept = await page.evaluate(() => sessionStorage.getItem("gazelle.access-key"));
        check(kept === null, "the refused access key stayed in sessionStorage");
      },
    },
    tts_failed: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage((m) => {
            if (!String(m).includes("websocket_audio_config_start")) return;
            ws.send(JSON.stringify({ type: "websocket_ready" }));
            const message = "speech synthesis failed";
            ws.send(JSON.stringify({ type: "gazelle_error", kind: "tts", message }));
          });
        }),
      expect: "The voice (TTS provider) failed",
    },
    slm_failed: {
      route: (page) =>
        page.routeWebSocket(/\/conversation$/, (ws) => {
          ws.onMessage((m) => {
            if (!String(m).includes("websocket_audio_config_start")) return;
            ws.send(JSON.stringify({ type: "websocket_ready" }));
            const message = "the model failed: out of memory";
            ws.send(JSON.stringify({ type: "gazelle_error", kind: "slm", message }));
          });
        }),
      expect: "speech-language model failed",
    },
  };
  try {
    for (const [name, c] of Object.entries(cases)) {
      const page = await browser.context.newPage();
      const seen = {};
      if (c.init) await page.addInitScript(c.init);
      if (c.route) await c.route(page, seen);
      await page.goto(url);
      if (c.before) await c.before(page);
      await page.click("#start");
      shown[name] = await until(
        page,
        `the ${name} message`,
        (want) => {
          const e = document.getElementById("error");
          return !e.hidden && want.every((w) => e.textContent.includes(w)) && e.textContent;
        },
        [c.expect].flat(),
        5_000,
      );
      if (c.verify) await c.verify(page, seen);
      await page.close();
    }
  } finally {
    await browser.close();
  }
  return shown;
}

/**
 * A server that wants an access key: `/config` says `auth: "token"`, `/auth/token` and the socket
 * are faked. The page must send the typed key as `Authorization: Bearer <key>` on a bodiless POST,
 * open the websocket with `?token=<the token, URI-encoded>`, get a fresh token for every Start,
 * and keep the key in sessionStorage only: never in localStorage, a URL, the console or a message.
 */
async function accessKey(wav, url) {
  const key = "k3y/with+odd=chars";
  const token = (n) => `call/${n}+token=?&`;
  const browser = await launch(wav);
  const page = await browser.context.newPage();
  const consoleLines = [];
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  const requests = [];
  const sockets = [];
  try {
    await tokenConfig(page);
    await page.route("**/auth/token", async (r) => {
      const q = r.request();
      const headers = await q.allHeaders();
      requests.push({ method: q.method(), authorization: headers.authorization ?? null, body: q.postData() });
      await r.fulfill({ json: { token: token(requests.length), expires_in: 60 } });
    });
    await page.routeWebSocket(/\/conversation(\?|$)/, (ws) => {
      sockets.push(ws.url());
      ws.onMessage((m) => {
        if (String(m).includes("websocket_audio_config_start")) ws.send(JSON.stringify({ type: "websocket_ready" }));
      });
    });
    await page.goto(url);
    await page.fill("#access-key", key, { timeout: 5_000 }); // the field shows once /config says so
    await page.click("#start");
    await until(page, "websocket_ready on a call token", () => window.gazelle.ready, null, 10_000);
    await page.click("#start"); // Stop
    await until(page, "the first call to stop", () => window.gazelle.state === "idle", null, 5_000);
    await page.click("#start");
    await until(page, "websocket_ready on a second call token", () => window.gazelle.ready, null, 10_000);

    check(requests.length === 2, `${requests.length} token requests for two Starts: ${JSON.stringify(requests)}`);
    for (const r of requests) {
      check(r.method === "POST", `the token request was a ${r.method}`);
      check(r.authorization === `Bearer ${key}`, "the token request did not carry `Authorization: Bearer <key>`");
      check(!r.body, "the token request had a body");
    }
    check(sockets.length === 2, `${sockets.length} websockets for two Starts`);
    sockets.forEach((u, i) => {
      const want = `/conversation?token=${encodeURIComponent(token(i + 1))}`;
      check(u.endsWith(want), `websocket ${i + 1} opened at ${u}, not at …${want}`);
    });
    const g = await page.evaluate(() => ({
      auth: window.gazelle.auth,
      errors: window.gazelle.errors,
      session: sessionStorage.getItem("gazelle.access-key"),
      local: JSON.stringify(localStorage),
      url: location.href,
    }));
    check(g.auth === "token", `the page read auth ${g.auth} from /config`);
    check(g.errors.length === 0, `the page showed errors: ${JSON.stringify(g.errors)}`);
    check(g.session === key, "the access key is not in sessionStorage");
    const leaks = [g.local, g.url, ...sockets, ...g.errors, ...consoleLines].filter((s) => s.includes(key));
    check(leaks.length === 0, `the access key leaked into localStorage, a URL, a message or the console`);
    const consoleErrors = consoleLines.filter((l) => l.startsWith("error:") || l.startsWith("pageerror:"));
    check(consoleErrors.length === 0, `the page logged errors: ${JSON.stringify(consoleErrors)}`);

    // The key outlives a reload of the tab (sessionStorage), so the user need not type it again.
    await page.reload();
    await page.waitForSelector("#access-key", { state: "visible", timeout: 5_000 });
    const refilled = await page.inputValue("#access-key");
    check(refilled === key, "the access key was not kept for this tab across a reload");
    return {
      token_requests: requests.length,
      sockets: sockets.map((u) => new URL(u).pathname + new URL(u).search),
      kept_after_reload: true,
    };
  } catch (e) {
    const detail = e instanceof Failure ? e.message : e.stack;
    fail(`access key: ${detail}\npage console:\n${consoleLines.join("\n")}`);
  } finally {
    await browser.close();
  }
}

/** The public vocode React SDK in self-hosted mode, against our /conversation. */
async function sdkPage(wav, url) {
  const dir = mkdtempSync(join(tmpdir(), "gazelle-sdk-"));
  try {
    await build({
      entryPoints: [join(here, "sdk-page.js")],
      outfile: join(dir, "sdk.js"),
      bundle: true,
      format: "iife",
      platform: "browser",
      define: { "process.env.NODE_ENV": '"production"' },
      logLevel: "error",
    });
  } catch (e) {
    fail(`the vocode SDK page does not bundle: ${e.message}`);
  }
  const js = await readFile(join(dir, "sdk.js"));
  const html = '<!doctype html><meta charset="utf-8"><div id="root"></div><script src="/sdk.js"></script>';
  const server = createServer((req, res) => {
    if (req.url.startsWith("/sdk.js")) res.writeHead(200, { "content-type": "text/javascript" }).end(js);
    else res.writeHead(200, { "content-type": "text/html" }).end(html);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const backend = new URL("conversation", url).href.replace(/^http/, "ws");
  const browser = await launch(wav);
  const page = await browser.context.newPage();
  // Count what the server sends, beneath the SDK.
  await page.addInitScript(() => {
    window.wire = { audio: 0, transcripts: [], types: {} };
    const Native = window.WebSocket;
    window.WebSocket = class extends Native {
      constructor(...a) {
        super(...a);
        this.addEventListener("message", (e) => {
          const m = JSON.parse(e.data);
          window.wire.types[m.type] = (window.wire.types[m.type] ?? 0) + 1;
          if (m.type === "websocket_audio") window.wire.audio++;
        });
      }
    };
  });
  try {
    await page.goto(`http://127.0.0.1:${server.address().port}/?backend=${encodeURIComponent(backend)}`);
    await page.click("#go");
    await until(page, "the SDK to connect", () => window.sdk?.status === "connected", null, 10_000);
    await until(page, "bot audio through the SDK", () => window.sdk.spoke, null, 20_000);
    return await page.evaluate(() => ({ sdk: window.sdk, wire: window.wire }));
  } finally {
    await browser.close();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

try {
  const reply = args.reply ?? "Sure";
  const summary = { page: await gazellePage(args.wav, args.url, args.out, reply) };
  summary.errors = await errorStates(args.wav, args.url);
  summary.auth = await accessKey(args.wav, args.url);
  summary.sdk = await sdkPage(args.wav, args.url);
  check(summary.sdk.wire.audio > 0, "the SDK page got no bot audio");
  console.log(`SUMMARY ${JSON.stringify(summary)}`);
} catch (e) {
  console.error(`FAIL: ${e instanceof Failure ? e.message : e.stack}`);
  process.exit(1);
}
