//! Path and query extractors whose rejections use the OpenAI error body (axum's are plain text).

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct ApiPath<T>(pub T);

pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|rejection| ApiError::bad_request(format!("invalid URL path: {}", rejection.body_text())))
    }
}

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state).await.map(|Query(value)| Self(value)).map_err(|rejection| {
            let text = rejection.body_text();
            // "Failed to deserialize query string: <field>: <reason>"
            let detail = text.split_once("query string: ").map_or(text.as_str(), |(_, rest)| rest);
            match detail.split_once(": ") {
                Some((field, reason)) if !field.contains(' ') => ApiError::invalid(field, format!("{field}: {reason}")),
                _ => ApiError::bad_request(format!("invalid query string: {detail}")),
            }
        })
    }
}
