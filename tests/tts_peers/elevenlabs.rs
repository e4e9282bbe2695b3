//! The ElevenLabs peer: HTTP `/stream`, and the `stream-input` and `multi-stream-input`
//! websockets (contexts, flush, close_context).

use super::*;

fn format_of(output_format: &str) -> Option<(Enc, u32)> {
    if output_format == "ulaw_8000" {
        return Some((Enc::Mulaw, 8_000));
    }
    let rate = output_format.strip_prefix("pcm_")?.parse().ok()?;
    Some((Enc::Pcm, rate))
}

pub(super) async fn http(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    body: String,
) -> Response {
    let b = log.next();
    let fmt = q.get("output_format").cloned().unwrap_or_default();
    log.push(format!("eleven_http format={fmt}"));
    if headers.get("xi-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let Some((enc, _)) = format_of(&fmt) else {
        return status(422);
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    stream_body(
        log.clone(),
        format!("eleven_http {text}"),
        b,
        tone_bytes(&text, enc),
        Vec::new(),
    )
}

pub(super) async fn single(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    eleven_ws(log, headers, q, ws, false).await
}

pub(super) async fn multi(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    eleven_ws(log, headers, q, ws, true).await
}

async fn eleven_ws(
    log: Arc<PeerLog>,
    headers: HeaderMap,
    q: std::collections::HashMap<String, String>,
    ws: WebSocketUpgrade,
    multi: bool,
) -> Response {
    let fmt = q.get("output_format").cloned().unwrap_or_default();
    log.push(format!("eleven_ws connect multi={multi} format={fmt}"));
    if headers.get("xi-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return status(401);
    }
    // The schedule's first entry may refuse the handshake itself.
    let first = log.schedule.lock().unwrap().first().copied();
    match first {
        Some(Behavior::Status(c)) if *log.requests.lock().unwrap() == 0 => {
            *log.requests.lock().unwrap() += 1;
            return status(c);
        }
        Some(Behavior::NoUpgrade) => {
            *log.requests.lock().unwrap() += 1;
            return (StatusCode::OK, "no websockets here").into_response();
        }
        _ => {}
    }
    let Some((enc, _)) = format_of(&fmt) else {
        return status(422);
    };
    ws.on_upgrade(move |socket| eleven_session(socket, log, enc, multi))
}

async fn eleven_session(socket: WebSocket, log: Arc<PeerLog>, enc: Enc, multi: bool) {
    let (mut write, mut read) = socket.split();
    // Outgoing messages; None closes the socket (a truncated stream).
    let (tx, mut rx) = mpsc::channel::<Option<String>>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match m {
                Some(text) => {
                    if write.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => {
                    // Cut short: close without the context's end.
                    let _ = write.close().await;
                    return;
                }
            }
        }
    });
    let mut contexts: std::collections::HashMap<String, tokio_util::sync::CancellationToken> =
        Default::default();
    // Units of one context are spoken in order.
    let mut queues: std::collections::HashMap<String, mpsc::Sender<String>> = Default::default();
    while let Some(Ok(msg)) = read.next().await {
        let Message::Text(t) = msg else { continue };
        let v: serde_json::Value = match serde_json::from_str(&t) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let ctx = v["context_id"].as_str().unwrap_or("").to_string();
        if v["close_context"].as_bool() == Some(true) {
            log.push(format!("close_context {ctx}"));
            if let Some(c) = contexts.remove(&ctx) {
                c.cancel();
            }
            queues.remove(&ctx);
            continue;
        }
        let text = v["text"].as_str().unwrap_or("").to_string();
        if !multi && text.is_empty() {
            // End of a single-context stream: finish what is queued, then isFinal.
            log.push("end of input");
            if let Some(q) = queues.remove(&ctx) {
                let _ = q.send(String::new()).await;
            }
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        log.push(format!(
            "text ctx={ctx} flush={} {}",
            v["flush"],
            text.trim()
        ));
        let cancel = contexts.entry(ctx.clone()).or_default().clone();
        let q = queues.entry(ctx.clone()).or_insert_with(|| {
            let (qtx, qrx) = mpsc::channel(64);
            tokio::spawn(speak_context(
                qrx,
                tx.clone(),
                log.clone(),
                ctx.clone(),
                cancel,
                enc,
                multi,
            ));
            qtx
        });
        let _ = q.send(text).await;
    }
    log.push("ws closed by client");
    writer.abort();
}

async fn speak_context(
    mut texts: mpsc::Receiver<String>,
    out: mpsc::Sender<Option<String>>,
    log: Arc<PeerLog>,
    ctx: String,
    cancel: tokio_util::sync::CancellationToken,
    enc: Enc,
    multi: bool,
) {
    let id = (!ctx.is_empty()).then_some(ctx.clone());
    while let Some(text) = texts.recv().await {
        if text.is_empty() {
            let _ = out
                .send(Some(
                    serde_json::json!({"isFinal": true, "contextId": id}).to_string(),
                ))
                .await;
            return;
        }
        let arrived = Instant::now();
        let b = log.next();
        let pieces = match b {
            Behavior::Slow => 100,
            _ => 4,
        };
        match b {
            Behavior::Delay(d) => tokio::time::sleep(d).await,
            Behavior::Hang => {
                cancel.cancelled().await;
                return;
            }
            Behavior::Status(_) => {
                let msg = serde_json::json!({"error": "quota_exceeded", "message": "quota exceeded", "contextId": id});
                let _ = out.send(Some(msg.to_string())).await;
                return;
            }
            _ => {}
        }
        let bytes = tone_bytes(&text, enc);
        let chars: Vec<String> = text.trim_end().chars().map(String::from).collect();
        let per_bytes = bytes.len().div_ceil(pieces) | 1; // odd, so samples straddle messages
        let messages = bytes.len().div_ceil(per_bytes);
        // Each message's alignment covers the characters its audio speaks, the last one the end.
        let share =
            |i: usize| chars[i * chars.len() / messages..(i + 1) * chars.len() / messages].to_vec();
        for (i, p) in bytes.chunks(per_bytes).enumerate() {
            if cancel.is_cancelled() {
                return;
            }
            if i == 0 {
                log.stamps.lock().unwrap().push((arrived, Instant::now()));
            }
            if b == Behavior::Truncate && i == 1 {
                log.push("truncating");
                let _ = out.send(None).await;
                return;
            }
            let mut c = share(i);
            if i + 1 == messages {
                c.extend(text[text.trim_end().len()..].chars().map(String::from));
            }
            let msg = serde_json::json!({
                "audio": base64::engine::general_purpose::STANDARD.encode(p),
                "isFinal": null,
                "contextId": id,
                "alignment": {"chars": c, "charStartTimesMs": [], "charDurationsMs": []},
            });
            if out.send(Some(msg.to_string())).await.is_err() {
                return;
            }
            if b == Behavior::Slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = multi;
    }
}
