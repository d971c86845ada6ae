//! The limits for the load harness (`benches/load.rs`), two minimal hyper 1.x HTTP/1.1 servers
//! on the same runtime shape as `xsender-events serve`:
//!
//! - `baseline_server ADDR`: reads the whole request body and answers `200
//!   {"status":"accepted"}` at once. No verification, no log, no fsync: whatever rate it reaches
//!   on this machine, with the load generator beside it, is the most any webhook handler could
//!   reach (the HTTP limit).
//! - `baseline_server ADDR --durable FILE`: the same, but answers only once the body is durable
//!   in a SQLite table (WAL, `synchronous=FULL`), written by one thread that takes every body
//!   waiting into one transaction (group commit), as the embedded log does. Nothing else: no
//!   verification, no envelope, no normalizer or projector beside it. The HTTP limit plus the
//!   durable append the embedded default's "2xx means durable" promise costs (the log limit).
//!
//! `cargo run --release --example baseline_server -- 127.0.0.1:9090 [--durable /tmp/b.db]`

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

type Append = (Bytes, oneshot::Sender<bool>);

async fn answer(
    req: Request<hyper::body::Incoming>,
    log: Option<Arc<mpsc::Sender<Append>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as a real handler must before it can verify anything.
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let durable = match log {
        None => true,
        Some(log) => {
            let (tx, rx) = oneshot::channel();
            log.send((body, tx)).await.is_ok() && rx.await.unwrap_or(false)
        }
    };
    let (status, text): (_, &'static [u8]) = if durable {
        (StatusCode::OK, b"{\"status\":\"accepted\"}")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"status\":\"log_unavailable\"}",
        )
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(text)))
        .expect("static response"))
}

/// One writer thread: every body waiting goes into one transaction, one fsync for the group.
fn durable_log(path: &Path) -> rusqlite::Result<mpsc::Sender<Append>> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE IF NOT EXISTS bodies (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);",
    )?;
    let (tx, mut rx) = mpsc::channel::<Append>(16 * 1024);
    std::thread::spawn(move || {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while let Ok(more) = rx.try_recv() {
                group.push(more);
            }
            let ok = (|| {
                let t = conn.transaction()?;
                {
                    let mut st = t.prepare_cached("INSERT INTO bodies (body) VALUES (?1)")?;
                    for (body, _) in &group {
                        st.execute([body.as_ref()])?;
                    }
                }
                t.commit()
            })()
            .is_ok();
            for (_, reply) in group {
                let _ = reply.send(ok);
            }
        }
    });
    Ok(tx)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9090".into());
    let log = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--durable"), Some(file)) => Some(Arc::new(durable_log(Path::new(&file))?)),
        _ => return Err("usage: baseline_server [ADDR] [--durable FILE]".into()),
    };
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("baseline_server listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let log = log.clone();
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| answer(req, log.clone())),
                )
                .await;
        });
    }
}
