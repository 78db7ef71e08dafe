//! One table from every failure to its HTTP status and OpenAI error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sgl_core::ValidationError;
use sgl_scheduler::{ExecError, ExecErrorKind, GenerationError, SubmitError};

use crate::wire::{ErrorBody, ErrorDetail};

/// Seconds a client is asked to wait after a 429 before retrying.
const RETRY_AFTER_SECONDS: &str = "5";
/// Longest quoted value (or `param`) echoed back: enough to recognise it, not a copy of a huge one.
const MAX_ECHOED_CHARS: usize = 64;
/// Longest error message; a message is never a way to reflect a request body back.
const MAX_MESSAGE_CHARS: usize = 1024;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: shorten_message(&message.into()), param: None, code: None }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = truncate_chars(&param.into(), MAX_ECHOED_CHARS);
        Self { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or invalid API key (Authorization: Bearer <key>)",
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { code: Some("not_found"), ..Self::new(StatusCode::NOT_FOUND, "not_found_error", message) }
    }

    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model `{model}` is not served here; served names: {}", served.join(", ")),
            )
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self { code: Some("conflict"), ..Self::new(StatusCode::CONFLICT, "invalid_request_error", message) }
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body exceeds the limit of {limit_bytes} bytes (--max-body-mb)"),
        )
    }

    /// A part of the request (an image, however it came) over its stated limit.
    pub fn too_large(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(truncate_chars(param, MAX_ECHOED_CHARS)),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
        }
    }

    /// The body did not arrive within `--body-read-timeout`.
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {} s (--body-read-timeout)", timeout.as_secs()),
            )
        }
    }

    pub fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Content-Type must be {expected}"),
        )
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn from_validation(err: &ValidationError) -> Self {
        Self::invalid(err.field.clone(), redact_paths(&err.to_string()))
    }

    pub fn from_submit(err: &SubmitError) -> Self {
        match err {
            SubmitError::Invalid(v) => Self::from_validation(v),
            SubmitError::QueueFull { .. } => Self {
                code: Some("queue_full"),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", err.to_string())
            },
            SubmitError::ShuttingDown => Self::not_ready(err.to_string()),
            // Not one field but their product is at fault, so no `param`.
            SubmitError::OverBudget { .. } => {
                Self { code: Some("request_over_budget"), ..Self::bad_request(err.to_string()) }
            }
        }
    }

    pub fn from_exec(err: &ExecError) -> Self {
        match &err.kind {
            // The pipeline's messages may quote files of this machine (its input copies, its
            // libraries): clients see their names, not where they live.
            ExecErrorKind::InvalidInput { field } => Self {
                param: field.as_deref().map(|f| truncate_chars(f, MAX_ECHOED_CHARS)),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", redact_paths(&err.message))
            },
            ExecErrorKind::OutOfMemory => Self {
                code: Some("insufficient_device_memory"),
                ..Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "server_error",
                    format!("the request does not fit in device memory: {}", redact_paths(&err.message)),
                )
            },
            ExecErrorKind::DeviceFailed => Self {
                code: Some("device_failed"),
                ..Self::internal(format!("the device failed and the server must be restarted: {}", err.message))
            },
            ExecErrorKind::Load | ExecErrorKind::Internal => Self {
                code: Some("generation_failed"),
                ..Self::internal(format!("generation failed: {}", redact_paths(&err.message)))
            },
        }
    }

    pub fn from_generation(err: &GenerationError) -> Self {
        match err {
            GenerationError::Cancelled => Self::not_ready("the request was cancelled"),
            GenerationError::Execution(exec) => Self::from_exec(exec),
            GenerationError::EngineStopped => Self::not_ready("the engine stopped"),
            GenerationError::DeadlineExceeded { .. } => Self {
                code: Some("deadline_exceeded"),
                ..Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", err.to_string())
            },
        }
    }
}

/// `text` cut to `max` characters, with an ellipsis that says so.
fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Error messages quote what the client sent (serde: `invalid type: string "…"`, unknown field
/// names in backticks): every quoted value is cut to `MAX_ECHOED_CHARS`, then the whole message to
/// `MAX_MESSAGE_CHARS`.
fn shorten_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_CHARS + 8));
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=start]);
        let inner = &rest[start + 1..];
        let Some(len) = closing_quote(inner, quote) else {
            rest = inner;
            break;
        };
        out.push_str(&truncate_chars(&inner[..len], MAX_ECHOED_CHARS));
        out.push(quote);
        rest = &inner[len + 1..];
        if out.len() > MAX_MESSAGE_CHARS * 4 {
            break;
        }
    }
    out.push_str(rest);
    truncate_chars(&out, MAX_MESSAGE_CHARS)
}

/// Byte length of a quoted value up to its closing `quote` (a `"` may be escaped as `\"`).
fn closing_quote(inner: &str, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (index, c) in inner.char_indices() {
        match c {
            '\\' if quote == '"' && !escaped => escaped = true,
            c if c == quote && !escaped => return Some(index),
            _ => escaped = false,
        }
    }
    None
}

/// Absolute file paths (`/a/b/name`) in a message → `…/name`: the file's name says what went wrong,
/// where it lives on the server is none of the client's business. `//` (URLs) is left alone.
fn redact_paths(message: &str) -> String {
    const BEFORE: &[char] = &[' ', '\'', '"', '`', '(', '[', '=', ',', ':'];
    const ENDS: &[char] = &[' ', '\'', '"', '`', ')', ']', ',', '\n', '\t'];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut previous: Option<char> = None;
    while let Some(start) = rest.find('/') {
        let before = rest[..start].chars().next_back().or(previous);
        let token_end = rest[start..].find(ENDS).map_or(rest.len(), |end| start + end);
        let token = &rest[start..token_end];
        let is_path = before.is_none_or(|c| BEFORE.contains(&c))
            && !token.starts_with("//")
            && token[1..].contains('/')
            && !token.ends_with('/');
        out.push_str(&rest[..start]);
        if is_path {
            let name = token.rsplit('/').next().unwrap_or_default();
            out.push_str("…/");
            out.push_str(name);
        } else {
            out.push_str(token);
        }
        previous = token.chars().next_back().or(before);
        rest = &rest[token_end..];
    }
    out.push_str(rest);
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Inside the request's span, so the line carries its request id.
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), code = self.code, "{}", self.message);
        } else {
            tracing::debug!(status = self.status.as_u16(), code = self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind.to_string(),
                param: self.param,
                code: self.code.map(str::to_string),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_cut_short() {
        let huge = "w".repeat(1 << 20);
        let err = ApiError::invalid("width", format!("invalid type: string \"{huge}\", expected u32"));
        assert!(err.message.len() < 200, "{}", err.message.len());
        assert!(err.message.starts_with(&format!("invalid type: string \"{}…\"", "w".repeat(MAX_ECHOED_CHARS))));
        assert!(err.message.ends_with(", expected u32"), "{}", err.message);
        let err = ApiError::bad_request(format!("unknown field `{huge}`, expected one of `prompt`, `n`"));
        assert!(err.message.ends_with("…`, expected one of `prompt`, `n`"), "{}", err.message);
        // Unterminated quotes and plain text are bounded as a whole.
        assert!(ApiError::not_found(format!("no route for GET /{huge}")).message.chars().count() <= 1025);
        assert!(ApiError::bad_request(format!("\"{huge}")).message.chars().count() <= 1025);
        assert_eq!(ApiError::invalid(huge.clone(), "x").param.map(|p| p.chars().count()), Some(65));
        // Escaped quotes stay inside their value; short messages are untouched.
        assert_eq!(shorten_message(r#"a "b\"c" d `e`"#), r#"a "b\"c" d `e`"#);
        assert_eq!(shorten_message("size must be WIDTHxHEIGHT"), "size must be WIDTHxHEIGHT");
    }

    #[test]
    fn pipeline_messages_name_files_without_their_folders() {
        let exec = ExecError::new(
            ExecErrorKind::InvalidInput { field: Some("image".into()) },
            "cannot identify image file '/tmp/sgl/videos/video_1/input.png' (see /usr/lib/x.py:3)",
        );
        let err = ApiError::from_exec(&exec);
        assert_eq!(err.message, "cannot identify image file '…/input.png' (see …/x.py:3)");
        let internal = ApiError::from_exec(&ExecError::internal("OSError: /home/me/.cache/model.bin is truncated"));
        assert_eq!(internal.message, "generation failed: OSError: …/model.bin is truncated");
        // URLs, API routes quoted without a folder, and sizes like 32/64 are not paths.
        assert_eq!(redact_paths("see https://a.b/c/d"), "see https://a.b/c/d");
        assert_eq!(redact_paths("ratio 32/64 and /health"), "ratio 32/64 and /health");
        let validation =
            ValidationError::new("image", "input image file \"/srv/out/videos/v1/input.png\" does not exist");
        assert!(!ApiError::from_validation(&validation).message.contains("/srv"));
    }
}
