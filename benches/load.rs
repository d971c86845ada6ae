//! Load harness: drives `xsender-events serve` (a child process on the embedded default) and,
//! in the same run, `examples/baseline_server` (a hyper handler that answers 200 at once: the
//! HTTP limit; and the same handler answering once the body is durable in a group-committed
//! SQLite table: the embedded log's limit) with signed webhook traffic over keep-alive
//! HTTP/1.1 connections to 127.0.0.1.
//!
//! Phases (each bounded in time and so in count):
//! 1. per shape (SendGrid batches of 100, single Mailgun, single Mailjet): closed loop at
//!    `--concurrency`, against both baselines and then the server: requests/s, events/s,
//!    latency;
//! 2. the mix (`--mix`, by requests) closed loop: the server's peak;
//! 3. the mix open loop at `--load-fraction` of that peak: latency measured from each request's
//!    scheduled send time (no coordinated omission), and the delay until a sample of accepted
//!    events is visible in the read API;
//! 4. a soak at the same rate: the server's RSS sampled every second (flat or not);
//! 5. optionally, `--rebuild-events N`: fill the log to N events, stop the server, time
//!    `xsender-events rebuild`.
//!
//! Results go to stdout and, as JSON, to `--out` (read by `scripts/bench-report.py`).
//!
//! SES is not in the HTTP mix: the production SES adapter fetches the SNS signing certificate
//! from `https://sns.<region>.amazonaws.com` (no local override exists outside tests, on
//! purpose), so SES is measured in criterion (`benches/pipeline.rs`, group `ses`) with the local
//! test signer.
//!
//! Other backends (Kafka log, CQL store): start them yourself and pass
//! `--target external --url http://127.0.0.1:PORT --pid PID`, after configuring it with the
//! tenants file `--write-tenants FILE` writes (the generator's keys are fixed, so the file stays
//! valid); the same phases then run against that server. `scripts/bench.sh` does this for the
//! Kafka log with CQL projections (its cluster phase), with `--aux-pid kafka=PID --aux-pid
//! cassandra=PID` (their CPU per phase), `--warmup`, `--settle-max` (bounded waits for the
//! projections between phases) and `--write-payloads FILE` (SendGrid-100 records, sized as
//! ingress writes them to Kafka, for Kafka's own ProducerPerformance on the same node).
//! `--skip-peaks --rate R` runs only the open loop at R requests/s (visibility at a given rate).
//!
//! `cargo bench --bench load -- --help`

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::Parser;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
#[command(about = "Load harness for xsender-events (127.0.0.1 only)")]
struct Args {
    /// Passed by `cargo bench`; without it (`cargo test --all-targets`) the harness does nothing.
    #[arg(long, hide = true)]
    bench: bool,
    /// `embedded` (spawn `xsender-events serve`) or `external` (--url, --pid).
    #[arg(long, default_value = "embedded")]
    target: String,
    #[arg(long)]
    url: Option<String>,
    #[arg(long)]
    pid: Option<u32>,
    /// Write the generator's tenants file (keys included) and exit.
    #[arg(long)]
    write_tenants: Option<PathBuf>,
    /// Write `--payloads` SendGrid-100 payloads for Kafka's ProducerPerformance (one a line,
    /// each the size of the Kafka record our ingress writes for that request: Avro envelope +
    /// key + headers), print their sizes as JSON, and exit.
    #[arg(long)]
    write_payloads: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    payloads: usize,
    /// Longest wait, after a closed-loop phase, for the projections to catch up before the next
    /// phase starts (a backlog left then is reported, and weighs on the next phases).
    #[arg(long, default_value_t = 600)]
    settle_max: u64,
    /// Seconds of the mix, closed loop and not measured, before the server's phases: warms a
    /// freshly started server and its backends (a Kafka broker's JIT, consumer group joins).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Skip the closed-loop phases (per stream and the mix's peak): only the open loop at
    /// `--rate` (and the soak), e.g. visibility at a rate the projections can sustain.
    #[arg(long, requires = "rate")]
    skip_peaks: bool,
    /// Other processes whose CPU to report per phase, `NAME=PID` (e.g. the Kafka broker).
    #[arg(long)]
    aux_pid: Vec<String>,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Open connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Mix by requests: sendgrid batch size and weights, `sg100:1,mailgun:4,mailjet:4`.
    #[arg(long, default_value = "sg100:1,mailgun:4,mailjet:4")]
    mix: String,
    /// Fraction of the mix's peak request rate for the latency and soak phases.
    #[arg(long, default_value_t = 0.5)]
    load_fraction: f64,
    /// A fixed rate (requests/s) for the latency and soak phases instead of a fraction of peak.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of soak (RSS over time); 0 skips it.
    #[arg(long, default_value_t = 60)]
    soak: u64,
    /// Fill the log to this many events and time `xsender-events rebuild`; 0 skips it.
    #[arg(long, default_value_t = 0)]
    rebuild_events: u64,
    /// Skip the baseline servers.
    #[arg(long)]
    no_baseline: bool,
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Also time `rebuild` with this (older) binary on the same log, for a before/after ratio.
    #[arg(long)]
    rebuild_compare_bin: Option<PathBuf>,
    /// JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the server's data folder here (default: a temporary folder).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

// ------------------------------------------------------------------ traffic

const TENANT: &str = "acme";
const API_TOKEN: &str = "load-read-token-0123456789abcdef";
const MAILGUN_KEY: &str = "mg-signing-key-load-0123456789";
const MJ_API_KEY: &str = "mjkey-load";
const MJ_USER: &str = "mj-load";
const MJ_PASS: &str = "mj-password-load-0123456789";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    SendGrid(usize),
    Mailgun,
    Mailjet,
}

impl Shape {
    fn name(self) -> String {
        match self {
            Shape::SendGrid(n) => format!("sendgrid_{n}"),
            Shape::Mailgun => "mailgun".into(),
            Shape::Mailjet => "mailjet".into(),
        }
    }
    fn parse(s: &str) -> Shape {
        match s {
            "mailgun" => Shape::Mailgun,
            "mailjet" => Shape::Mailjet,
            s if s.starts_with("sg") => Shape::SendGrid(s[2..].parse().expect("sgN")),
            _ => panic!("unknown shape {s}"),
        }
    }
}

struct Traffic {
    sendgrid: SigningKey,
    mailgun_doc: Value,
    mailjet_doc: Value,
    host: String,
    run: u64,
    seq: AtomicU64,
}

/// One prepared request: the bytes to write and the dispatch id its first event lands on.
struct Prepared {
    bytes: Vec<u8>,
    dispatch: String,
    events: u64,
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

impl Traffic {
    fn new(host: String) -> Traffic {
        let mailgun: Value = serde_json::from_slice(&fixture("mailgun/delivered.json")).unwrap();
        Traffic {
            // A fixed key, so an external server configured once with --write-tenants verifies
            // every later run (the key signs only local test traffic).
            sendgrid: SigningKey::from_slice(&[7u8; 32]).unwrap(),
            mailgun_doc: mailgun["event-data"].clone(),
            mailjet_doc: serde_json::from_slice(&fixture("mailjet/open.json")).unwrap(),
            host,
            run: rand::random::<u32>() as u64,
            seq: AtomicU64::new(0),
        }
    }

    fn tenants_toml(&self) -> String {
        let vk = B64.encode(
            self.sendgrid
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes(),
        );
        format!(
            "[tenants.{TENANT}]\napi_token = \"{API_TOKEN}\"\n\
             [tenants.{TENANT}.sendgrid]\nverification_key = \"{vk}\"\n\
             [tenants.{TENANT}.mailgun]\nsigning_key = \"{MAILGUN_KEY}\"\n\
             [tenants.{TENANT}.mailjet]\napi_key = \"{MJ_API_KEY}\"\nusername = \"{MJ_USER}\"\npassword = \"{MJ_PASS}\"\n"
        )
    }

    fn http(&self, path: &str, ctype: &str, extra: &[(&str, String)], body: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n",
            self.host,
            body.len()
        );
        for (k, v) in extra {
            h += &format!("{k}: {v}\r\n");
        }
        h += "\r\n";
        let mut out = h.into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// A fresh, distinct, signed request: every event has its own dispatch and event ids.
    fn next(&self, shape: Shape) -> Prepared {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let run = self.run;
        let now = chrono::Utc::now().timestamp();
        let dispatch = format!("L{run}-{seq}");
        match shape {
            Shape::SendGrid(n) => {
                let mut body = Vec::with_capacity(n * 480);
                body.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        body.extend_from_slice(b",\r\n");
                    }
                    let kind = ["delivered", "open", "click", "processed"][i % 4];
                    let d = if i == 0 {
                        dispatch.clone()
                    } else {
                        format!("{dispatch}-{i}")
                    };
                    body.extend_from_slice(format!(
                        r#"{{"email":"user{seq}x{i}@example.com","timestamp":{now},"smtp-id":"<M{seq}x{i}@ismtpd0001p1iad1.sendgrid.net>","event":"{kind}","category":["newsletter"],"sg_event_id":"ZXZlbnQt{run}x{seq}x{i}","sg_message_id":"M{seq}x{i}.filterdrecv-5bd8c7b8d-7xkqz-1-6750A1B2-3.0","useragent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)","ip":"203.0.113.9","url":"https://shop.example.com/p/{i}","xs_tenant":"{TENANT}","xs_campaign":"load","xs_dispatch":"{d}"}}"#
                    ).as_bytes());
                }
                body.extend_from_slice(b"]\r\n");
                let ts = now.to_string();
                let mut msg = ts.as_bytes().to_vec();
                msg.extend_from_slice(&body);
                let sig: Signature = self.sendgrid.sign(&msg);
                let bytes = self.http(
                    "/api/webhook/email/sendgrid",
                    "application/json",
                    &[
                        ("x-twilio-email-event-webhook-timestamp", ts),
                        (
                            "x-twilio-email-event-webhook-signature",
                            B64.encode(sig.to_der().as_bytes()),
                        ),
                    ],
                    &body,
                );
                Prepared {
                    bytes,
                    dispatch,
                    events: n as u64,
                }
            }
            Shape::Mailgun => {
                use hmac::{Hmac, Mac};
                let mut data = self.mailgun_doc.clone();
                data["user-variables"] =
                    json!({"xs_tenant": TENANT, "xs_campaign": "load", "xs_dispatch": dispatch});
                data["recipient"] = json!(format!("mg{seq}@example.com"));
                data["id"] = json!(format!("mg-{run}-{seq}"));
                data["timestamp"] = json!(now as f64 + 0.25);
                let ts = now.to_string();
                let token = format!("{run:016x}{seq:034x}");
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(MAILGUN_KEY.as_bytes()).unwrap();
                mac.update(ts.as_bytes());
                mac.update(token.as_bytes());
                let sig = hex::encode(mac.finalize().into_bytes());
                let body = serde_json::to_vec(&json!({
                    "signature": {"timestamp": ts, "token": token, "signature": sig},
                    "event-data": data,
                }))
                .unwrap();
                Prepared {
                    bytes: self.http("/api/webhook/email/mailgun", "application/json", &[], &body),
                    dispatch,
                    events: 1,
                }
            }
            Shape::Mailjet => {
                let mut ev = self.mailjet_doc.clone();
                ev["time"] = json!(now);
                ev["email"] = json!(format!("mj{seq}@example.com"));
                ev["MessageID"] = json!(1_000_000_000u64 * run + seq);
                ev["Payload"] = json!(json!({"xs_tenant": TENANT, "xs_campaign": "load", "xs_dispatch": dispatch, "mj_api_key": MJ_API_KEY}).to_string());
                let body = serde_json::to_vec(&ev).unwrap();
                let auth = format!("Basic {}", B64.encode(format!("{MJ_USER}:{MJ_PASS}")));
                Prepared {
                    bytes: self.http(
                        "/api/webhook/email/mailjet",
                        "application/json",
                        &[("authorization", auth)],
                        &body,
                    ),
                    dispatch,
                    events: 1,
                }
            }
        }
    }
}

// ------------------------------------------------------------------ a minimal HTTP/1.1 client

/// Keep-alive HTTP/1.1 over one TCP connection; the answers we read carry `content-length`.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn send(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(req).await?;
        self.buf.clear();
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap_or("");
                let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    self.fill().await?;
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                return Ok((status, body));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

// ------------------------------------------------------------------ phases

#[derive(Default)]
struct Tally {
    ok: u64,
    events: u64,
    errors: u64,
    statuses: Vec<u16>,
    lat_us: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct PhaseResult {
    target: String,
    phase: String,
    seconds: f64,
    requests_ok: u64,
    errors: u64,
    requests_per_s: f64,
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Server CPU cores used on average (utime+stime / wall), and the generator's.
    server_cores: f64,
    client_cores: f64,
    visible_p50_ms: Option<f64>,
    visible_p99_ms: Option<f64>,
    visible_max_ms: Option<f64>,
    visible_samples: usize,
    /// The same delay counted from when the request was sent (webhook in → row visible).
    visible_in_p50_ms: Option<f64>,
    visible_in_p99_ms: Option<f64>,
    /// CPU cores of the `--aux-pid` processes, and of the whole machine (every process and the
    /// kernel, from /proc/stat: user, system, irq, softirq), over the phase; steal (time the
    /// hypervisor gave to other guests while this one wanted to run) apart.
    aux_cores: std::collections::BTreeMap<String, f64>,
    machine_cores: f64,
    machine_softirq_cores: f64,
    machine_steal_cores: f64,
    /// Seconds until the projections caught up after the phase (None: not waited for), and
    /// whether they did within `--settle-max`.
    settled_after_s: Option<f64>,
    settled: Option<bool>,
    /// Seconds the visibility probe still waited for its samples after the load stopped.
    probe_wait_s: f64,
    rss_start_mib: Option<f64>,
    rss_end_mib: Option<f64>,
    rss_max_mib: Option<f64>,
    error_statuses: Vec<u16>,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')').unwrap_or(0) + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// CPU seconds of the whole machine from the first line of /proc/stat: (busy = user, nice,
/// system, irq, softirq; softirq alone; steal).
fn machine_busy_secs() -> (f64, f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (at(0) + at(1) + at(2) + at(5) + at(6), at(6), at(7))
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.trim_start_matches(':').trim();
        v.trim_end_matches("kB").trim().parse::<f64>().ok()
    })
}

struct Target {
    name: String,
    addr: String,
    pid: Option<u32>,
    /// `--aux-pid` processes measured beside the server.
    aux: Vec<(String, u32)>,
    /// Has a read API to probe visibility on.
    probes: bool,
}

/// Runs `shapes` (cycled by weight) over `concurrency` connections for `secs`. With a `rate`
/// (requests/s) the loop is open: request k of a connection is due at start + k·period, and its
/// latency counts from then.
#[allow(clippy::too_many_arguments)] // one call site per phase kind; a struct would only rename them
async fn run_phase(
    traffic: &Arc<Traffic>,
    target: &Target,
    phase: &str,
    shapes: &[Shape],
    concurrency: usize,
    secs: f64,
    rate: Option<f64>,
    soak_rss: bool,
) -> PhaseResult {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    // (after the 2xx, since the request was due), in ms; infinite when never visible.
    let visible = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let to_probe = Arc::new(Mutex::new(VecDeque::<(String, Instant, Instant)>::new()));
    let next_probe = Arc::new(AtomicU64::new(0));
    let (cpu0, ccpu0) = (cpu_secs(target.pid), cpu_secs(None));
    let aux0: Vec<f64> = target.aux.iter().map(|(_, p)| cpu_secs(Some(*p))).collect();
    let m0 = machine_busy_secs();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (traffic, addr, stop) = (traffic.clone(), target.addr.clone(), stop.clone());
        let shapes = shapes.to_vec();
        let (to_probe, next_probe) = (to_probe.clone(), next_probe.clone());
        let probes = target.probes;
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut conn = match Conn::open(&addr).await {
                Ok(c) => c,
                Err(_) => {
                    t.errors += 1;
                    return t;
                }
            };
            let period = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
            let offset = period.map(|p| p.mul_f64(c as f64 / concurrency as f64));
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let shape = shapes[(c + k as usize) % shapes.len()];
                let due = match (period, offset) {
                    (Some(p), Some(o)) => {
                        let due = start + o + p.mul_f64(k as f64);
                        if due >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => Instant::now(),
                };
                k += 1;
                let req = traffic.next(shape);
                match conn.send(&req.bytes).await {
                    Ok((200, _)) => {
                        let done = Instant::now();
                        t.ok += 1;
                        t.events += req.events;
                        t.lat_us
                            .push((done - due).as_micros().min(u32::MAX as u128) as u32);
                        // About 10 samples/s overall for the visibility probe.
                        if probes {
                            let now_ms = (done - start).as_millis() as u64;
                            let due_ms = next_probe.load(Ordering::Relaxed);
                            if now_ms >= due_ms
                                && next_probe
                                    .compare_exchange(
                                        due_ms,
                                        now_ms + 100,
                                        Ordering::Relaxed,
                                        Ordering::Relaxed,
                                    )
                                    .is_ok()
                            {
                                to_probe
                                    .lock()
                                    .unwrap()
                                    .push_back((req.dispatch, done, due));
                            }
                        }
                    }
                    Ok((s, _)) => {
                        t.errors += 1;
                        if t.statuses.len() < 8 {
                            t.statuses.push(s);
                        }
                    }
                    Err(_) => {
                        t.errors += 1;
                        match Conn::open(&addr).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
            }
            t
        }));
    }
    // The visibility prober: polls each sampled dispatch until the read API has it.
    let prober = if target.probes {
        let (addr, to_probe, visible, stop) = (
            target.addr.clone(),
            to_probe.clone(),
            visible.clone(),
            stop.clone(),
        );
        let host = traffic.host.clone();
        Some(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await.ok();
            let mut pending: Vec<(String, Instant, Instant)> = Vec::new();
            loop {
                pending.extend(to_probe.lock().unwrap().drain(..));
                if pending.is_empty() && stop.load(Ordering::Relaxed) {
                    return;
                }
                let mut still = Vec::new();
                for (d, at, due) in pending.drain(..) {
                    let Some(c) = conn.as_mut() else { return };
                    let req = format!(
                        "GET /api/v1/dispatches/{d} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {API_TOKEN}\r\n\r\n"
                    );
                    match c.send(req.as_bytes()).await {
                        Ok((200, _)) => visible.lock().unwrap().push((
                            at.elapsed().as_secs_f64() * 1000.0,
                            due.elapsed().as_secs_f64() * 1000.0,
                        )),
                        Ok(_) if at.elapsed() < Duration::from_secs(30) => still.push((d, at, due)),
                        Ok(_) => visible.lock().unwrap().push((f64::INFINITY, f64::INFINITY)),
                        Err(_) => conn = Conn::open(&addr).await.ok(),
                    }
                }
                pending = still;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }))
    } else {
        None
    };
    // RSS once a second while the phase runs.
    let mut rss = Vec::new();
    if let Some(pid) = target.pid {
        rss.push(status_kib(pid, "VmRSS").unwrap_or(0.0) / 1024.0);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1).min(deadline - Instant::now())).await;
            if soak_rss {
                if let Some(r) = status_kib(pid, "VmRSS") {
                    rss.push(r / 1024.0);
                }
            }
        }
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.ok += t.ok;
        all.events += t.events;
        all.errors += t.errors;
        all.statuses.extend(t.statuses);
        all.lat_us.extend(t.lat_us);
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu1, ccpu1) = (cpu_secs(target.pid), cpu_secs(None));
    let aux_cores = target
        .aux
        .iter()
        .zip(aux0)
        .map(|((n, p), c0)| (n.clone(), (cpu_secs(Some(*p)) - c0) / wall))
        .collect::<std::collections::BTreeMap<_, _>>();
    let m1 = machine_busy_secs();
    let (machine_cores, machine_softirq_cores, machine_steal_cores) = (
        (m1.0 - m0.0) / wall,
        (m1.1 - m0.1) / wall,
        (m1.2 - m0.2) / wall,
    );
    if let Some(pid) = target.pid {
        rss.push(status_kib(pid, "VmRSS").unwrap_or(0.0) / 1024.0);
    }
    stop.store(true, Ordering::Relaxed);
    let load_stopped = Instant::now();
    if let Some(p) = prober {
        let _ = tokio::time::timeout(Duration::from_secs(35), p).await;
    }
    all.lat_us.sort_unstable();
    let pairs = visible.lock().unwrap().clone();
    let mut vis: Vec<f64> = pairs.iter().map(|v| v.0).collect();
    let mut vis_in: Vec<f64> = pairs.iter().map(|v| v.1).collect();
    vis.sort_by(|a, b| a.partial_cmp(b).unwrap());
    vis_in.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |v: &[f64], p: f64| {
        (!v.is_empty()).then(|| v[((v.len() as f64 - 1.0) * p).round() as usize])
    };
    let vpct = |p: f64| at(&vis, p);
    let r = PhaseResult {
        target: target.name.clone(),
        phase: phase.into(),
        seconds: wall,
        requests_ok: all.ok,
        errors: all.errors,
        requests_per_s: all.ok as f64 / wall,
        events_per_s: all.events as f64 / wall,
        p50_ms: pct(&all.lat_us, 0.5),
        p99_ms: pct(&all.lat_us, 0.99),
        p999_ms: pct(&all.lat_us, 0.999),
        max_ms: pct(&all.lat_us, 1.0),
        server_cores: (cpu1 - cpu0) / wall,
        client_cores: (ccpu1 - ccpu0) / wall,
        visible_p50_ms: vpct(0.5),
        visible_p99_ms: vpct(0.99),
        visible_max_ms: vpct(1.0),
        visible_samples: vis.len(),
        visible_in_p50_ms: at(&vis_in, 0.5),
        visible_in_p99_ms: at(&vis_in, 0.99),
        aux_cores,
        machine_cores,
        machine_softirq_cores,
        machine_steal_cores,
        settled_after_s: None,
        settled: None,
        probe_wait_s: load_stopped.elapsed().as_secs_f64(),
        rss_start_mib: rss.first().copied(),
        rss_end_mib: rss.last().copied(),
        rss_max_mib: rss.iter().copied().reduce(f64::max),
        error_statuses: all.statuses,
    };
    println!(
        "{:<9} {:<22} {:>9.0} req/s {:>10.0} ev/s  p50 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} ms  errors {:<4} server {:.2} cores, client {:.2}{}, machine {:.2} (softirq {:.2}, steal {:.2}){}{}",
        r.target,
        r.phase,
        r.requests_per_s,
        r.events_per_s,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.errors,
        r.server_cores,
        r.client_cores,
        r.aux_cores
            .iter()
            .map(|(n, c)| format!(", {n} {c:.2}"))
            .collect::<String>(),
        r.machine_cores,
        r.machine_softirq_cores,
        r.machine_steal_cores,
        r.visible_p99_ms
            .map(|v| format!("  visible p50 {:.0} p99 {:.0} max {:.0} ms (n={})", r.visible_p50_ms.unwrap(), v, r.visible_max_ms.unwrap(), r.visible_samples))
            .unwrap_or_default(),
        r.rss_max_mib
            .filter(|_| soak_rss)
            .map(|m| format!("  RSS {:.0}→{:.0} MiB (max {m:.0})", r.rss_start_mib.unwrap(), r.rss_end_mib.unwrap()))
            .unwrap_or_default(),
    );
    r
}

// ------------------------------------------------------------------ processes

struct Child {
    child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline handler (`examples/baseline_server`) on each shape, closed loop: the HTTP
/// limit, or with `durable` HTTP plus the durable group-commit append a 2xx promises on the
/// embedded default, nothing else (`durable_baseline`: the embedded log's limit, as
/// ProducerPerformance is Kafka's).
async fn run_baseline(
    args: &Args,
    traffic: &Arc<Traffic>,
    shapes: &[Shape],
    dir: &Path,
    durable: bool,
) -> Vec<PhaseResult> {
    let bin = args.baseline_bin.clone().unwrap_or_else(|| {
        server_bin(args)
            .parent()
            .unwrap()
            .join("examples/baseline_server")
    });
    let durable_db = dir.join("durable-baseline.db");
    let bport = free_port();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(format!("127.0.0.1:{bport}"));
    if durable {
        // Whatever an earlier phase wrote is on disk first.
        settle_disk();
        cmd.arg("--durable").arg(&durable_db);
    }
    let child = Child {
        child: cmd
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (cargo build --release --example baseline_server)",
                    bin.display()
                )
            }),
    };
    let b = Target {
        name: if durable {
            "durable_baseline"
        } else {
            "baseline"
        }
        .into(),
        addr: format!("127.0.0.1:{bport}"),
        pid: Some(child.child.id()),
        aux: Vec::new(),
        probes: false,
    };
    wait_ready_any(&b.addr).await;
    let mut phases = Vec::new();
    for &s in shapes {
        phases.push(
            run_phase(
                traffic,
                &b,
                &s.name(),
                &[s],
                args.concurrency,
                args.duration as f64,
                None,
                false,
            )
            .await,
        );
    }
    drop(child);
    for suffix in ["", "-wal", "-shm"] {
        let mut f = durable_db.clone().into_os_string();
        f.push(suffix);
        let _ = std::fs::remove_file(f);
    }
    phases
}

/// `sync`, then waits (at most 20 s) until the kernel holds less than 32 MiB of dirty or
/// in-flight pages: what one phase wrote is on disk before the next phase starts.
fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
    let pending_kib = || {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let start = Instant::now();
    while pending_kib() > 32 * 1024 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut c) = Conn::open(addr).await {
            let req = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
            if let Ok((200, _)) = c.send(req.as_bytes()).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not become ready");
}

fn server_bin(args: &Args) -> PathBuf {
    args.server_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xsender-events")))
}

fn spawn_server(args: &Args, dir: &Path, tenants: &Path, port: u16) -> Child {
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\ntenants_file = {:?}\n\
             rate_limit_per_second = 100000\nrate_limit_burst = 100000\n",
            dir.join("data"),
            tenants
        ),
    )
    .unwrap();
    let child = std::process::Command::new(server_bin(args))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .expect("spawn xsender-events serve");
    Child { child }
}

/// Waits until the projector has caught up (the last request's dispatch is readable), at most
/// `max`: (seconds waited, caught up).
async fn settle(traffic: &Traffic, target: &Target, shape: Shape, max: Duration) -> (f64, bool) {
    let start = Instant::now();
    let mut c = Conn::open(&target.addr).await.unwrap();
    let req = traffic.next(shape);
    let (s, _) = c.send(&req.bytes).await.unwrap();
    assert_eq!(s, 200);
    let get = format!(
        "GET /api/v1/dispatches/{} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {API_TOKEN}\r\n\r\n",
        req.dispatch, traffic.host
    );
    while start.elapsed() < max {
        if let Ok((200, _)) = c.send(get.as_bytes()).await {
            return (start.elapsed().as_secs_f64(), true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (start.elapsed().as_secs_f64(), false)
}

/// Settles after `r`'s phase and records how long it took.
async fn settle_after(traffic: &Traffic, target: &Target, max: Duration, r: &mut PhaseResult) {
    let (t, ok) = settle(traffic, target, Shape::Mailgun, max).await;
    // Counted from the end of the load, including the visibility probe's wait for its samples.
    let t = t + r.probe_wait_s;
    if ok {
        println!("          (projections caught up {t:.1}s after the load stopped)");
    } else {
        println!("          (projections NOT caught up {t:.0}s after the load stopped: the next phase starts with a backlog)");
    }
    r.settled_after_s = Some(t);
    r.settled = Some(ok);
}

// ------------------------------------------------------------------ main

fn parse_mix(s: &str) -> Vec<Shape> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (name, w) = part.split_once(':').unwrap_or((part, "1"));
        for _ in 0..w.parse::<usize>().expect("weight") {
            out.push(Shape::parse(name));
        }
    }
    out
}

#[derive(serde::Serialize)]
struct Report {
    machine: Value,
    args: Value,
    phases: Vec<PhaseResult>,
    server_vm_hwm_mib: Option<f64>,
    rebuild: Option<Value>,
    fsync_per_s_4k: f64,
    fsync_per_s_1m: f64,
}

fn main() {
    let args = Args::parse();
    if !args.bench {
        // `cargo test --all-targets` runs bench targets without `--bench`: no load then.
        eprintln!("load harness: run it with `cargo bench --bench load -- [options]`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(args));
}

async fn run(args: Args) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let (addr, ext_pid) = match args.target.as_str() {
        "embedded" => (format!("127.0.0.1:{port}"), None),
        "external" => {
            let url = args.url.clone().expect("--url for --target external");
            let a = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            assert!(
                a.starts_with("127.0.0.1:"),
                "load traffic goes to 127.0.0.1 only"
            );
            (a, args.pid)
        }
        t => panic!("unknown target {t}"),
    };
    let traffic = Arc::new(Traffic::new(addr.clone()));
    if let Some(p) = &args.write_tenants {
        std::fs::write(p, traffic.tenants_toml()).unwrap();
        println!("wrote {}", p.display());
        return;
    }
    if let Some(p) = &args.write_payloads {
        write_payloads(&traffic, p, args.payloads);
        return;
    }
    let tenants = dir.join("tenants.toml");
    std::fs::write(&tenants, traffic.tenants_toml()).unwrap();

    // Primitive: fsyncs/s on this disk (4 KiB appends, and 1 MiB appends as a big group).
    let fsync_4k = fsync_rate(&dir, 4096, 2.0);
    let fsync_1m = fsync_rate(&dir, 1 << 20, 2.0);
    println!("primitive  fsync: {fsync_4k:.0}/s after a 4 KiB append, {fsync_1m:.0}/s after a 1 MiB append");
    let mut phases = Vec::new();
    let shapes = [Shape::SendGrid(100), Shape::Mailgun, Shape::Mailjet];
    let secs = args.duration as f64;

    // The HTTP limit, on the same request streams (the durable-append limit runs last: it
    // writes gigabytes, which the disk would still be busy with during the server's phases).
    if !args.no_baseline {
        phases.extend(run_baseline(&args, &traffic, &shapes, &dir, false).await);
    }

    let child = match args.target.as_str() {
        "embedded" => Some(spawn_server(&args, &dir, &tenants, port)),
        _ => None,
    };
    let server = Target {
        name: args.target.clone(),
        addr: addr.clone(),
        pid: child.as_ref().map(|c| c.child.id()).or(ext_pid),
        aux: args
            .aux_pid
            .iter()
            .map(|a| {
                let (n, p) = a.split_once('=').expect("--aux-pid NAME=PID");
                (n.to_string(), p.parse().expect("--aux-pid NAME=PID"))
            })
            .collect(),
        probes: true,
    };
    wait_ready(&server.addr).await;
    let settle_max = Duration::from_secs(args.settle_max);
    let mix = parse_mix(&args.mix);
    if args.warmup > 0 {
        let mut w = run_phase(
            &traffic,
            &server,
            "warmup (not reported)",
            &mix,
            args.concurrency,
            args.warmup as f64,
            None,
            false,
        )
        .await;
        settle_after(&traffic, &server, settle_max, &mut w).await;
    }
    for s in shapes.into_iter().filter(|_| !args.skip_peaks) {
        let mut r = run_phase(
            &traffic,
            &server,
            &s.name(),
            &[s],
            args.concurrency,
            secs,
            None,
            false,
        )
        .await;
        settle_after(&traffic, &server, settle_max, &mut r).await;
        phases.push(r);
    }
    let rate = if args.skip_peaks {
        args.rate.unwrap()
    } else {
        let mut peak = run_phase(
            &traffic,
            &server,
            "mix_peak",
            &mix,
            args.concurrency,
            secs,
            None,
            false,
        )
        .await;
        let rate = args
            .rate
            .unwrap_or(peak.requests_per_s * args.load_fraction);
        settle_after(&traffic, &server, settle_max, &mut peak).await;
        phases.push(peak);
        rate
    };
    phases.push(
        run_phase(
            &traffic,
            &server,
            if args.skip_peaks {
                "mix_at_rate"
            } else {
                "mix_half_peak"
            },
            &mix,
            args.concurrency,
            secs,
            Some(rate),
            false,
        )
        .await,
    );
    if args.soak > 0 {
        phases.push(
            run_phase(
                &traffic,
                &server,
                "mix_soak",
                &mix,
                args.concurrency,
                args.soak as f64,
                Some(rate),
                true,
            )
            .await,
        );
    }
    let hwm = server
        .pid
        .and_then(|p| status_kib(p, "VmHWM"))
        .map(|k| k / 1024.0);
    if let Some(h) = hwm {
        println!("server VmHWM (peak RSS over the run): {h:.0} MiB");
    }

    drop(child);
    let mut rebuild = None;
    if args.rebuild_events > 0 && args.target == "embedded" {
        // A fresh server and data folder, so the log holds exactly the events asked for.
        let rdir = dir.join("rebuild");
        std::fs::create_dir_all(&rdir).unwrap();
        let rport = free_port();
        let child = spawn_server(&args, &rdir, &tenants, rport);
        let rserver = Target {
            name: "embedded".into(),
            addr: format!("127.0.0.1:{rport}"),
            pid: Some(child.child.id()),
            aux: Vec::new(),
            probes: true,
        };
        wait_ready(&rserver.addr).await;
        let rtraffic = Arc::new(Traffic::new(rserver.addr.clone()));
        rebuild = Some(fill_and_rebuild(&args, &rtraffic, &rserver, &rdir, Some(child)).await);
    }

    if !args.no_baseline {
        phases.extend(run_baseline(&args, &traffic, &shapes, &dir, true).await);
    }

    let report = Report {
        machine: machine(),
        args: json!({"duration": args.duration, "concurrency": args.concurrency, "mix": args.mix,
                     "load_fraction": args.load_fraction, "rate": rate, "soak": args.soak}),
        phases,
        server_vm_hwm_mib: hwm,
        rebuild,
        fsync_per_s_4k: fsync_4k,
        fsync_per_s_1m: fsync_1m,
    };
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
        println!("results: {}", out.display());
    }
}

/// `n` payloads for Kafka's ProducerPerformance, one a line: each a SendGrid-100 body from the
/// generator (line breaks turned into spaces) padded to the size of the Kafka record ingress
/// writes for that request, i.e. the Avro `RawEnvelope` value (encoded by the server's own
/// `Wire`, tracing off as in these runs) plus its key (the 32-hex-digit envelope id) and
/// headers. ProducerPerformance sends values only (and integer keys), so the value carries the
/// key's and headers' bytes too. Prints the sizes as JSON.
fn write_payloads(traffic: &Traffic, path: &Path, n: usize) {
    use rdkafka::message::Headers;
    use xsender_events::event::RawEnvelope;
    let wire = xsender_events::log::kafka::wire::Wire::plain();
    let mut out = Vec::new();
    let (mut body_sum, mut value_sum, mut record_sum, mut header_bytes) =
        (0usize, 0usize, 0usize, 0usize);
    for _ in 0..n {
        let req = traffic.next(Shape::SendGrid(100));
        let split = find(&req.bytes, b"\r\n\r\n").unwrap() + 4;
        let body = &req.bytes[split..];
        let envelope = RawEnvelope {
            trace_parent: None,
            id: hex::encode(rand::random::<[u8; 16]>()),
            provider: "sendgrid".into(),
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            verified_tenants: vec![TENANT.into()],
            default_tenant: Some(TENANT.into()),
            content_type: Some("application/json".into()),
            body: body.to_vec(),
        };
        let (value, headers) = wire.encode_envelope(&envelope);
        header_bytes = headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, |v| v.len()))
            .sum();
        let record = envelope.id.len() + value.len() + header_bytes;
        let mut line: Vec<u8> = body
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
            .collect();
        let pad = format!(" {} sendgrid {TENANT} application/json ", envelope.id);
        while line.len() < record {
            line.push(pad.as_bytes()[line.len() % pad.len()]);
        }
        line.truncate(record);
        out.extend_from_slice(&line);
        out.push(b'\n');
        body_sum += body.len();
        value_sum += value.len();
        record_sum += record;
    }
    std::fs::write(path, out).unwrap();
    let mean = |x: usize| x as f64 / n as f64;
    println!(
        "{}",
        json!({"payloads": n, "events_per_record": 100, "body_bytes": mean(body_sum),
               "avro_value_bytes": mean(value_sum), "key_bytes": 32, "header_bytes": header_bytes,
               "record_bytes": mean(record_sum), "file": path})
    );
}

async fn wait_ready_any(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Conn::open(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fills the log of `server` to `--rebuild-events` events with SendGrid batches of 1000, waits
/// for the normalizer, stops the server and times `xsender-events rebuild` on its data folder.
async fn fill_and_rebuild(
    args: &Args,
    traffic: &Arc<Traffic>,
    server: &Target,
    dir: &Path,
    child: Option<Child>,
) -> Value {
    let db = dir.join("data/log.db");
    let logged = count_events(&db);
    let want = args.rebuild_events.saturating_sub(logged);
    let per = 1000u64;
    let requests = want.div_ceil(per);
    println!(
        "filling the log with {} more events ({requests} SendGrid batches of {per})",
        requests * per
    );
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (traffic, addr, next) = (traffic.clone(), server.addr.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await.unwrap();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let r = traffic.next(Shape::SendGrid(per as usize));
                let (s, _) = c.send(&r.bytes).await.unwrap();
                assert_eq!(s, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let fill = started.elapsed().as_secs_f64();
    // Wait for the normalizer (the events log), not the projector: rebuild replays events.
    let target = logged + requests * per;
    let t = Instant::now();
    while count_events(&db) < target && t.elapsed() < Duration::from_secs(900) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let normalized = t.elapsed().as_secs_f64();
    drop(child); // stop the server: the rebuild gets the machine to itself
    let events = count_events(&db);
    println!("log holds {events} events (fill {fill:.1}s, normalized {normalized:.1}s later); rebuilding");
    let time_rebuild = |bin: &Path| {
        let t = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["rebuild", "--drop-old", "--data-dir"])
            .arg(dir.join("data"))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "rebuild of {events} events with {}: {secs:.1}s ({:.0} events/s)",
            bin.display(),
            events as f64 / secs
        );
        secs
    };
    let secs = time_rebuild(&server_bin(args));
    let compare = args.rebuild_compare_bin.as_deref().map(|b| {
        let before = time_rebuild(b);
        // And the current binary once more, so the pair is measured back to back.
        let after = time_rebuild(&server_bin(args));
        json!({"bin": b, "seconds": before, "current_seconds": after, "speedup": before / after})
    });
    json!({"events": events, "seconds": secs, "events_per_s": events as f64 / secs,
           "fill_seconds": fill, "normalize_wait_seconds": normalized, "compare": compare})
}

/// The primitive under group commit: how many appends+fsyncs of `size` bytes a file in the data
/// folder takes per second (one writer, like the log's).
fn fsync_rate(dir: &Path, size: usize, secs: f64) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = vec![0x5Au8; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    rate
}

fn count_events(db: &Path) -> u64 {
    if !db.exists() {
        return 0;
    }
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
    });
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .map(str::to_string);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "mem": mem,
    })
}
