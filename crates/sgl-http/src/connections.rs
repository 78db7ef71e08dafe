//! The accept loop: hyper's HTTP/1.1 server with a header-read timeout and a cap on open
//! connections (`axum::serve` offers neither, so slow or idle clients could hold sockets forever).
//!
//! HTTP/1.1 only: hyper's HTTP/2 server has no header-read timeout, and telling the two apart on a
//! cleartext socket waits for the client's first bytes without any timeout at all. The OpenAI
//! clients speak HTTP/1.1.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long to wait before accepting again after an accept error such as running out of file
/// descriptors (retrying at once would spin).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; the next ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the server starts reading
    /// them (at connect, and after each response on a keep-alive connection).
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, asks every open
/// connection to close once its request is answered, and waits for them.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A free slot first, then accept: connections over the cap wait in the kernel's backlog
        // instead of costing a task and buffers here.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) if is_per_connection(&err) => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses are written whole; Nagle's delay would only add latency.
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Errors that concern one connection only (the client gave up before it was accepted).
fn is_per_connection(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
