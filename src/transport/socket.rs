//! What both websocket transports share once a socket is open: its settings (largest frame and
//! the time bounds), the writer task that owns the sink (every write bounded by the send timeout,
//! pings on request, and a close frame whose code says why the call ended), and the reader's
//! keep-alive (a ping every interval, the call ended when nothing arrives for the idle timeout).
//! The writer is generic over the sink so it can be tested with a channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message};
use futures::{Sink, SinkExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::{ErrorKind, Metrics};
use crate::pipeline::Outbound;
use crate::transport::waiting::Seat;

/// The bounds of one call's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketSettings {
    /// Largest text frame the protocol accepts.
    pub max_frame_bytes: usize,
    /// A ping goes out this often, so dead peers and NAT timeouts show up.
    pub ping_interval: Duration,
    /// A call that receives no protocol message (audio, events; pongs do not count) for this
    /// long is ended: both protocols stream audio all the time, so such a peer is gone or idle.
    pub idle_timeout: Duration,
    /// A write that cannot finish within this (a client that stopped reading) ends the call.
    pub send_timeout: Duration,
}

/// Messages the reader asks the writer to put on the wire besides the call's own.
#[derive(Debug)]
pub(crate) enum Control {
    Text(String),
    Ping,
}

/// Why the server ends a socket; decides the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The caller closed the socket or it broke: nothing more to send.
    Hangup,
    /// The caller asked to stop.
    Stopped,
    /// The call ended on its own (its pipeline stopped).
    CallEnded,
    /// Nothing arrived for the idle timeout.
    Idle(Duration),
    /// The server is shutting down.
    Shutdown,
    /// The caller broke a rule the call cannot go on after: the reason.
    Policy(String),
    /// A frame over the socket's size limit.
    TooBig,
    /// No call slot is free.
    Busy,
    /// The server failed.
    Error(String),
}

impl Ending {
    /// The close frame to send, if any: 1000 normal, 1001 going away, 1008 policy, 1009 too big,
    /// 1011 server error, 1013 try again later.
    pub(crate) fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::Hangup => return None,
            Ending::Stopped => (1000, "call ended".to_string()),
            Ending::CallEnded => (1000, "the server ended the call".to_string()),
            Ending::Idle(d) => (1000, format!("nothing received for {} s", d.as_secs())),
            Ending::Shutdown => (1001, "the server is shutting down".to_string()),
            Ending::Policy(why) => (1008, why.clone()),
            Ending::TooBig => (1009, "a message exceeded the size limit".to_string()),
            Ending::Busy => (
                1013,
                "the server is at its call limit; try again later".into(),
            ),
            Ending::Error(why) => (1011, why.clone()),
        };
        Some(CloseFrame {
            code,
            reason: close_reason(&reason).into(),
        })
    }
}

/// A close frame's reason holds at most 123 bytes; cut at a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Why a write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFailure {
    Closed,
    TimedOut,
}

/// Writes one message within `timeout`.
pub(crate) async fn send_within<S>(
    sink: &mut S,
    msg: Message,
    timeout: Duration,
) -> Result<(), SendFailure>
where
    S: Sink<Message> + Unpin,
{
    match tokio::time::timeout(timeout, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SendFailure::Closed),
        Err(_) => Err(SendFailure::TimedOut),
    }
}

/// Sends the close frame for `ending` (if any) and closes the sink, each within `timeout`.
pub(crate) async fn close<S>(sink: &mut S, ending: &Ending, timeout: Duration)
where
    S: Sink<Message> + Unpin,
{
    if let Some(frame) = ending.close_frame() {
        let _ = send_within(sink, Message::Close(Some(frame)), timeout).await;
    }
    let _ = tokio::time::timeout(timeout, sink.close()).await;
}

/// How long the server waits for the caller's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The second half of the closing handshake: after our close frame, reads and drops what the
/// caller still sends until its close frame (or [`CLOSE_WAIT`]). Tearing the connection down with
/// unread bytes in it (a pong, a last audio frame) resets it, and the reset can destroy our
/// close frame before the caller reads it.
pub(crate) async fn await_close<S>(stream: &mut S, ending: &Ending)
where
    S: futures::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    use futures::StreamExt;
    if ending.close_frame().is_none() {
        return;
    }
    let drain = async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}

/// Ends a socket that never split into reader and writer: the close frame, then the caller's.
pub(crate) async fn end<S>(socket: &mut S, ending: &Ending, timeout: Duration)
where
    S: Sink<Message> + futures::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    close(socket, ending, timeout).await;
    await_close(socket, ending).await;
}

/// The writer's half of a call's socket.
pub(crate) struct Writer<E> {
    /// Turns a call message into its wire text; `None` skips it.
    pub encode: E,
    /// Sent when the call ends on its own, before the close frame (Vocode's `websocket_stop`).
    pub farewell: Option<String>,
    pub metrics: Arc<Metrics>,
    pub send_timeout: Duration,
}

impl<E> Writer<E>
where
    E: FnMut(Outbound) -> Option<String>,
{
    /// Writes the call's messages and the reader's control messages until the reader finishes
    /// (`finish` fires with the reason), the call ends, or a write fails or stalls. Cancels
    /// `dead` when it stops, so the reader stops too.
    pub(crate) async fn run<S>(
        mut self,
        mut sink: S,
        mut calls: mpsc::Receiver<Outbound>,
        mut control: mpsc::Receiver<Control>,
        mut finish: oneshot::Receiver<Ending>,
        dead: CancellationToken,
    ) where
        S: Sink<Message> + Unpin,
    {
        let ending = loop {
            let mut due = None;
            let msg = tokio::select! {
                biased;
                e = &mut finish => break e.unwrap_or(Ending::Hangup),
                c = control.recv() => match c {
                    Some(Control::Text(t)) => Message::Text(t.into()),
                    Some(Control::Ping) => Message::Ping(Default::default()),
                    // The reader has returned and is about to say why: wait for it, or a
                    // `Stopped` would go out as a hang-up, with no close frame.
                    None => break (&mut finish).await.unwrap_or(Ending::Hangup),
                },
                m = calls.recv() => match m {
                    Some(m) => {
                        if let Outbound::Audio { due: d, .. } = &m {
                            due = *d;
                        }
                        match (self.encode)(m) {
                            Some(t) => Message::Text(t.into()),
                            None => continue,
                        }
                    }
                    None => {
                        if let Some(bye) = self.farewell.take() {
                            let _ = send_within(&mut sink, Message::Text(bye.into()), self.send_timeout).await;
                        }
                        break Ending::CallEnded;
                    }
                },
            };
            match send_within(&mut sink, msg, self.send_timeout).await {
                Ok(()) => self.metrics.frame_delivered(due),
                Err(SendFailure::Closed) => break Ending::Hangup,
                Err(SendFailure::TimedOut) => {
                    self.metrics.error(ErrorKind::SendTimeout);
                    tracing::warn!(
                        timeout_s = self.send_timeout.as_secs_f64(),
                        "a write to the caller stalled; ending the call"
                    );
                    // The socket is stuck: a close frame would stall the same way.
                    dead.cancel();
                    return;
                }
            }
        };
        close(&mut sink, &ending, self.send_timeout).await;
        dead.cancel();
    }
}

/// A socket's claim on the server's capacity: a seat in the waiting room while it waits for its
/// start message (counted in `gazelle_pending_sockets`), then a call slot, which the call's actor
/// holds. Idle sockets therefore never hold call slots, and the start deadline bounds how long
/// they hold seats.
pub(crate) struct Admission {
    seat: Option<Seat>,
    /// The seat's start deadline, kept once the seat is given back.
    start_timeout: Duration,
    calls: Arc<Semaphore>,
}

impl Admission {
    pub(crate) fn new(seat: Seat, calls: Arc<Semaphore>) -> Self {
        Admission {
            start_timeout: seat.start_timeout(),
            seat: Some(seat),
            calls,
        }
    }

    /// How long this socket may wait for its start message: shorter when the waiting room is
    /// crowded.
    pub(crate) fn start_timeout(&self) -> Duration {
        self.start_timeout
    }

    /// Trades the seat for a call slot; `None` when every call slot is taken.
    pub(crate) fn start_call(&mut self) -> Option<OwnedSemaphorePermit> {
        let call = self.calls.clone().try_acquire_owned().ok()?;
        self.seat = None;
        Some(call)
    }
}

/// A websocket frame, as both protocols see it.
pub(crate) enum Frame {
    Text(axum::extract::ws::Utf8Bytes),
    /// Neither protocol has binary frames.
    Binary,
    /// Over the socket's own size limit: the connection cannot go on (1009).
    TooBig,
    /// The caller closed the socket, or it broke.
    Closed,
    /// Pings and pongs.
    Other,
}

/// What a received websocket message is.
pub(crate) fn frame(msg: Option<Result<Message, axum::Error>>) -> Frame {
    match msg {
        Some(Ok(Message::Text(t))) => Frame::Text(t),
        Some(Ok(Message::Binary(_))) => Frame::Binary,
        Some(Err(e)) if too_big(&e) => Frame::TooBig,
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Frame::Closed,
        Some(Ok(_)) => Frame::Other,
    }
}

/// Whether the socket layer refused a message over its size limit.
fn too_big(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    e.to_string().contains("Space limit exceeded")
}

/// The next frame from a started call's caller, or why the call ends: the server stops, the
/// writer died, or nothing arrived for the idle timeout. Pings go out on the way.
pub(crate) async fn next_frame<S>(
    stream: &mut S,
    keepalive: &mut Keepalive,
    ctl: &mpsc::Sender<Control>,
    server: &CancellationToken,
    dead: &CancellationToken,
) -> Result<Frame, Ending>
where
    S: futures::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    use futures::StreamExt;
    loop {
        let msg = tokio::select! {
            _ = server.cancelled() => return Err(Ending::Shutdown),
            _ = dead.cancelled() => return Err(Ending::Hangup),
            beat = keepalive.beat() => match beat {
                Beat::Ping => {
                    let _ = ctl.try_send(Control::Ping);
                    continue;
                }
                Beat::Idle(quiet) => return Err(Ending::Idle(quiet)),
            },
            m = stream.next() => m,
        };
        let f = frame(msg);
        // Only the protocol's own messages count: a peer that answers pings but sends nothing
        // is not on a call.
        if matches!(f, Frame::Text(_) | Frame::Binary) {
            keepalive.heard();
        }
        return Ok(f);
    }
}

/// The reader's keep-alive: when to ping and when the line counts as dead.
pub(crate) struct Keepalive {
    tick: tokio::time::Interval,
    last_heard: Instant,
    idle: Duration,
}

/// What the keep-alive asks of the reader.
pub(crate) enum Beat {
    Ping,
    Idle(Duration),
}

impl Keepalive {
    pub(crate) fn new(settings: &SocketSettings) -> Self {
        let start = tokio::time::Instant::now() + settings.ping_interval;
        let mut tick = tokio::time::interval_at(start, settings.ping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Keepalive {
            tick,
            last_heard: Instant::now(),
            idle: settings.idle_timeout,
        }
    }

    /// A protocol message arrived from the caller (pongs do not count).
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Waits for the next beat.
    pub(crate) async fn beat(&mut self) -> Beat {
        self.tick.tick().await;
        let quiet = self.last_heard.elapsed();
        if quiet >= self.idle {
            Beat::Idle(quiet)
        } else {
            Beat::Ping
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> Writer<impl FnMut(Outbound) -> Option<String>> {
        Writer {
            encode: |m: Outbound| match m {
                Outbound::Error { message, .. } => Some(message),
                _ => None,
            },
            farewell: Some("bye".into()),
            metrics: Arc::new(Metrics::new()),
            send_timeout: Duration::from_millis(200),
        }
    }

    fn text(m: &Message) -> String {
        match m {
            Message::Text(t) => t.to_string(),
            Message::Close(Some(f)) => format!("close {} {}", f.code, f.reason),
            other => format!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_call_ending_on_its_own_says_goodbye_and_closes_with_1000() {
        let (sink, mut wire) = futures::channel::mpsc::channel::<Message>(16);
        let (calls_tx, calls) = mpsc::channel(4);
        let (_ctl_tx, control) = mpsc::channel(4);
        let (_fin_tx, finish) = oneshot::channel();
        let dead = CancellationToken::new();
        calls_tx
            .send(Outbound::Error {
                kind: ErrorKind::BadJson,
                message: "hello".into(),
            })
            .await
            .unwrap();
        drop(calls_tx);
        writer()
            .run(sink, calls, control, finish, dead.clone())
            .await;
        assert!(dead.is_cancelled());
        let mut got = Vec::new();
        while let Ok(m) = wire.try_recv() {
            got.push(text(&m));
        }
        assert_eq!(
            got,
            ["hello", "bye", "close 1000 the server ended the call"]
        );
    }

    /// The reader drops its control sender when it returns, just before it sends its reason:
    /// the writer must wait for the reason, not close as a hang-up without a close frame (a
    /// stopped call once reached its caller as a bare disconnect this way, under load).
    #[tokio::test]
    async fn a_reader_that_returns_before_saying_why_still_gets_its_close_frame() {
        let (sink, mut wire) = futures::channel::mpsc::channel::<Message>(16);
        let (_calls_tx, calls) = mpsc::channel(4);
        let (ctl_tx, control) = mpsc::channel::<Control>(4);
        let (fin_tx, finish) = oneshot::channel();
        let task = tokio::spawn(writer().run(sink, calls, control, finish, Default::default()));
        drop(ctl_tx);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !task.is_finished(),
            "the writer waits for the reader's reason"
        );
        fin_tx.send(Ending::Stopped).unwrap();
        task.await.unwrap();
        match wire.try_recv() {
            Ok(Message::Close(Some(f))) => assert_eq!(f.code, 1000),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_readers_reason_decides_the_close_code() {
        for (ending, code) in [
            (Ending::Shutdown, Some(1001)),
            (Ending::Busy, Some(1013)),
            (Ending::TooBig, Some(1009)),
            (Ending::Policy("x".repeat(300)), Some(1008)),
            (Ending::Hangup, None),
        ] {
            let (sink, mut wire) = futures::channel::mpsc::channel::<Message>(16);
            let (_calls_tx, calls) = mpsc::channel(4);
            let (ctl_tx, control) = mpsc::channel(4);
            let (fin_tx, finish) = oneshot::channel();
            ctl_tx.send(Control::Ping).await.unwrap();
            let task = tokio::spawn(writer().run(sink, calls, control, finish, Default::default()));
            tokio::time::sleep(Duration::from_millis(20)).await;
            fin_tx.send(ending.clone()).unwrap();
            task.await.unwrap();
            assert!(matches!(wire.try_recv(), Ok(Message::Ping(_))));
            let close = match wire.try_recv() {
                Ok(Message::Close(Some(f))) => {
                    assert!(f.reason.len() <= 123);
                    Some(f.code)
                }
                _ => None,
            };
            assert_eq!(close, code, "{ending:?}");
        }
    }

    /// A client that stops reading: the write never completes, and the call must not wait on it
    /// for ever.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_ends_the_call_after_the_send_timeout() {
        let (sink, _wire) = futures::channel::mpsc::channel::<Message>(0);
        let (calls_tx, calls) = mpsc::channel(4);
        let (_ctl_tx, control) = mpsc::channel(4);
        let (_fin_tx, finish) = oneshot::channel();
        let dead = CancellationToken::new();
        let w = writer();
        let metrics = w.metrics.clone();
        for i in 0..3 {
            let message = format!("m{i}");
            calls_tx
                .send(Outbound::Error {
                    kind: ErrorKind::BadJson,
                    message,
                })
                .await
                .unwrap();
        }
        let started = tokio::time::Instant::now();
        w.run(sink, calls, control, finish, dead.clone()).await;
        assert!(dead.is_cancelled());
        assert!(
            started.elapsed() <= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(metrics.errors.with_label_values(&["send_timeout"]).get(), 1);
    }
}
