//! Input images as clients send them (uploaded bytes, `data:` URLs, and with `--allow-remote-urls`
//! http(s) URLs), checked from their header before a pipeline decodes them. Errors name the field
//! (form part) the image came in.

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;

use crate::error::ApiError;

/// Whether `reference` is an http(s) URL (which only `--allow-remote-urls` lets the server fetch).
pub(crate) fn is_remote_url(reference: &str) -> bool {
    let lower = reference.trim_start().get(..8).unwrap_or_default().to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// `data:image/...;base64,...` → bytes.
pub(crate) fn decode_data_url(reference: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let invalid = |message: &str| ApiError::invalid(field, message);
    if is_remote_url(reference) {
        return Err(invalid("remote URLs are not fetched; upload the image as a file or send a data: URL"));
    }
    let payload = reference
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(_, data)| data)
        .ok_or_else(|| invalid("expected a data:image/...;base64,... URL or an uploaded file"))?;
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|_| invalid("the data URL is not valid base64"))
}

/// The file extension of an input image, from its header, once its size is known to be within
/// `--max-input-pixels`: the pipeline decodes the whole image, so its pixel count bounds the memory
/// that costs (a 17 KB PNG can declare 12 000 x 12 000 pixels).
pub(crate) fn image_extension(bytes: &[u8], max_pixels: u64, field: &str) -> Result<&'static str, ApiError> {
    let unreadable = || ApiError::invalid(field, "not a readable image (png, jpeg, webp, gif or bmp)");
    let extension = match imagesize::image_type(bytes).map_err(|_| unreadable())? {
        imagesize::ImageType::Png => "png",
        imagesize::ImageType::Jpeg => "jpg",
        imagesize::ImageType::Webp => "webp",
        imagesize::ImageType::Gif => "gif",
        imagesize::ImageType::Bmp => "bmp",
        _ => return Err(unreadable()),
    };
    let size = imagesize::blob_size(bytes).map_err(|_| unreadable())?;
    let pixels = (size.width as u64).saturating_mul(size.height as u64);
    if pixels == 0 {
        return Err(unreadable());
    }
    if pixels > max_pixels {
        return Err(ApiError::invalid(
            field,
            format!(
                "the input image is {}x{} = {pixels} pixels; at most {max_pixels} are accepted (--max-input-pixels)",
                size.width, size.height
            ),
        ));
    }
    Ok(extension)
}

/// One client for every fetch: its connection pool and TLS setup are built once.
fn client() -> Result<&'static reqwest::Client, ApiError> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .map_err(|e| ApiError::internal(format!("cannot start the HTTP client for remote images: {e}")))?;
    Ok(CLIENT.get_or_init(|| client))
}

/// GETs a remote image (`--allow-remote-urls`): at most `max_bytes` (413 beyond, checked as the
/// bytes arrive), within `timeout` from connecting to the last byte. Failures are the client's to
/// fix (a 400 naming `field`), as they concern the URL it gave.
pub(crate) async fn fetch_remote(
    url: &str,
    field: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let shown: String = url.chars().take(64).collect();
    let fetch = async {
        let mut response = client()?
            .get(url)
            .send()
            .await
            .map_err(|e| ApiError::invalid(field, format!("cannot fetch {shown}: {}", without_url(&e))))?;
        if !response.status().is_success() {
            return Err(ApiError::invalid(field, format!("fetching {shown} answered {}", response.status())));
        }
        let too_large =
            || ApiError::too_large(field, format!("the image at {shown} is over {max_bytes} bytes (--max-body-mb)"));
        if response.content_length().is_some_and(|length| length > max_bytes as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::invalid(field, format!("cannot fetch {shown}: {}", without_url(&e))))?
        {
            if bytes.len() + chunk.len() > max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| {
        ApiError::invalid(
            field,
            format!("{shown} did not arrive within {} s (--remote-url-timeout)", timeout.as_secs()),
        )
    })?
}

/// reqwest's message without the URL it repeats (the caller's message names it, shortened).
fn without_url(err: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_and_remote_urls_are_refused() {
        let err = decode_data_url("https://example.com/a.png", "url").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("url"));
        assert!(decode_data_url("HTTP://example.com/a.png", "url").is_err());
        assert_eq!(decode_data_url("data:image/png;base64,aGk=", "url").ok(), Some(b"hi".to_vec()));
        assert!(decode_data_url("data:image/png;base64,***", "url").is_err());
    }

    #[test]
    fn remote_urls_are_http_and_https_only() {
        assert!(is_remote_url("http://a/b.png") && is_remote_url("HTTPS://a/b.png"));
        assert!(!is_remote_url("data:image/png;base64,aGk=") && !is_remote_url("ftp://a/b") && !is_remote_url("h"));
    }
}
