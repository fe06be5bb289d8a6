//! The accept loop: hyper HTTP/1.1 with explicit limits (a client has
//! `header_read_timeout_secs` to send its headers, at most 100 headers in
//! 64 KiB, else 431), at most `max_connections` open connections (past
//! that, new ones wait in the kernel's backlog), the peer address put into
//! each request, and a graceful stop: on shutdown the listener closes, idle
//! keep-alive connections close, in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use super::PeerAddr;

/// Most request headers taken (hyper answers 431 above).
const MAX_HEADERS: usize = 100;
/// Largest request head (line + headers) taken (431 above).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Serves `routes` on `listener` until `shutdown` completes, then waits for
/// open requests to finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let service = warp::service(routes);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let per_request = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                // Only the admin API reads it (its loopback check), and a
                // request's first extension allocates their map: a path that
                // can reach that API names it. Any other goes without, and
                // the check, finding none, refuses.
                if request.uri().path().contains("admin") {
                    request.extensions_mut().insert(PeerAddr(peer));
                }
                let mut service = service.clone();
                service.call(request)
            },
        );
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            // While a request waits for its group commit, hyper would
            // otherwise read the socket to see whether the client left: a
            // read syscall and a new 8 KiB read buffer on every request
            // (the old one still backs the request's headers), and a client
            // that shut its sending side after the request would lose its
            // answer. A client that left is found when the answer is written,
            // so its connection slot is held until then: milliseconds, or
            // up to the pipeline's 30 s call limit while the store stalls.
            .half_close(true)
            .serve_connection(TokioIo::new(stream), per_request);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, slot)),
        Err(e) => {
            // EMFILE and friends: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
