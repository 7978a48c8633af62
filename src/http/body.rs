//! Reading a request body within Segment's limits: at most 500 KB after decompression, gzip
//! decoded through a capped reader so that a small bomb cannot inflate in memory.

use std::io::Read;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use base64::Engine;
use futures_util::StreamExt;

use super::error::ApiError;
use crate::ingest::{Limit, MAX_REQUEST_BYTES};

/// Room for gzip framing around an incompressible 500 KB body.
const MAX_COMPRESSED_BYTES: usize = MAX_REQUEST_BYTES + 4096;

/// The body, decompressed, or the limit it broke.
pub async fn read(req: &HttpRequest, mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let gzip = match req.headers().get(header::CONTENT_ENCODING) {
        None => false,
        Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()) {
            Ok(s) if s == "gzip" || s == "x-gzip" => true,
            Ok(s) if s.is_empty() || s == "identity" => false,
            _ => {
                return Err(ApiError::BadRequest(
                    "unsupported Content-Encoding (gzip or none)".into(),
                ))
            }
        },
    };
    let cap = if gzip {
        MAX_COMPRESSED_BYTES
    } else {
        MAX_REQUEST_BYTES
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > cap) {
        return Err(ApiError::TooLarge(Limit::Request));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(8192).min(cap));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > cap {
            return Err(ApiError::TooLarge(Limit::Request));
        }
        body.extend_from_slice(&chunk);
    }
    if gzip {
        body = gunzip(&body)?;
    }
    Ok(body)
}

/// Decompresses at most the request limit; one byte more means the body is over it.
pub(crate) fn gunzip(compressed: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity((compressed.len() * 4).min(MAX_REQUEST_BYTES + 1));
    flate2::read::MultiGzDecoder::new(compressed)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid gzip: {e}")))?;
    if out.len() > MAX_REQUEST_BYTES {
        return Err(ApiError::TooLarge(Limit::Request));
    }
    Ok(out)
}

/// The write key from `Authorization: Basic base64(writeKey:)`, if the header is there.
pub fn basic_write_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || ApiError::Unauthorized("malformed Authorization header (expected Basic)");
    let text = value.to_str().map_err(|_| bad())?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    Ok(Some(user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gunzip_round_trips() {
        assert_eq!(gunzip(&gzip(b"{\"a\":1}")).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 100 MB of zeros compress to about 100 KB.
        let bomb = gzip(&vec![0u8; 100 << 20]);
        assert!(bomb.len() < MAX_COMPRESSED_BYTES);
        assert!(matches!(
            gunzip(&bomb),
            Err(ApiError::TooLarge(Limit::Request))
        ));
    }

    #[test]
    fn garbage_is_not_gzip() {
        assert!(matches!(
            gunzip(b"plain text"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
