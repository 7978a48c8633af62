//! A webhook receiver for the destination benchmark: answers every POST with 200 at once and
//! measures, for each message in the body, the time from `receivedAt` (when Sluice accepted it)
//! to its arrival here. Prints messages per second and latency percentiles after `--duration`.
//!
//! ```text
//! taskset -c 0 sluice-receiver --listen 127.0.0.1:19099 --duration 30 --warmup 5
//! ```
//!
//! `receivedAt` has millisecond resolution, so latencies are whole milliseconds.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Tally {
    messages: u64,
    latencies_ms: Vec<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.mmm]Z` as milliseconds since the epoch.
fn parse_ms(t: &str) -> Option<i64> {
    let n = |a: usize, b: usize| t.get(a..b)?.parse::<i64>().ok();
    let days = days_from_civil(n(0, 4)?, n(5, 7)?, n(8, 10)?);
    let secs = days * 86_400 + n(11, 13)? * 3600 + n(14, 16)? * 60 + n(17, 19)?;
    let ms = if t.as_bytes().get(19) == Some(&b'.') {
        n(20, 23).unwrap_or(0)
    } else {
        0
    };
    Some(secs * 1000 + ms)
}

fn record(body: &[u8], tally: &RefCell<Tally>, measuring: bool) {
    let text = String::from_utf8_lossy(body);
    let now = now_ms();
    let mut t = tally.borrow_mut();
    for part in text.split("\"receivedAt\":\"").skip(1) {
        if let Some(at) = parse_ms(part) {
            if measuring {
                t.messages += 1;
                t.latencies_ms.push(now - at);
            }
        }
    }
}

async fn connection(mut stream: TcpStream, tally: Rc<RefCell<Tally>>, from: Instant) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Headers.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        record(
            &buf[head_end..head_end + length],
            &tally,
            Instant::now() >= from,
        );
        buf.drain(..head_end + length);
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:19099".parse().unwrap();
    let (mut duration, mut warmup) = (30.0, 5.0);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--listen" => listen = value.parse().expect("--listen ADDR"),
            "--duration" => duration = value.parse().expect("--duration SECS"),
            "--warmup" => warmup = value.parse().expect("--warmup SECS"),
            _ => {
                eprintln!(
                    "usage: sluice-receiver [--listen ADDR] [--duration SECS] [--warmup SECS]"
                );
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let from = Instant::now() + Duration::from_secs_f64(warmup);
    let until = from + Duration::from_secs_f64(duration);
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await.expect("bind");
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            if let Ok((stream, _)) = accepted {
                                tokio::task::spawn_local(connection(stream, tally.clone(), from));
                            }
                        }
                        _ = tokio::time::sleep_until(until.into()) => break,
                    }
                }
            })
            .await;
    });
    let mut t = tally.borrow_mut();
    t.latencies_ms.sort_unstable();
    let pct = |p: f64| {
        let l = &t.latencies_ms;
        if l.is_empty() {
            0
        } else {
            l[((l.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    println!(
        "received        {:.0} messages/s over {duration:.0} s",
        t.messages as f64 / duration
    );
    println!(
        "delivery ms     p50 {}  p90 {}  p99 {}  max {}  (acceptance to arrival)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
