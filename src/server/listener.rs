//! The HTTP listener, with the bounds `axum::serve` lacks:
//! - at most `max_connections` connections served at once and `max_connections_per_ip` from one
//!   address (an IPv6 /64 counting as one);
//! - a deadline for every request's headers, so half-open "slowloris" connections are dropped
//!   instead of piling up until file descriptors run out. It shrinks as the pool fills (the full
//!   `header_read_timeout_ms` up to half full, then in proportion to the slots left, down to a
//!   second);
//! - when every slot is taken, a new connection is still accepted, and the connection that has
//!   waited longest for a request's headers (a slowloris, or an idle keep-alive) is closed to make
//!   room, so clients from many addresses cannot hold the pool and leave `/health` and new
//!   callers queued in the kernel. Only when every connection has a request in flight does a new
//!   one wait for a slot;
//! - on shutdown: stop accepting, let requests in flight finish, close idle connections.
//!
//! A websocket leaves this accounting once it is upgraded; `max_calls` and `max_pending_sockets`
//! bound those.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use crate::metrics::{ErrorKind, Metrics};
use crate::transport::waiting::{shrinking_timeout, PerAddress};

#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenSettings {
    pub max_connections: usize,
    /// 0: no cap per address.
    pub max_connections_per_ip: usize,
    pub header_read_timeout: Duration,
}

/// Accept errors that concern one connection (the peer gave up), not the listener.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The connections being served, so that a full pool can close the one that has waited longest
/// for a request.
struct Served {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// One served connection.
struct Conn {
    /// Requests in flight (HTTP/1 serves one at a time).
    requests: AtomicUsize,
    /// Milliseconds after `Served::epoch` when it began to wait for a request's headers (it was
    /// accepted, or answered its last request).
    waiting_since_ms: AtomicU64,
    evict: CancellationToken,
}

impl Served {
    fn new() -> Self {
        Served {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let conn = Arc::new(Conn {
            requests: AtomicUsize::new(0),
            waiting_since_ms: AtomicU64::new(self.now_ms()),
            evict: CancellationToken::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .expect("served connections lock")
            .insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .expect("served connections lock")
            .remove(&id);
    }

    /// Tells the connection that has waited longest for a request's headers to close; false when
    /// every connection has a request in flight.
    fn evict_longest_waiting(&self) -> bool {
        let mut conns = self.conns.lock().expect("served connections lock");
        let oldest = conns
            .iter()
            .filter(|(_, c)| c.requests.load(Ordering::Acquire) == 0)
            .min_by_key(|(&id, c)| (c.waiting_since_ms.load(Ordering::Relaxed), id))
            .map(|(&id, _)| id);
        match oldest.and_then(|id| conns.remove(&id)) {
            Some(conn) => {
                conn.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// The router's service for one connection, counting the requests in flight on it.
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    served: Arc<Served>,
}

/// A request in flight; when it is answered the connection waits for the next one.
struct InFlight {
    conn: Arc<Conn>,
    served: Arc<Served>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .waiting_since_ms
            .store(self.served.now_ms(), Ordering::Relaxed);
        self.conn.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for Tracked<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: hyper::Request<B>) -> Self::Future {
        self.conn.requests.fetch_add(1, Ordering::AcqRel);
        // A websocket upgrade hands the connection over once answered: it stays busy until it
        // goes, so no eviction cuts the handover.
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let in_flight = (!upgrade).then(|| InFlight {
            conn: self.conn.clone(),
            served: self.served.clone(),
        });
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(in_flight);
            r
        })
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the HTTP requests in
/// flight (not for upgraded websockets, which the caller waits for).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ListenSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let per_ip = PerAddress::default();
    let served = Arc::new(Served::new());
    let tracker = TaskTracker::new();
    let (mut refused_logged, mut full_logged) = (false, false);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(ip_slot) = per_ip.claim(peer.ip(), settings.max_connections_per_ip) else {
            metrics.error(ErrorKind::TooManyConnectionsPerIp);
            if !refused_logged {
                refused_logged = true;
                tracing::warn!(
                    %peer,
                    max = settings.max_connections_per_ip,
                    "refusing connections from an address over server.max_connections_per_ip \
                     (logged once)"
                );
            }
            continue;
        };
        let permit = loop {
            if let Ok(p) = slots.clone().try_acquire_owned() {
                break Some(p);
            }
            if served.evict_longest_waiting() {
                metrics.error(ErrorKind::ConnectionsFull);
                if !full_logged {
                    full_logged = true;
                    tracing::warn!(
                        max = settings.max_connections,
                        "every connection slot is taken (server.max_connections): closing the \
                         connection that waited longest for a request, to let a new one in \
                         (logged once)"
                    );
                }
            }
            // The closed connection gives its slot back at once; if every connection has a
            // request in flight, one of them will soon.
            tokio::select! {
                _ = stop.cancelled() => break None,
                p = slots.clone().acquire_owned() => break Some(p.expect("the semaphore is never closed")),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        let Some(permit) = permit else { break };
        let taken = settings.max_connections - slots.available_permits();
        let header_timeout = shrinking_timeout(
            settings.header_read_timeout,
            taken,
            settings.max_connections,
        );
        let _ = stream.set_nodelay(true);
        let (id, conn) = served.add();
        // The client's address travels on each request, as axum's `ConnectInfo`.
        let service = Tracked {
            inner: TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(router.clone())),
            conn: conn.clone(),
            served: served.clone(),
        };
        let http = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        metrics.open_connections.inc();
        let metrics = metrics.clone();
        let stop = stop.clone();
        let served = served.clone();
        tracker.spawn(async move {
            let mut http = std::pin::pin!(http);
            let finished = tokio::select! {
                r = http.as_mut() => Some(r),
                _ = stop.cancelled() => None,
                _ = conn.evict.cancelled() => None,
            };
            // Stopping, or evicted just as a request came in: answer what is in flight, then
            // close. Evicted while waiting for a request: dropped, which closes it.
            let waiting = conn.requests.load(Ordering::Acquire) == 0;
            if finished.is_none() && (stop.is_cancelled() || !waiting) {
                http.as_mut().graceful_shutdown();
                let _ = http.as_mut().await;
            }
            served.remove(id);
            metrics.open_connections.dec();
            drop((permit, ip_slot));
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Raises this process's open-file limit to its hard limit, so the connection caps, not the
/// descriptor table, decide how many clients are served. Returns the limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(lim.rlim_cur as u64)
    }
}
