use std::fmt::Write as _;

use ring::hmac;

use super::Settings;
use crate::destinations::sender::{classify, join_bodies, Attempt, Outgoing, Sender};

pub struct Webhook {
    settings: Settings,
    key: Option<hmac::Key>,
    client: reqwest::Client,
    /// `batch_size > 1`: every request is `{"batch":[...]}`, even with one message.
    batched: bool,
}

impl Webhook {
    pub fn new(settings: Settings, client: reqwest::Client, batched: bool) -> Self {
        let key = settings
            .secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes()));
        Webhook {
            settings,
            key,
            client,
            batched,
        }
    }
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: what a receiver recomputes to know
/// the request came from us, and the timestamp (also signed) lets it refuse old replays.
pub fn signature(key: &hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The messageId of one message; for a batch a hash of its messageIds, the same on every retry
/// of the same batch. A messageId that cannot be a header value as it is (a client may send
/// control characters, or anything up to the 32 KB message limit) is sent as a hash of itself.
fn idempotency_key(batch: &[Outgoing]) -> String {
    if let [one] = batch {
        let id = &one.message_id;
        if !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.clone();
        }
        return format!("id-{:032x}", xxhash_rust::xxh3::xxh3_128(id.as_bytes()));
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for m in batch {
        hasher.update(m.message_id.as_bytes());
        hasher.update(b"\n");
    }
    format!("batch-{:032x}", hasher.digest128())
}

#[async_trait::async_trait]
impl Sender for Webhook {
    async fn send(&self, batch: &[Outgoing]) -> Attempt {
        let body = match batch {
            [one] if !self.batched => one.body.clone(),
            _ => join_bodies(batch, b"{\"batch\":", b"}"),
        };
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(self.settings.url.clone())
            .header("content-type", "application/json")
            .header("user-agent", concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .header("idempotency-key", idempotency_key(batch))
            .header("x-sluice-timestamp", timestamp.to_string());
        if let Some(key) = &self.key {
            request = request.header("x-sluice-signature", signature(key, timestamp, &body));
        }
        for (name, value) in &self.settings.headers {
            request = request.header(name, value);
        }
        classify(request.body(body).send().await).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str) -> Outgoing {
        Outgoing {
            offset: 0,
            user: "u".into(),
            message_id: id.into(),
            accepted_micros: 0,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn every_message_id_makes_a_valid_header() {
        assert_eq!(idempotency_key(&[message("m-1")]), "m-1");
        for id in [
            "a\nb",
            "tab\there",
            "héllo",
            "sp ace",
            &"x".repeat(5_000),
            "",
        ] {
            let key = idempotency_key(&[message(id)]);
            assert!(
                reqwest::header::HeaderValue::from_str(&key).is_ok() && !key.is_empty(),
                "{id:?} -> {key:?}"
            );
            assert_eq!(
                key,
                idempotency_key(&[message(id)]),
                "stable across retries"
            );
        }
        assert_ne!(
            idempotency_key(&[message("a\nb")]),
            idempotency_key(&[message("a\rb")])
        );
    }
}
