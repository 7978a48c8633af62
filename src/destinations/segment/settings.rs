use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The API's base URL; requests go to `<url>/v1/batch`.
    #[serde(deserialize_with = "crate::destinations::sender::http_url")]
    pub url: url::Url,
    pub write_key: String,
}
