//! The HTTP limit for the load harness (`benches/load.rs`): a minimal hyper 1.x HTTP/1.1
//! server on the same runtime shape as `xsender-events serve` that reads the whole request
//! body and answers `200 {"status":"accepted"}` at once. No verification, no log, no fsync:
//! whatever rate it reaches on this machine, with the load generator beside it, is the most
//! any webhook handler could reach.
//!
//! `cargo run --release --example baseline_server -- 127.0.0.1:9090`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as a real handler must before it can verify anything.
    let _ = req.into_body().collect().await;
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"status\":\"accepted\"}")))
        .expect("static response"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9090".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("baseline_server listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
