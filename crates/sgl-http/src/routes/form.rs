//! Reading a multipart/form-data body, as the official client sends `videos.create` and
//! `images.edit`: text parts become a route's body (numbers parsed from their text, by the body's
//! schema), image parts are kept as they came, in order.

use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;

use super::images::body_error;
use crate::error::ApiError;
use crate::route_body::{RouteBody, RouteFields};
use crate::state::SharedState;

/// What a form part is to the route reading it (decided from its name before its bytes are read).
pub(crate) enum PartRole {
    /// A field of the route's body.
    Field,
    /// An input image: an uploaded file or a URL in a text part.
    Image,
}

/// An image part's content.
pub(crate) enum ImageValue {
    /// An uploaded file (the part has a file name).
    File(Vec<u8>),
    /// A text part: a URL (`data:` or remote).
    Url(String),
}

/// One image part: its name as sent (`image`, `image[]`, `url`, `input_reference`, ...) and content.
pub(crate) struct ImagePart {
    pub name: String,
    pub value: ImageValue,
}

/// A form field as the official client sends it: every value is a string; fields that hold
/// numbers (by the body's schema) become numbers, fields that hold objects are JSON text.
fn form_value<O: RouteFields>(name: &str, text: String) -> serde_json::Value {
    if RouteBody::<O>::is_structured(name) {
        if let Ok(value) = serde_json::from_str(&text) {
            return value;
        }
    }
    if RouteBody::<O>::is_numeric(name) {
        if let Ok(number) = text.trim().parse::<serde_json::Number>() {
            return serde_json::Value::Number(number);
        }
    }
    serde_json::Value::String(text)
}

/// Reads a multipart form within `--body-read-timeout`: the route's body from its text parts, and its
/// image parts in the order they came. `role` names each part's role from its name, or refuses the
/// part (an image for a model that takes none) before its bytes are read.
pub(crate) async fn read_form<O: RouteFields>(
    state: &SharedState,
    request: Request,
    role: impl Fn(&str) -> Result<PartRole, ApiError>,
) -> Result<(RouteBody<O>, Vec<ImagePart>), ApiError> {
    let timeout = state.config.body_read_timeout();
    tokio::time::timeout(timeout, read_parts::<O>(state, request, role))
        .await
        .map_err(|_| ApiError::body_timeout(timeout))?
}

/// The form, part by part and each part chunk by chunk, the size limit checked as the bytes arrive:
/// a huge part costs at most `--max-body-mb` before the 413.
async fn read_parts<O: RouteFields>(
    state: &SharedState,
    request: Request,
    role: impl Fn(&str) -> Result<PartRole, ApiError>,
) -> Result<(RouteBody<O>, Vec<ImagePart>), ApiError> {
    let limit = state.config.max_body_bytes();
    let mut multipart =
        Multipart::from_request(request, &()).await.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut fields = serde_json::Map::new();
    let mut images = Vec::new();
    let mut total = 0usize;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| multipart_error(&e, limit))? {
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some();
        let role = role(&name)?;
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(&e, limit))? {
            total += chunk.len();
            if total > limit {
                return Err(ApiError::payload_too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        match role {
            PartRole::Image if is_file => images.push(ImagePart { name, value: ImageValue::File(bytes) }),
            PartRole::Image => {
                let url = String::from_utf8_lossy(&bytes).into_owned();
                images.push(ImagePart { name, value: ImageValue::Url(url) });
            }
            PartRole::Field => {
                let text = String::from_utf8(bytes).map_err(|_| ApiError::invalid(name.clone(), "not UTF-8 text"))?;
                fields.insert(name.clone(), form_value::<O>(&name, text));
            }
        }
    }
    Ok((RouteBody::<O>::from_value(serde_json::Value::Object(fields))?, images))
}

fn multipart_error(err: &MultipartError, limit: usize) -> ApiError {
    // axum recognises the limit of its own extractor, not always the limit layer's in the sources.
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE || body_error(err, limit).status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", err.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ImageFields, VideoFields};

    #[test]
    fn form_strings_become_numbers_where_numbers_belong() {
        assert_eq!(form_value::<VideoFields>("fps", "16".into()), serde_json::json!(16));
        assert_eq!(form_value::<VideoFields>("guidance_scale", "4.5".into()), serde_json::json!(4.5));
        assert_eq!(form_value::<VideoFields>("prompt", "16".into()), serde_json::json!("16"));
        assert_eq!(form_value::<VideoFields>("fps", "fast".into()), serde_json::json!("fast"));
        assert_eq!(form_value::<ImageFields>("true_cfg_scale", "4".into()), serde_json::json!(4));
        assert_eq!(form_value::<ImageFields>("n", "2".into()), serde_json::json!(2));
    }
}
