//! One table from every failure to its HTTP status and OpenAI error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sgl_core::ValidationError;
use sgl_scheduler::{ExecError, ExecErrorKind, GenerationError, SubmitError};

use crate::wire::{ErrorBody, ErrorDetail};

/// Seconds a client is asked to wait after a 429 before retrying.
const RETRY_AFTER_SECONDS: &str = "5";

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
        Self { status, kind, message: message.into(), param: None, code: None }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
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
        Self::invalid(err.field.clone(), err.to_string())
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
            ExecErrorKind::InvalidInput { field } => Self {
                param: field.clone(),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", err.message.clone())
            },
            ExecErrorKind::OutOfMemory => Self {
                code: Some("insufficient_device_memory"),
                ..Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "server_error",
                    format!("the request does not fit in device memory: {}", err.message),
                )
            },
            ExecErrorKind::DeviceFailed => Self {
                code: Some("device_failed"),
                ..Self::internal(format!("the device failed and the server must be restarted: {}", err.message))
            },
            ExecErrorKind::Load | ExecErrorKind::Internal => Self {
                code: Some("generation_failed"),
                ..Self::internal(format!("generation failed: {}", err.message))
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
