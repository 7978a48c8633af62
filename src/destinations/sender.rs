//! The one trait a destination type implements, and what every HTTP type shares: how a response
//! becomes an [`Attempt`], `Retry-After`, and URL settings.
//!
//! Whatever a receiver answers is bounded before it is used: redirects are not followed (a
//! redirected POST would arrive as a GET with no body, and count as delivered), `Retry-After` is
//! clamped, and at most [`MAX_KEPT_BODY`] bytes of an error body are read.

use std::time::Duration;

use super::files::BACKOFF_CAP;

use serde::{Deserialize, Deserializer, Serialize};

/// One message on its way to one destination: routed, filtered and transformed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Where it is in the intake log.
    pub offset: u64,
    /// The ordering key: userId, else anonymousId.
    pub user: String,
    pub message_id: String,
    /// When the edge accepted it (µs since the epoch), for the latency histogram.
    pub accepted_micros: i64,
    /// The JSON to send.
    pub body: Vec<u8>,
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// 5xx, 429, a timeout or a connection error: try again later (no sooner than `after` when
    /// the destination said so).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Any other answer: the destination will never take these messages as they are.
    Reject {
        status: u16,
        body: String,
    },
}

/// A destination type: sends one batch (in order, one user's messages never split across two
/// requests in flight) and says what came of it. A new type is a folder beside `webhook/` with
/// its `Settings` (serde, `deny_unknown_fields`) and a `Sender`, plus one variant of
/// [`super::Kind`].
#[async_trait::async_trait]
pub trait Sender: Send + Sync {
    async fn send(&self, batch: &[Outgoing]) -> Attempt;

    /// The most one request may carry, in bytes of message bodies (the receiver's limit). The
    /// engine cuts batches to it; a single larger message still goes alone.
    fn max_request_bytes(&self) -> usize {
        usize::MAX
    }
}

/// How much of a response body is kept for the dead letter; no more of it is read.
pub const MAX_KEPT_BODY: usize = 4_096;

/// The HTTP client every destination type sends with: no redirects followed.
pub fn client(timeout: Duration, idle_connections: usize) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(idle_connections)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Turns the outcome of an HTTP request into an [`Attempt`]: 2xx delivered; 5xx, 408 and 429
/// retried (honouring `Retry-After`); other statuses, redirects included, rejected with their body.
/// A request that could not even be built (an invalid header) is rejected: no retry can mend it.
pub async fn classify(result: Result<reqwest::Response, reqwest::Error>) -> Attempt {
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            // The URL may hold a secret (a token in its query, a password in its authority).
            let e = e.without_url();
            if e.is_builder() {
                return Attempt::Reject {
                    status: 0,
                    body: format!("the request could not be built: {e}"),
                };
            }
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            return Attempt::Retry {
                after: None,
                reason: format!("{what}: {e}"),
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered;
    }
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, chrono::Utc::now()));
    let mut kept = Vec::new();
    while kept.len() < MAX_KEPT_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_KEPT_BODY - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    drop(response);
    let body = crate::text::clip(String::from_utf8_lossy(&kept).into_owned(), MAX_KEPT_BODY);
    let code = status.as_u16();
    if status.is_server_error() || code == 429 || code == 408 {
        Attempt::Retry {
            after,
            reason: format!("HTTP {code}: {body}"),
        }
    } else {
        Attempt::Reject { status: code, body }
    }
}

/// `Retry-After` as seconds or as an HTTP date, at most [`BACKOFF_CAP`]: a receiver may ask for a
/// break, not stop deliveries for ever.
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds.min(BACKOFF_CAP.as_secs())),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(wait.min(BACKOFF_CAP))
}

/// The JSON array `[m1,m2,...]` of the batch's bodies, after `prefix`, then `suffix`.
pub fn join_bodies(batch: &[Outgoing], prefix: &[u8], suffix: &[u8]) -> Vec<u8> {
    let size = batch.iter().map(|m| m.body.len() + 1).sum::<usize>();
    let mut out = Vec::with_capacity(prefix.len() + size + suffix.len() + 2);
    out.extend_from_slice(prefix);
    out.push(b'[');
    for (i, m) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&m.body);
    }
    out.push(b']');
    out.extend_from_slice(suffix);
    out
}

/// A settings field holding an `http` or `https` URL.
pub fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<url::Url, D::Error> {
    let text = String::deserialize(d)?;
    let url = url::Url::parse(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(serde::de::Error::custom(format!(
            "`{text}` must be an http:// or https:// URL"
        )));
    }
    Ok(url)
}

/// A settings field holding extra HTTP headers: each name and value must be valid in a request
/// (one that is not would fail every delivery).
pub fn http_headers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    let headers = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    for (name, value) in &headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(serde::de::Error::custom(format!(
                "`{name}` is not an HTTP header name"
            )));
        }
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return Err(serde::de::Error::custom(format!(
                "the value of header `{name}` is not a valid HTTP header value"
            )));
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        // Clamped: a huge number or a far date asks for a break, not for ever.
        assert_eq!(retry_after("99999999999999999999", now), None, "not a u64");
        assert_eq!(retry_after("18446744073709551615", now), Some(BACKOFF_CAP));
        assert_eq!(
            retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(BACKOFF_CAP)
        );
    }
}
