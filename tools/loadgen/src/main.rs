//! Load generator for the Sluice HTTP intake.
//!
//! Keeps `--connections` keep-alive HTTP/1.1 connections busy posting Segment messages of about
//! 400 bytes (a track with six properties and a realistic context), each with a unique messageId
//! so that dedup never short-cuts the work. Closed loop by default (as fast as the server answers);
//! with `--rate`, open loop at that many requests per second, latency measured from when each
//! request was due (no coordinated omission). Prints requests and messages per second, latency
//! percentiles, and with `--pid` the server's resident memory over the run.
//!
//! ```text
//! taskset -c 0 sluice-loadgen --mode batch --batch 100 --connections 32 --duration 60
//! ```

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use sluice_loadgen::{mix, scatter, EVENTS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Options {
    addr: SocketAddr,
    write_key: String,
    batch: usize,
    single: bool,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    rate: Option<f64>,
    pid: Option<u32>,
    run_id: String,
    /// Varied web traffic instead of one repeated track.
    web_mix: bool,
    /// Who sends the web mix's messages.
    users: Users,
}

/// The users of the web mix: `count` of them, drawn uniformly or by a Zipf law (rank k sends in
/// proportion to 1/k^s, as in real products: a few users are very active, most are quiet), and
/// spread over `user-0` … `user-{space - 1}` (the users `sluice-profilegen` stored) by [`scatter`].
struct Users {
    count: u64,
    space: u64,
    /// The Zipf law's cumulative distribution over ranks, if not uniform.
    zipf: Option<Vec<f64>>,
}

impl Users {
    /// The user of the random draw `r`.
    fn pick(&self, r: u64) -> u64 {
        let rank = match &self.zipf {
            None => r % self.count,
            Some(cdf) => {
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                (cdf.partition_point(|&c| c < u) as u64).min(self.count - 1)
            }
        };
        scatter(rank, self.space)
    }

    fn zipf(count: u64, s: f64) -> Vec<f64> {
        let mut cdf: Vec<f64> = (1..=count)
            .scan(0.0, |sum, k| {
                *sum += 1.0 / (k as f64).powf(s);
                Some(*sum)
            })
            .collect();
        let total = *cdf.last().unwrap_or(&1.0);
        cdf.iter_mut().for_each(|c| *c /= total);
        cdf
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: sluice-loadgen [--addr 127.0.0.1:8088] [--write-key KEY] [--mode batch|track] \
         [--batch 100] [--connections 32] [--duration SECS] [--warmup SECS] [--rate REQ_PER_SEC] [--pid SERVER_PID] \
         [--events fixed|web] [--users 50000] [--user-space USERS] [--zipf EXPONENT]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut o = Options {
        addr: "127.0.0.1:8088".parse().unwrap(),
        write_key: "demo-server-key".into(),
        batch: 100,
        single: false,
        connections: 32,
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(2),
        rate: None,
        pid: None,
        web_mix: false,
        users: Users {
            count: 50_000,
            space: 0,
            zipf: None,
        },
        run_id: format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros()
        ),
    };
    let mut zipf = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => o.addr = value().parse().unwrap_or_else(|_| usage()),
            "--write-key" => o.write_key = value(),
            "--mode" => {
                o.single = match value().as_str() {
                    "batch" => false,
                    "track" => true,
                    _ => usage(),
                }
            }
            "--batch" => o.batch = value().parse().unwrap_or_else(|_| usage()),
            "--connections" => o.connections = value().parse().unwrap_or_else(|_| usage()),
            "--duration" => {
                o.duration = Duration::from_secs_f64(value().parse().unwrap_or_else(|_| usage()))
            }
            "--warmup" => {
                o.warmup = Duration::from_secs_f64(value().parse().unwrap_or_else(|_| usage()))
            }
            "--rate" => o.rate = Some(value().parse().unwrap_or_else(|_| usage())),
            "--pid" => o.pid = Some(value().parse().unwrap_or_else(|_| usage())),
            "--events" => {
                o.web_mix = match value().as_str() {
                    "fixed" => false,
                    "web" => true,
                    _ => usage(),
                }
            }
            "--users" => o.users.count = value().parse().unwrap_or_else(|_| usage()),
            "--user-space" => o.users.space = value().parse().unwrap_or_else(|_| usage()),
            "--zipf" => zipf = Some(value().parse::<f64>().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    o.users.count = o.users.count.max(1);
    o.users.space = o.users.space.max(o.users.count);
    o.users.zipf = zipf.map(|s| Users::zipf(o.users.count, s));
    if o.single {
        o.batch = 1;
    }
    o
}

/// One message; `id` makes it unique.
fn message(out: &mut Vec<u8>, run: &str, conn: usize, n: u64, with_type: bool) {
    let user = (n * 7919 + conn as u64) % 100_000;
    let _ = write!(
        out,
        r#"{{{}"event":"Order Completed","userId":"user-{user}","anonymousId":"anon-{conn}-{user}","messageId":"{run}-{conn}-{n}","timestamp":"2026-11-22T04:00:00.000Z","properties":{{"order_id":"o-{n}","revenue":42.5,"currency":"EUR","items":3,"coupon":"WINTER","shipping":{{"method":"express"}}}},"context":{{"library":{{"name":"analytics-node","version":"2.1.0"}},"ip":"203.0.113.7","userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0)","locale":"en-US"}}}}"#,
        if with_type { r#""type":"track","# } else { "" }
    );
}

const PATHS: [&str; 12] = [
    "/",
    "/pricing",
    "/docs/getting-started",
    "/blog/launch",
    "/products/shoes",
    "/products/hats",
    "/cart",
    "/checkout",
    "/account",
    "/search",
    "/about",
    "/careers",
];
const AGENTS: [&str; 5] = [
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
];

/// `unix_ms` as an RFC 3339 UTC timestamp with milliseconds.
fn rfc3339_millis(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One message of varied web traffic: a page view or one of eight tracks, with a random UUID-like
/// messageId, one of the `users` (50,000 by default, uniform), properties that differ from message
/// to message, and a device timestamp up to two seconds before it is sent, as SDKs send them.
fn web_message(out: &mut Vec<u8>, conn: usize, n: u64, with_type: bool, users: &Users) {
    let r = mix(((conn as u64) << 40) ^ n ^ 0x5eed);
    let r2 = mix(r);
    // A draw of its own: the path, agent and event come from `r`'s bits, and a Zipf rank is
    // mostly `r`'s top bits.
    let user = users.pick(mix(r2));
    let path = PATHS[(r >> 20) as usize % PATHS.len()];
    let agent = AGENTS[(r >> 28) as usize % AGENTS.len()];
    let ip = format!(
        "{}.{}.{}.{}",
        10 + (r2 & 0x7f),
        (r2 >> 8) & 0xff,
        (r2 >> 16) & 0xff,
        (r2 >> 24) & 0xff
    );
    let timestamp = rfc3339_millis(now_ms() - (r2 >> 32) % 2000);
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        r as u32,
        (r >> 32) as u16,
        (r2 >> 4) & 0xfff,
        r2 as u16 | 0x8000,
        r2 >> 16
    );
    let kind = if with_type {
        if r.is_multiple_of(3) {
            r#""type":"page","#
        } else {
            r#""type":"track","#
        }
    } else {
        ""
    };
    let _ = write!(
        out,
        r#"{{{kind}"messageId":"{id}","anonymousId":"anon-{user}","userId":"user-{user}","timestamp":"{timestamp}","#
    );
    if with_type && r.is_multiple_of(3) {
        let _ = write!(
            out,
            r#""name":"{path}","properties":{{"path":"{path}","url":"https://shop.example.com{path}?ref={}","referrer":"https://www.google.com/","title":"Shop {path}"}},"#,
            r2 % 97
        );
    } else {
        let event = EVENTS[(r >> 12) as usize % EVENTS.len()];
        let _ = write!(
            out,
            r#""event":"{event}","properties":{{"product_id":"sku-{}","price":{}.{:02},"quantity":{},"currency":"EUR","category":"{}","coupon":{}}},"#,
            r2 % 5000,
            r2 % 300,
            r % 100,
            1 + r % 4,
            &path[1..].split('/').next().unwrap_or(""),
            if r.is_multiple_of(7) {
                "\"WINTER\""
            } else {
                "null"
            }
        );
    }
    let _ = write!(
        out,
        r#""context":{{"library":{{"name":"analytics.js","version":"next-1.84.3"}},"ip":"{ip}","userAgent":"{agent}","locale":"en-US","page":{{"path":"{path}"}}}}}}"#
    );
}

fn request(o: &Options, conn: usize, seq: &mut u64, auth: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(o.batch * 460 + 64);
    let seed = mix(run_seed(&o.run_id));
    let message = |body: &mut Vec<u8>, n: u64, with_type: bool| {
        if o.web_mix {
            web_message(body, conn, n ^ seed, with_type, &o.users)
        } else {
            message(body, &o.run_id, conn, n, with_type)
        }
    };
    if o.single {
        message(&mut body, *seq, false);
        *seq += 1;
    } else {
        body.extend_from_slice(br#"{"batch":["#);
        for i in 0..o.batch {
            if i > 0 {
                body.push(b',');
            }
            message(&mut body, *seq, true);
            *seq += 1;
        }
        if o.web_mix {
            let _ = write!(body, r#"],"sentAt":"{}"}}"#, rfc3339_millis(now_ms()));
        } else {
            body.extend_from_slice(br#"],"sentAt":"2026-11-22T04:00:01.000Z"}"#);
        }
    }
    let path = if o.single { "/v1/track" } else { "/v1/batch" };
    let mut req = Vec::with_capacity(body.len() + 200);
    let _ = write!(
        req,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        o.addr,
        body.len()
    );
    req.extend_from_slice(&body);
    req
}

fn run_seed(run_id: &str) -> u64 {
    u64::from_str_radix(run_id, 16).unwrap_or(0)
}

fn basic(key: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{key}:").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads one response; returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    ok: u64,
    other: std::collections::BTreeMap<u16, u64>,
    errors: u64,
}

async fn connection(
    o: Rc<Options>,
    conn: usize,
    measure_from: Instant,
    end: Instant,
    tally: Rc<RefCell<Tally>>,
) {
    let auth = basic(&o.write_key);
    let mut stream = match TcpStream::connect(o.addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            tally.borrow_mut().errors += 1;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut seq = 0u64;
    // Open loop: this connection's share of the rate, starting at a staggered offset.
    let interval = o
        .rate
        .map(|r| Duration::from_secs_f64(o.connections as f64 / r));
    let mut due = Instant::now()
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(conn as f64 / o.connections as f64)
        });
    while Instant::now() < end {
        if interval.is_some() {
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        } else {
            due = Instant::now();
        }
        let req = request(&o, conn, &mut seq, &auth);
        let result = async {
            stream.write_all(&req).await?;
            read_response(&mut stream, &mut buf).await
        }
        .await;
        let done = Instant::now();
        let mut t = tally.borrow_mut();
        match result {
            Ok(status) if due >= measure_from => {
                if status == 200 {
                    t.ok += 1;
                } else {
                    *t.other.entry(status).or_default() += 1;
                }
                t.latencies_us
                    .push((done - due).as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(_) => {}
            Err(e) => {
                t.errors += 1;
                eprintln!("connection {conn}: {e}");
                return;
            }
        }
        drop(t);
        if let Some(i) = interval {
            due += i;
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let o = Rc::new(parse_options());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let mut rss = Vec::new();
    runtime.block_on(async {
        let local = tokio::task::LocalSet::new();
        for conn in 0..o.connections {
            local.spawn_local(connection(
                o.clone(),
                conn,
                measure_from,
                end,
                tally.clone(),
            ));
        }
        let sampler = {
            let o = o.clone();
            async move {
                let mut samples = Vec::new();
                while Instant::now() < end {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Some(pid) = o.pid {
                        if Instant::now() >= measure_from {
                            samples.extend(rss_kib(pid));
                        }
                    }
                }
                samples
            }
        };
        rss = local
            .run_until(async {
                let s = sampler.await;
                // Let in-flight requests finish.
                tokio::time::sleep(Duration::from_millis(200)).await;
                s
            })
            .await;
    });
    let mut t = tally.borrow_mut();
    t.latencies_us.sort_unstable();
    let secs = o.duration.as_secs_f64();
    let requests = t.ok as f64 / secs;
    println!(
        "mode            {}",
        if o.single {
            "track (1 message per request)".to_string()
        } else {
            format!("batch ({} messages per request)", o.batch)
        }
    );
    println!("connections     {}", o.connections);
    println!(
        "rate            {}",
        o.rate.map_or("closed loop".to_string(), |r| format!(
            "{r} requests/s offered"
        ))
    );
    println!(
        "duration        {secs:.0} s (after {:.0} s warm-up)",
        o.warmup.as_secs_f64()
    );
    println!(
        "acknowledged    {:.0} requests/s, {:.0} messages/s",
        requests,
        requests * o.batch as f64
    );
    println!(
        "latency ms      p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        percentile(&t.latencies_us, 0.50),
        percentile(&t.latencies_us, 0.90),
        percentile(&t.latencies_us, 0.99),
        percentile(&t.latencies_us, 0.999),
        percentile(&t.latencies_us, 1.0)
    );
    if !t.other.is_empty() || t.errors > 0 {
        println!(
            "not 200         {:?}, connection errors {}",
            t.other, t.errors
        );
    }
    if !rss.is_empty() {
        let mb = |k: u64| k as f64 / 1024.0;
        println!(
            "server RSS MB   first {:.0}  max {:.0}  last {:.0}  ({} samples)",
            mb(rss[0]),
            mb(*rss.iter().max().unwrap()),
            mb(*rss.last().unwrap()),
            rss.len()
        );
        let series: Vec<String> = rss
            .iter()
            .step_by(10)
            .map(|k| format!("{:.0}", mb(*k)))
            .collect();
        println!("server RSS MB   every 10 s: {}", series.join(" "));
    }
}
