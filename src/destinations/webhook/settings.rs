use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(deserialize_with = "crate::destinations::sender::http_url")]
    pub url: url::Url,
    /// Signs every request (`X-Sluice-Signature`); unset or empty sends no signature.
    #[serde(default)]
    pub secret: Option<String>,
    /// Sent with every request, after Sluice's own headers (so they cannot be overridden).
    #[serde(
        default,
        deserialize_with = "crate::destinations::sender::http_headers"
    )]
    pub headers: BTreeMap<String, String>,
}
