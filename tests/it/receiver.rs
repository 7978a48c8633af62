//! A real HTTP/1.1 receiver on 127.0.0.1 for destination tests: it records every request and
//! answers what the test tells it to. Thread per connection, keep-alive, Content-Length bodies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// The request line's target.
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The status it was answered with (recorded after the answer is decided).
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The messages of the request: the body, or its `batch`.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let v = self.json();
        match v.get("batch") {
            Some(serde_json::Value::Array(items)) => items.clone(),
            _ => vec![v],
        }
    }
}

/// What to answer: status, extra headers, body. Called with the request and its index.
pub type Answer = dyn Fn(&Received, usize) -> (u16, Vec<(String, String)>, String) + Send + Sync;

pub struct Receiver {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub fn ok() -> Receiver {
        Self::answering(|_, _| (200, vec![], "{}".into()))
    }

    pub fn answering(
        answer: impl Fn(&Received, usize) -> (u16, Vec<(String, String)>, String)
            + Send
            + Sync
            + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answer> = Arc::new(answer);
        let shared = requests.clone();
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (requests, answer, counter) = (shared.clone(), answer.clone(), counter.clone());
                std::thread::spawn(move || serve(stream, &requests, &*answer, &counter));
            }
        });
        Receiver { addr, requests }
    }

    /// Answers `status` with `body` until the returned switch is set, then 200.
    pub fn refusing_until_switched(status: u16, body: &str) -> (Receiver, Arc<AtomicBool>) {
        let accept = Arc::new(AtomicBool::new(false));
        let body = body.to_string();
        let receiver = Receiver::answering({
            let accept = accept.clone();
            move |_, _| match accept.load(Ordering::SeqCst) {
                true => (200, vec![], "{}".into()),
                false => (status, vec![], body.clone()),
            }
        });
        (receiver, accept)
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// The messages of every 2xx-answered request, in the order they were answered.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.received()
            .iter()
            .filter(|r| r.status < 300)
            .flat_map(|r| r.messages())
            .collect()
    }
}

fn serve(
    stream: TcpStream,
    requests: &Mutex<Vec<Received>>,
    answer: &Answer,
    counter: &std::sync::atomic::AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        let mut received = Received {
            at: Instant::now(),
            path,
            headers,
            body,
            status: 0,
        };
        // The answer may take its time (a slow receiver): not under the lock.
        let index = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (status, extra, text) = answer(&received, index);
        received.status = status;
        requests.lock().unwrap().push(received);
        let mut head = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: application/json\r\n",
            text.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(text.as_bytes()).is_err()
        {
            return;
        }
    }
}

/// Waits until `check` gives a value.
pub fn eventually<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
