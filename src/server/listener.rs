//! The HTTP listener, with the bounds `axum::serve` lacks: at most `max_connections` connections
//! served at once (more wait in the kernel's accept queue) and `max_connections_per_ip` from one
//! address, a deadline for every request's headers (so half-open "slowloris" connections are
//! dropped instead of piling up until file descriptors run out), and on shutdown: stop accepting,
//! let requests in flight finish, close idle connections.
//!
//! A websocket leaves this accounting once it is upgraded; `max_calls` and `max_pending_sockets`
//! bound those.

use std::sync::Arc;
use std::time::Duration;

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
use crate::transport::waiting::PerAddress;

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
    let tracker = TaskTracker::new();
    let mut refused_logged = false;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
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
        let _ = stream.set_nodelay(true);
        // The client's address travels on each request, as axum's `ConnectInfo`.
        let service = TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(router.clone()));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        metrics.open_connections.inc();
        let metrics = metrics.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let finished = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
            };
            if finished.is_none() {
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
            }
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
