use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use crate::openapi::openapi_json;
use crate::state::SharedState;

/// The OpenAPI spec, generated from the Rust types.
pub(super) async fn openapi() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], openapi_json())
}

/// Prometheus metrics in text format.
#[utoipa::path(get, path = "/metrics", tag = "observability",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    let engine = state.loaded_engine();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(engine.as_deref()))
}
