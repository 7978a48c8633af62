//! What the integration tests share: a real server on a loopback port (in this process, or as a
//! child process running the built binary), a small HTTP/1.1 client, and readers for the log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::config::Config;

pub const WRITE_KEY: &str = "test-key";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A config with one source `web` (write key [`WRITE_KEY`]), the log under `dir`, and `extra`
/// appended (more sections, or keys for a `[log]` section that `extra` opens itself).
pub fn config_text(listen: &str, extra: &str) -> String {
    config_text_with(listen, "", extra)
}

/// [`config_text`] with `server_keys` added to its `[server]` section.
pub fn config_text_with(listen: &str, server_keys: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_timeout = "10s"
admin_token = "{ADMIN_TOKEN}"
{server_keys}

[[sources]]
name = "web"
write_key = "{WRITE_KEY}"

{extra}
"#
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A clock the test moves by hand.
#[derive(Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl ManualClock {
    pub fn at(rfc3339: &str) -> ManualClock {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
        ManualClock(std::sync::Arc::new(t.timestamp_millis().into()))
    }

    pub fn advance(&self, by: Duration) {
        self.0
            .fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.0.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap()
    }

    pub fn clock(&self) -> sluice::clock::Clock {
        let me = self.clone();
        std::sync::Arc::new(move || me.now())
    }
}

/// A server running in this process, on its own runtime thread.
pub struct Server {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub fn start(extra: &str) -> Server {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// Starts on an existing data folder, as after a restart.
    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Server {
        Self::start_with_clock(dir, extra, sluice::clock::system())
    }

    /// Starts with `server_keys` added to the config's `[server]` section.
    pub fn start_with_server_keys(server_keys: &str, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text_with("127.0.0.1:0", server_keys, extra);
        Self::start_with_config(dir, &text, sluice::clock::system())
    }

    /// Starts with the time coming from `clock` (see [`ManualClock`]).
    pub fn start_with_clock(
        dir: tempfile::TempDir,
        extra: &str,
        clock: sluice::clock::Clock,
    ) -> Server {
        Self::start_with_config(dir, &config_text("127.0.0.1:0", extra), clock)
    }

    fn start_with_config(
        dir: tempfile::TempDir,
        text: &str,
        clock: sluice::clock::Clock,
    ) -> Server {
        let path = write_config(dir.path(), text);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(sluice::app::run_with_clock(
                config,
                listener,
                async {
                    let _ = stopped.await;
                },
                clock,
            ))
        });
        let server = Server {
            addr,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(r) = try_request(self.addr, "GET", "/healthz", &[], b"") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not come up");
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.addr, "POST", path, headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[], b"")
    }

    /// Posts JSON with the write key as HTTP Basic auth.
    pub fn send(&self, path: &str, body: &str) -> Response {
        self.post(
            path,
            &[("Authorization", &basic(WRITE_KEY))],
            body.as_bytes(),
        )
    }

    /// Stops gracefully and hands back the data folder.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.shutdown();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("data/log")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.toml")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        }
    }
}

/// The built `sluice` binary run as a child process, so that it can be killed.
pub struct ChildServer {
    pub addr: SocketAddr,
    pub child: Child,
}

impl ChildServer {
    pub fn spawn(dir: &Path, extra: &str, configure: impl FnOnce(&mut Command)) -> ChildServer {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let path = write_config(dir, &config_text(&addr.to_string(), extra));
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        configure(&mut command);
        let child = command.spawn().unwrap();
        let mut server = ChildServer { addr, child };
        let started = Instant::now();
        loop {
            if let Ok(r) = try_request(addr, "GET", "/healthz", &[], b"") {
                if r.status == 200 {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("sluice exited before it was up: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sluice did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (for child processes, which bind it themselves).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request on its own connection (`Connection: close`), read to the end.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // The server may answer (413) and close before reading a large body.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Every record of the log in `dir`, as `sluice log dump` prints them.
pub fn dump(log_dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    sluice::commands::log_dump(log_dir, sluice::commands::DumpFrom::Oldest, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// messageIds of the accepted records.
pub fn accepted_ids(log_dir: &Path) -> Vec<String> {
    dump(log_dir)
        .into_iter()
        .filter(|r| r["status"] == "accepted")
        .map(|r| r["messageId"].as_str().unwrap().to_string())
        .collect()
}

pub fn track(id: &str) -> String {
    format!(
        r#"{{"type":"track","event":"Order Completed","userId":"user-{id}","messageId":"{id}",
            "properties":{{"order_id":"o-{id}","revenue":42.5,"currency":"EUR"}},
            "context":{{"library":{{"name":"test","version":"1"}},"ip":"10.0.0.1"}}}}"#
    )
}

pub fn batch_of(ids: &[String]) -> String {
    let messages: Vec<String> = ids.iter().map(|id| track(id)).collect();
    format!(r#"{{"batch":[{}]}}"#, messages.join(","))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use flate2::write::GzEncoder;
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Posts batches of 20 unique messages (ids starting with `prefix`) from `threads` threads until
/// `stop` is set or the server goes away; each thread returns the ids that were acknowledged.
pub fn load(
    addr: SocketAddr,
    threads: usize,
    prefix: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..threads)
        .map(|t| {
            let stop = stop.clone();
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<String> =
                        (0..20).map(|i| format!("{prefix}{t}-{n}-{i}")).collect();
                    n += 1;
                    let auth = basic(WRITE_KEY);
                    match try_request(
                        addr,
                        "POST",
                        "/v1/batch",
                        &[("Authorization", &auth)],
                        batch_of(&ids).as_bytes(),
                    ) {
                        Ok(r) if r.status == 200 => acked.extend(ids),
                        Ok(r) => panic!("unexpected status {}", r.status),
                        // The server died mid-request: not acknowledged.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

/// Makes `command`'s process unable to grow any file past `bytes` (writes beyond fail with
/// EFBIG), as on a full disk.
pub fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    let limit = bytes as libc::rlim_t;
    // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
