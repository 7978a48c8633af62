use base64::Engine as _;

use super::Settings;
use crate::destinations::sender::{classify, join_bodies, Attempt, Outgoing, Sender};

pub struct SegmentApi {
    endpoint: url::Url,
    authorization: String,
    client: reqwest::Client,
}

impl SegmentApi {
    pub fn new(settings: Settings, client: reqwest::Client) -> Self {
        let mut endpoint = settings.url.clone();
        let path = format!("{}/v1/batch", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:", settings.write_key));
        SegmentApi {
            endpoint,
            authorization: format!("Basic {credentials}"),
            client,
        }
    }
}

#[async_trait::async_trait]
impl Sender for SegmentApi {
    async fn send(&self, batch: &[Outgoing]) -> Attempt {
        // Messages keep their messageId, so the receiver's dedup makes a retried batch harmless.
        let sent_at = crate::vocabulary::format_time(chrono::Utc::now());
        let suffix = format!(",\"sentAt\":\"{sent_at}\"}}");
        let body = join_bodies(batch, b"{\"batch\":", suffix.as_bytes());
        let request = self
            .client
            .post(self.endpoint.clone())
            .header("content-type", "application/json")
            .header("authorization", &self.authorization)
            .header("user-agent", concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .body(body);
        classify(request.send().await).await
    }

    /// Segment's own limit is 500 KB a batch request; room is left for the envelope.
    fn max_request_bytes(&self) -> usize {
        500 * 1024 - 1024
    }
}
