//! `/metrics`, `/healthz`, `/readyz` and `/status` over HTTP/1.1: GET only,
//! one request per connection, on the agent's tokio runtime. The requests
//! are Prometheus scrapes and probes, so a small server is enough and keeps
//! the agent's dependencies few.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // A client that stalls is dropped, never waited on forever.
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &shared)).await;
        });
    }
}

/// A request's head (up to its blank line); None when the client closed
/// first or sent more than 16 KiB without one.
pub(super) async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() > 16 * 1024 {
            return Ok(None);
        }
        request.extend_from_slice(&buf[..n]);
    }
    Ok(Some(request))
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(request) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            shared.refresh_process_usage();
            (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.encode(),
            )
        }
        ("GET", "/healthz") => match shared.healthy() {
            Ok(()) => (200, "text/plain", "ok\n".to_string()),
            Err(why) => (503, "text/plain", format!("{why}\n")),
        },
        ("GET", "/readyz") => match shared.ready() {
            Ok(()) => (200, "text/plain", "ready\n".to_string()),
            Err(why) => (503, "text/plain", format!("{why}\n")),
        },
        ("GET", "/status") => (200, "application/json", shared.status_json()),
        ("GET", _) => (404, "text/plain", "not found\n".to_string()),
        _ => (405, "text/plain", "only GET\n".to_string()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
