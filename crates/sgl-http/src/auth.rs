//! `--api-key`: every route except `/health` needs `Authorization: Bearer <key>`, whatever the
//! method (OPTIONS included: answering it without a key would tell which routes exist). The one
//! exception is a browser's CORS preflight from an allowed origin, which carries no credentials.

use axum::extract::{Request, State};
use axum::http::header::{ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, ORIGIN};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::{cors_origin, CorsOrigin};
use crate::error::ApiError;
use crate::state::SharedState;

/// Routes open without a key: load balancers probe liveness without credentials.
pub(crate) const PUBLIC_PATHS: &[&str] = &["/health"];

pub async fn require_api_key(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if authorized(&state, &request) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Sits outside the CORS layer, which answers every OPTIONS request by itself: an OPTIONS request
/// that is not a preflight from an allowed origin needs the key like any other.
pub async fn guard_options(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if request.method() == Method::OPTIONS && !is_allowed_preflight(&state, &request) && !authorized(&state, &request) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

fn authorized(state: &SharedState, request: &Request) -> bool {
    let Some(expected) = state.config.api_key.as_deref() else {
        return true;
    };
    if PUBLIC_PATHS.contains(&request.uri().path()) {
        return true;
    }
    let presented = request.headers().get(AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(bearer_token);
    presented.is_some_and(|key| constant_time_eq(key.as_bytes(), expected.as_bytes()))
}

/// A CORS preflight (`Access-Control-Request-Method` set) from an origin `--cors-origin` allows.
fn is_allowed_preflight(state: &SharedState, request: &Request) -> bool {
    let headers = request.headers();
    let Some(origin) = headers.get(ORIGIN) else {
        return false;
    };
    headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        && state.config.cors_origins.iter().any(|allowed| match cors_origin(allowed) {
            Ok(CorsOrigin::Any) => true,
            Ok(CorsOrigin::Exact(value)) => value == origin,
            Err(_) => false,
        })
}

/// The credentials of `Bearer <token>`; the scheme name is case-insensitive (RFC 9110 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares keys without an early exit, so response timing does not reveal a key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer k", "bearer k", "BEARER k", "  Bearer   k  "] {
            assert_eq!(bearer_token(header), Some("k"), "{header:?}");
        }
        for header in ["Basic k", "Bearerk", "k", "Bearer"] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
